"""Guidance: steering a diffusion model towards a condition.

Two ideas, both about changing the model's noise prediction at every step:

* **Classifier guidance** (Dhariwal & Nichol 2021, "Diffusion Models Beat GANs
  on Image Synthesis", section 4 and Algorithm 2): a classifier trained on
  *noisy* images gives log p(y | x_t); its gradient pushes x_t towards class
  y. In noise-prediction form (their eq. 14):
  ``eps_hat = eps - scale * sqrt(1 - alpha_bar_t) * grad_x log p(y | x_t)``.
* **Classifier-free guidance** (Ho & Salimans 2022, "Classifier-Free Diffusion
  Guidance", eq. 6): one model trained with the condition sometimes dropped
  predicts both eps(x_t, c) and eps(x_t, empty); extrapolating from the
  unconditional towards the conditional prediction plays the classifier's role:
  ``eps_hat = eps_uncond + guidance_scale * (eps_cond - eps_uncond)``.
  A *negative prompt* simply replaces the empty condition.

``guidance_scale`` follows the convention of Stable Diffusion tools: 1 means
no guidance (the conditional prediction alone), 0 the unconditional one, and
7.5 is SD's default.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ministd.data import COLORS, SHAPES
from ministd.unet import ResnetBlock, TimestepEmbedding, timestep_embedding
from ministd.weights import load_model, save_model

DATA = Path(__file__).resolve().parent.parent / "data"
SHAPES_CLASSIFIER_FILE = DATA / "shapes_noisy_classifier.safetensors"


def check_guidance_scale(guidance_scale: float, name: str = "guidance_scale") -> float:
    """Validate a guidance scale: a finite number >= 0."""
    if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float)):
        raise ValueError(f"{name} must be a number >= 0, got {guidance_scale!r}")
    if not math.isfinite(guidance_scale) or guidance_scale < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {guidance_scale}")
    return float(guidance_scale)


def classifier_free_guidance(noise_pred_uncond: torch.Tensor, noise_pred_cond: torch.Tensor,
                             guidance_scale: float) -> torch.Tensor:
    """Combine the two predictions: uncond + s * (cond - uncond).   [B, C, H, W] each.

    Ho & Salimans 2022, eq. 6 (written with w = s - 1 there).
    """
    return noise_pred_uncond + guidance_scale * (noise_pred_cond - noise_pred_uncond)


def rescale_guidance(noise_pred_guided: torch.Tensor, noise_pred_cond: torch.Tensor,
                     guidance_rescale: float) -> torch.Tensor:
    """Pull the guided prediction's per-sample std back towards the conditional one's.

    Large guidance scales inflate the prediction's magnitude, which over-exposes
    images (most visibly with zero-terminal-SNR schedules). Lin et al. 2024,
    "Common Diffusion Noise Schedules and Sample Steps are Flawed", section 3.4:
    ``x_rescaled = x_cfg * std(x_cond) / std(x_cfg)`` then
    ``phi * x_rescaled + (1 - phi) * x_cfg`` with phi = ``guidance_rescale``.
    """
    if not 0.0 <= guidance_rescale <= 1.0:
        raise ValueError(f"guidance_rescale must be in [0, 1], got {guidance_rescale}")
    if guidance_rescale == 0.0:
        return noise_pred_guided
    dims = tuple(range(1, noise_pred_cond.ndim))
    std_cond = noise_pred_cond.std(dim=dims, keepdim=True)
    std_guided = noise_pred_guided.std(dim=dims, keepdim=True)
    rescaled = noise_pred_guided * (std_cond / std_guided)
    return guidance_rescale * rescaled + (1.0 - guidance_rescale) * noise_pred_guided


def guided_noise_prediction(model: Callable[..., torch.Tensor], latents: torch.Tensor, t,
                            cond: torch.Tensor, uncond: torch.Tensor | None, guidance_scale: float,
                            guidance_rescale: float = 0.0, **model_kwargs) -> torch.Tensor:
    """One classifier-free-guided prediction, with both branches in one batch.

    ``model(x [2B,...], t, encoder_hidden_states [2B, L, D], **kwargs)``; the
    unconditional branch comes first, as in the reference pipelines. With
    ``guidance_scale == 1`` or ``uncond is None`` only the conditional branch
    is run (half the work). Tensors in ``model_kwargs`` whose first dimension
    is ``2B`` are passed whole (e.g. SDXL's added conditions, stacked
    [uncond, cond] by the caller); dicts of such tensors too.
    """
    if uncond is None or guidance_scale == 1.0:
        batch = latents.shape[0]
        return model(latents, t, cond, **_half(model_kwargs, batch))
    x = torch.cat([latents, latents])
    out = model(x, t, torch.cat([uncond, cond]), **model_kwargs)
    noise_uncond, noise_cond = out.chunk(2)
    guided = classifier_free_guidance(noise_uncond, noise_cond, guidance_scale)
    return rescale_guidance(guided, noise_cond, guidance_rescale)


def _half(kwargs: dict, batch: int) -> dict:
    """Keep only the conditional half of stacked [uncond, cond] extra inputs."""
    def pick(v):
        if isinstance(v, torch.Tensor) and v.ndim > 0 and v.shape[0] == 2 * batch:
            return v[batch:]
        if isinstance(v, dict):
            return {k: pick(x) for k, x in v.items()}
        return v
    return {k: pick(v) for k, v in kwargs.items()}


def classifier_guidance(noise_pred: torch.Tensor, latents: torch.Tensor, t: torch.Tensor,
                        classifier: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                        labels: torch.Tensor, alpha_bar_t: torch.Tensor | float,
                        scale: float) -> torch.Tensor:
    """Classifier guidance in noise-prediction form (Dhariwal & Nichol 2021, eq. 14).

    ``classifier(x_t, t) -> logits [B, K]`` was trained on noisy inputs;
    ``labels`` [B] are the wanted classes. Returns
    ``eps - scale * sqrt(1 - alpha_bar_t) * grad_{x_t} log p(labels | x_t)``,
    which any epsilon-based sampler then uses unchanged.
    """
    check_guidance_scale(scale, "scale")
    if scale == 0:
        return noise_pred
    with torch.enable_grad():
        x = latents.detach().requires_grad_(True)
        log_probs = torch.log_softmax(classifier(x, t), dim=-1)
        selected = log_probs[torch.arange(x.shape[0]), labels].sum()
        grad = torch.autograd.grad(selected, x)[0]
    alpha_bar_t = torch.as_tensor(alpha_bar_t, dtype=noise_pred.dtype, device=noise_pred.device)
    return noise_pred - scale * torch.sqrt(1 - alpha_bar_t).reshape(-1, *[1] * (noise_pred.ndim - 1)) * grad


# --------------------------------------------------------------------------- #
# The noisy classifier that classifier guidance needs
# --------------------------------------------------------------------------- #

@dataclass
class NoisyClassifierConfig:
    """A classifier of noisy latents x_t: one head per attribute, each with its label names."""
    in_channels: int = 4
    channels: tuple[int, ...] = (64, 128)
    time_dim: int = 128
    groups: int = 32
    labels: dict[str, tuple[str, ...]] = field(default_factory=lambda: {"color": COLORS, "shape": SHAPES})

    @classmethod
    def from_dict(cls, d: dict) -> "NoisyClassifierConfig":
        d = {k: v for k, v in d.items() if not k.startswith("_")}
        return cls(in_channels=d["in_channels"], channels=tuple(d["channels"]), time_dim=d["time_dim"],
                   groups=d["groups"], labels={k: tuple(v) for k, v in d["labels"].items()})


class NoisyClassifier(nn.Module):
    """p(attribute | x_t, t) for ShapesWorld latents at any noise level.

    Dhariwal & Nichol 2021 (sec. 4.1) train their guidance classifier on noisy
    images x_t with the timestep as an input, because guidance asks it about
    x_t at every step, not about clean pictures. Here: the U-Net's ResNet
    blocks with timestep injection, average-pool downsampling, global average
    pooling, and a linear head per attribute.
    x [B, 4, h, w], t [B] or scalar -> {attribute: logits [B, K]}.
    """

    def __init__(self, config: NoisyClassifierConfig | None = None):
        super().__init__()
        self.config = config = config or NoisyClassifierConfig()
        c0 = config.channels[0]
        self.time_embedding = TimestepEmbedding(c0, config.time_dim)
        self.conv_in = nn.Conv2d(config.in_channels, c0, 3, padding=1)
        widths = (c0, *config.channels)
        self.blocks = nn.ModuleList(ResnetBlock(a, b, config.time_dim, config.groups)
                                    for a, b in zip(widths[:-1], widths[1:]))
        self.norm_out = nn.GroupNorm(config.groups, widths[-1])
        self.heads = nn.ModuleDict({k: nn.Linear(widths[-1], len(v)) for k, v in config.labels.items()})

    def forward(self, x: torch.Tensor, t) -> dict[str, torch.Tensor]:
        t = torch.as_tensor(t, device=x.device).reshape(-1).expand(x.shape[0])
        temb = self.time_embedding(timestep_embedding(t, self.config.channels[0]).to(x.dtype))
        h = self.conv_in(x)
        for i, block in enumerate(self.blocks):
            h = block(h, temb)
            if i < len(self.blocks) - 1:
                h = F.avg_pool2d(h, 2)
        h = F.silu(self.norm_out(h)).mean(dim=(2, 3))
        return {k: head(h) for k, head in self.heads.items()}

    def label_index(self, attribute: str, names) -> torch.Tensor:
        """Label names -> class indices [B] of ``attribute``'s head (ValueError for unknown names)."""
        if attribute not in self.config.labels:
            raise ValueError(f"attribute must be one of {sorted(self.config.labels)}, got {attribute!r}")
        allowed = self.config.labels[attribute]
        names = [names] if isinstance(names, str) else list(names)
        bad = [n for n in names if n not in allowed]
        if bad:
            raise ValueError(f"{attribute} labels must be among {allowed}, got {bad}")
        return torch.tensor([allowed.index(n) for n in names])

    def head(self, attribute: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """``classifier(x_t, t) -> logits`` of one attribute, the form :func:`classifier_guidance` takes."""
        self.label_index(attribute, [])
        return lambda x, t: self(x, t)[attribute]

    def save(self, path: str | Path, extra_config: dict | None = None) -> None:
        """float16 safetensors + .json config (:func:`ministd.weights.save_model`)."""
        save_model(self, path, asdict(self.config), extra_config=extra_config)

    @classmethod
    def load(cls, path: str | Path = SHAPES_CLASSIFIER_FILE, dtype: torch.dtype = torch.float32) -> "NoisyClassifier":
        """Load weights + config (the shipped ShapesWorld classifier by default); strict."""
        return load_model(path, lambda fields: cls(NoisyClassifierConfig.from_dict(fields)), dtype=dtype)
