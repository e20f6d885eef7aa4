"""The autoencoder of latent diffusion: AutoencoderKL (chapter 04).

Stable Diffusion never denoises pixels. A variational autoencoder first
squeezes a 512×512×3 picture into a 64×64×4 *latent* (48× fewer numbers), the
diffusion model works there, and the decoder paints the final latent back
into pixels. This module is that autoencoder, as described in

    Rombach et al., "High-Resolution Image Synthesis with Latent Diffusion
    Models" (CVPR 2022), section 3.1 and appendix G ("KL-reg" first stage),

built from the same blocks as the VQGAN encoder/decoder of Esser et al.,
"Taming Transformers" (2021): ResNet blocks, strided-convolution
downsampling, nearest-neighbour upsampling, one self-attention block in the
middle, GroupNorm + SiLU everywhere.

Shapes for the SD 1.x/2.x/SDXL configuration (block_out_channels
(128, 256, 512, 512), 3 downsamplings, factor f = 8)::

    image   [B, 3, H, W] in [-1, 1]
      encoder -> moments [B, 2*4, H/8, W/8]  (mean and log-variance)
    latent  [B, 4, H/8, W/8]                 (a sample, or the mean)
      decoder -> image [B, 3, H, W] in about [-1, 1]

The book's ShapesWorld VAE is the same class with a smaller config
(block_out_channels (32, 64, 128): f = 4, 64×64×3 -> 16×16×4).

Parameter names follow the diffusers layout (``encoder.down_blocks.0.resnets.0.conv1.weight``
...), so a diffusers ``vae/`` folder loads directly; the original
CompVis/Stability single-file layout (``first_stage_model.encoder.down.0.block.0...``)
is renamed by :func:`convert_original_vae_state_dict`.

The LDM paper's other first stage, "VQ-reg", replaces the Gaussian posterior
by a codebook: :class:`VectorQuantizer` (van den Oord et al. 2017) snaps every
latent vector to its nearest code, and :func:`codebook_usage` measures how
much of the codebook is used. Chapter 04 trains both kinds side by side.

Input rules (checked before any computation): images must be float tensors of
shape [B, in_channels, H, W] with H and W multiples of the downsampling factor
and values in [-1, 1] (a tolerance of 1e-3 allows rounding). Grayscale (1
channel) and RGBA (4 channels) tensors are refused with a message saying how
to convert (``ministd.data.pil_to_tensor`` converts PIL pictures to RGB).
Nothing is converted silently.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ministd.weights import (DIFFUSERS_WEIGHTS, build_on_meta, load_model, load_strict, read_json, read_weights,
                             rename_by_prefix, save_model, strip_prefix)

SD_SCALING_FACTOR = 0.18215    # SD 1.x / 2.x (LDM paper, appendix G: 1 / std of the latents)
SDXL_SCALING_FACTOR = 0.13025  # SDXL's retrained VAE
_RANGE_TOLERANCE = 1e-3        # images may exceed [-1, 1] by this much (rounding)
# The book's trained ShapesWorld VAE (float16 weights + config), see ministd.train.vae.
SHAPES_VAE_PATH = Path(__file__).resolve().parents[1] / "data" / "shapes_vae.safetensors"


# --------------------------------------------------------------------------- #
# Configuration
# --------------------------------------------------------------------------- #

@dataclass
class VAEConfig:
    """Everything that decides the shape of an AutoencoderKL.

    The defaults are Stable Diffusion 1.x / 2.x's VAE (83.7 M parameters).
    ``downsampling_factor`` is 2 ** (len(block_out_channels) - 1): every level
    but the last halves the picture.
    """

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 4
    norm_num_groups: int = 32
    scaling_factor: float = SD_SCALING_FACTOR
    shift_factor: float | None = None
    mid_block_attention: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    force_upcast: bool = True   # decode in float32 when the weights are float16 (SDXL overflows; not bfloat16)
    sample_size: int = 512      # default tile side (pixels) for tiled encode/decode

    def __post_init__(self):
        self.block_out_channels = tuple(int(c) for c in self.block_out_channels)
        if not self.block_out_channels:
            raise ValueError("block_out_channels must name at least one level")
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad:
            raise ValueError(f"every entry of block_out_channels must be divisible by "
                             f"norm_num_groups={self.norm_num_groups}, got {self.block_out_channels}")
        for name in ("in_channels", "out_channels", "latent_channels", "layers_per_block"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")

    @property
    def downsampling_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    # diffusers config.json <-> VAEConfig ----------------------------------
    @classmethod
    def from_dict(cls, d: Mapping) -> "VAEConfig":
        """Read a diffusers ``vae/config.json`` dict (or a dict of our own field names)."""
        d = dict(d)
        for key, allowed in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
            kinds = set(d.get(key, [allowed]))
            if kinds != {allowed}:
                raise ValueError(f"config {key} must contain only {allowed!r}, got {sorted(kinds)}")
        if d.get("act_fn", "silu") != "silu":
            raise ValueError(f"config act_fn must be 'silu', got {d['act_fn']!r}")
        if "mid_block_add_attention" in d:
            d["mid_block_attention"] = d.pop("mid_block_add_attention")
        if isinstance(d.get("sample_size"), (list, tuple)):
            d["sample_size"] = d["sample_size"][0]
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_dict(self) -> dict:
        """A diffusers-compatible config dict (what ``config.json`` holds)."""
        d = asdict(self)
        d["block_out_channels"] = list(self.block_out_channels)
        d["mid_block_add_attention"] = d.pop("mid_block_attention")
        n = len(self.block_out_channels)
        d["down_block_types"] = ["DownEncoderBlock2D"] * n
        d["up_block_types"] = ["UpDecoderBlock2D"] * n
        d["act_fn"] = "silu"
        d["_class_name"] = "AutoencoderKL"
        return d


# --------------------------------------------------------------------------- #
# Building blocks
# --------------------------------------------------------------------------- #

def _group_norm(channels: int, groups: int) -> nn.GroupNorm:
    # eps 1e-6 everywhere in the LDM autoencoder (not PyTorch's default 1e-5).
    return nn.GroupNorm(groups, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    """x + conv(SiLU(GN(conv(SiLU(GN(x)))))), with a 1×1 conv on x when widths differ.

    [B, in, H, W] -> [B, out, H, W]. No timestep input: the VAE is not a
    diffusion model. (He et al. 2016, pre-activation form.)
    """

    def __init__(self, in_channels: int, out_channels: int, groups: int):
        super().__init__()
        self.norm1 = _group_norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _group_norm(out_channels, groups)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return h + skip


class SelfAttention(nn.Module):
    """One-head self-attention over all H·W positions, with a residual.

    [B, C, H, W] -> [B, C, H, W]. Every pixel of the (small) bottleneck can
    look at every other one: softmax(Q Kᵀ / √C) V, Vaswani et al. 2017.
    """

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.group_norm = _group_norm(channels, groups)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])  # index 0 as in the file layout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = self.group_norm(x).flatten(2).transpose(1, 2)           # [B, H·W, C]
        q, k, v = self.to_q(tokens), self.to_k(tokens), self.to_v(tokens)
        # one head of width C; [B, 1, H·W, C] for the fused kernel
        out = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]
        out = self.to_out[0](out).transpose(1, 2).reshape(b, c, h, w)
        return x + out


class Downsample(nn.Module):
    """Halve H and W with a stride-2 3×3 conv after padding only right and bottom.

    The asymmetric (0, 1, 0, 1) padding is the original LDM choice; the real
    weights were trained with it, so it must be kept exactly.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Double H and W: nearest-neighbour copy, then a 3×3 conv to smooth it."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution level: ``n`` ResNet blocks, then an optional resampler.

    Held as ``resnets`` and ``downsamplers``/``upsamplers`` lists, the names the
    weight files use.
    """

    def __init__(self, in_channels: int, out_channels: int, n: int, groups: int,
                 resample: str | None):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock(in_channels if i == 0 else out_channels, out_channels, groups) for i in range(n))
        if resample == "down":
            self.downsamplers = nn.ModuleList([Downsample(out_channels)])
        elif resample == "up":
            self.upsamplers = nn.ModuleList([Upsample(out_channels)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.resnets:
            x = block(x)
        for resampler in getattr(self, "downsamplers", ()) or getattr(self, "upsamplers", ()):
            x = resampler(x)
        return x


class MidBlock(nn.Module):
    """ResNet block, self-attention (optional), ResNet block, at the lowest resolution."""

    def __init__(self, channels: int, groups: int, attention: bool):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(channels, channels, groups),
                                      ResnetBlock(channels, channels, groups)])
        self.attentions = nn.ModuleList([SelfAttention(channels, groups)] if attention else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        for attention in self.attentions:
            x = attention(x)
        return self.resnets[1](x)


class Encoder(nn.Module):
    """[B, in_channels, H, W] -> moments [B, 2·latent_channels, H/f, W/f]."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, groups = cfg.block_out_channels, cfg.norm_num_groups
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            Level(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block, groups,
                  "down" if i < len(ch) - 1 else None)
            for i in range(len(ch)))
        self.mid_block = MidBlock(ch[-1], groups, cfg.mid_block_attention)
        self.conv_norm_out = _group_norm(ch[-1], groups)
        self.conv_out = nn.Conv2d(ch[-1], 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for level in self.down_blocks:
            x = level(x)
        x = self.mid_block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class Decoder(nn.Module):
    """latents [B, latent_channels, h, w] -> image [B, out_channels, h·f, w·f].

    Mirrors the encoder with one extra ResNet block per level
    (layers_per_block + 1), widest level first.
    """

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, groups = tuple(reversed(cfg.block_out_channels)), cfg.norm_num_groups
        self.conv_in = nn.Conv2d(cfg.latent_channels, ch[0], 3, padding=1)
        self.mid_block = MidBlock(ch[0], groups, cfg.mid_block_attention)
        self.up_blocks = nn.ModuleList(
            Level(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block + 1, groups,
                  "up" if i < len(ch) - 1 else None)
            for i in range(len(ch)))
        self.conv_norm_out = _group_norm(ch[-1], groups)
        self.conv_out = nn.Conv2d(ch[-1], cfg.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.mid_block(self.conv_in(z))
        for level in self.up_blocks:
            x = level(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


# --------------------------------------------------------------------------- #
# The posterior q(z | x)
# --------------------------------------------------------------------------- #

class DiagonalGaussianDistribution:
    """q(z | x) = N(mean, diag(exp(logvar))), one Gaussian per latent number.

    ``moments`` [B, 2C, h, w] is split along channels into mean and logvar;
    logvar is clamped to [-30, 20] (as in the LDM code) so exp() never
    overflows. Kingma & Welling, "Auto-Encoding Variational Bayes" (2014).
    """

    def __init__(self, moments: torch.Tensor):
        self.mean, logvar = torch.chunk(moments, 2, dim=1)
        self.logvar = torch.clamp(logvar, -30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """z = mean + std · ε, ε ~ N(0, I) drawn on the generator's device (reparameterisation)."""
        device = generator.device if generator is not None else self.mean.device
        eps = torch.randn(self.mean.shape, generator=generator, device=device, dtype=self.mean.dtype)
        return self.mean + self.std * eps.to(self.mean.device)

    def mode(self) -> torch.Tensor:
        """The most likely latent: the mean."""
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q(z|x) ‖ N(0, I)) per sample, summed over C, h, w -> [B].

        KL = ½ Σ (μ² + σ² − 1 − log σ²).
        """
        return 0.5 * torch.sum(self.mean.pow(2) + self.var - 1.0 - self.logvar, dim=[1, 2, 3])


# --------------------------------------------------------------------------- #
# The other regulariser: vector quantisation
# --------------------------------------------------------------------------- #

VQ_BETA = 0.25   # weight of the commitment loss (van den Oord et al. 2017, section 4.1)


class VectorQuantizer(nn.Module):
    """Snap every latent vector to its nearest codebook entry (VQ-VAE, VQGAN, LDM "VQ-reg").

    van den Oord et al., "Neural Discrete Representation Learning" (NeurIPS 2017),
    section 3.1 and equation 3; used by Esser et al.'s VQGAN (2021) and by the
    LDM paper's VQ-regularised first stages (Rombach et al. 2022, section 3 and
    appendix G), where the quantiser sits in the decoder's first layer.

    The codebook is ``num_codes`` learned vectors of ``code_dim`` numbers
    (``codebook.weight`` [K, D]). For latents z [B, D, h, w]:

    * each of the B·h·w vectors z_i is replaced by the code e_k with the smallest
      squared distance ‖z_i − e_k‖² = ‖z_i‖² − 2 z_i·e_k + ‖e_k‖²;
    * **straight-through estimator**: the forward pass returns e_k, the backward
      pass copies the gradient of e_k onto z_i unchanged (argmin has no gradient),
      written z + (e − z).detach();
    * the loss trains what that gradient cannot reach, with sg = stop-gradient::

          loss = mean ‖sg[z] − e‖²  +  β · mean ‖z − sg[e]‖²
                 codebook loss          commitment loss (β = 0.25)

      The codebook loss moves the codes toward the encoder's outputs; the
      commitment loss keeps the encoder from running away from its codes.

    ``forward(z)`` returns ``(z_q, loss, indices)``: z_q [B, D, h, w] (the
    codes, with the straight-through gradient), loss (a scalar) and indices
    [B, h, w] (long, into the codebook). diffusers' ``VectorQuantizer`` with
    ``legacy=False`` computes the same (its default ``legacy=True`` puts β on
    the codebook term instead, a bug kept for old checkpoints).
    """

    def __init__(self, num_codes: int, code_dim: int, beta: float = VQ_BETA):
        super().__init__()
        if num_codes < 1 or code_dim < 1:
            raise ValueError(f"num_codes and code_dim must be >= 1, got {num_codes} and {code_dim}")
        self.num_codes, self.code_dim, self.beta = num_codes, code_dim, beta
        self.codebook = nn.Embedding(num_codes, code_dim)
        nn.init.uniform_(self.codebook.weight, -1.0 / num_codes, 1.0 / num_codes)   # as in VQ-VAE/VQGAN code

    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """Indices [B, h, w] of the nearest code to each vector of z [B, D, h, w]."""
        if z.ndim != 4 or z.shape[1] != self.code_dim:
            raise ValueError(f"z must have shape [B, {self.code_dim}, h, w], got {tuple(z.shape)}")
        flat = z.permute(0, 2, 3, 1).reshape(-1, self.code_dim)              # [B·h·w, D]
        codes = self.codebook.weight                                         # [K, D]
        distances = (flat.pow(2).sum(1, keepdim=True) - 2 * flat @ codes.T
                     + codes.pow(2).sum(1)[None])                            # [B·h·w, K]
        return distances.argmin(1).view(z.shape[0], z.shape[2], z.shape[3])

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """Indices [B, h, w] -> codes [B, D, h, w]."""
        return self.codebook(indices).permute(0, 3, 1, 2)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        indices = self.nearest(z)
        e = self.lookup(indices)
        codebook_loss = (e - z.detach()).pow(2).mean()
        commitment_loss = (z - e.detach()).pow(2).mean()
        z_q = z + (e - z).detach()          # value e, gradient d z_q / d z = identity
        return z_q, codebook_loss + self.beta * commitment_loss, indices


def codebook_usage(indices: torch.Tensor, num_codes: int) -> tuple[float, float]:
    """How much of a codebook a batch of code indices uses: (share of codes used, perplexity).

    Perplexity is exp(entropy) of the codes' frequencies: the number of equally
    used codes that would give the same entropy (``num_codes`` at best, 1 when
    everything maps to one code).
    """
    counts = torch.bincount(indices.flatten(), minlength=num_codes).double()
    p = counts / counts.sum()
    entropy = -(p[p > 0] * p[p > 0].log()).sum()
    return float((counts > 0).double().mean()), float(entropy.exp())


# --------------------------------------------------------------------------- #
# The autoencoder
# --------------------------------------------------------------------------- #

class AutoencoderKL(nn.Module):
    """Encoder + diagonal Gaussian posterior + decoder (LDM "KL-f8" and friends).

    ``encode(images)`` -> :class:`DiagonalGaussianDistribution`;
    ``decode(latents)`` -> images. Latents here are *unscaled*; the diffusion
    model sees ``scale_latents(z) = (z - shift_factor) · scaling_factor``, which
    gives them roughly unit variance (LDM paper, section 4.3.2 / appendix D.1).
    """

    def __init__(self, config: VAEConfig | None = None, **overrides):
        super().__init__()
        config = config if config is not None else VAEConfig()
        if overrides:
            config = VAEConfig(**{**asdict(config), **overrides})
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        c = config.latent_channels
        self.quant_conv = nn.Conv2d(2 * c, 2 * c, 1) if config.use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(c, c, 1) if config.use_post_quant_conv else None

    # -- properties ---------------------------------------------------------
    @property
    def scaling_factor(self) -> float:
        return self.config.scaling_factor

    @property
    def shift_factor(self) -> float:
        return self.config.shift_factor or 0.0

    @property
    def downsampling_factor(self) -> int:
        return self.config.downsampling_factor

    @property
    def dtype(self) -> torch.dtype:
        return self.encoder.conv_in.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.encoder.conv_in.weight.device

    # -- input checks -------------------------------------------------------
    def check_images(self, images: torch.Tensor) -> None:
        """Raise ValueError unless ``images`` is [B, in_channels, H, W], f | H, W, values in [-1, 1]."""
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__} "
                            "(use ministd.data.pil_to_tensor for PIL pictures)")
        if images.ndim != 4:
            raise ValueError(f"images must have shape [B, {self.config.in_channels}, H, W], got {tuple(images.shape)}"
                             + (" (add a batch dimension with images[None])" if images.ndim == 3 else ""))
        if not images.is_floating_point():
            raise ValueError(f"images must be a floating-point tensor in [-1, 1], got dtype {images.dtype} "
                             "(for uint8 pixels use x / 127.5 - 1)")
        c = images.shape[1]
        if c != self.config.in_channels:
            hint = {1: " (a grayscale image: repeat it to RGB with images.expand(-1, 3, -1, -1))",
                    4: " (an RGBA image: drop or composite the alpha channel first, e.g. images[:, :3])"}.get(c, "")
            raise ValueError(f"images must have {self.config.in_channels} channels, got {c}{hint}")
        f = self.downsampling_factor
        h, w = images.shape[-2:]
        if h % f or w % f:
            raise ValueError(f"image height and width must be multiples of the downsampling factor {f}, "
                             f"got {h}×{w} (resize or crop to {h // f * f}×{w // f * f})")
        if images.device.type == "meta":   # shapes only (no values to check)
            return
        lo, hi = float(images.min()), float(images.max())
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise ValueError("images contain NaN or infinite values")
        if lo < -1 - _RANGE_TOLERANCE or hi > 1 + _RANGE_TOLERANCE:
            raise ValueError(f"image values must lie in [-1, 1], got [{lo:.3g}, {hi:.3g}] "
                             "(from [0, 1] use 2 * x - 1; from [0, 255] use x / 127.5 - 1)")

    def check_latents(self, latents: torch.Tensor) -> None:
        if not isinstance(latents, torch.Tensor) or latents.ndim != 4 or latents.shape[1] != self.config.latent_channels:
            shape = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
            raise ValueError(f"latents must have shape [B, {self.config.latent_channels}, h, w], got {shape}")

    # -- encode / decode ----------------------------------------------------
    def _moments(self, images: torch.Tensor) -> torch.Tensor:
        moments = self.encoder(images)
        return self.quant_conv(moments) if self.quant_conv is not None else moments

    def _pixels(self, latents: torch.Tensor) -> torch.Tensor:
        if self.post_quant_conv is not None:
            latents = self.post_quant_conv(latents)
        return self.decoder(latents)

    def encode(self, images: torch.Tensor, tile_size: int | None = None) -> DiagonalGaussianDistribution:
        """images [B, 3, H, W] in [-1, 1] -> posterior over latents [B, C, H/f, W/f].

        ``tile_size`` (pixels, a multiple of f): encode overlapping tiles of that
        side and blend them, so memory stays bounded for large pictures.
        """
        self.check_images(images)
        if tile_size is not None and (not isinstance(tile_size, int) or tile_size < self.downsampling_factor
                                      or tile_size % self.downsampling_factor):
            raise ValueError(f"tile_size must be a positive multiple of the downsampling factor "
                             f"{self.downsampling_factor} (pixels), got {tile_size!r}")
        images = images.to(self.dtype)
        if tile_size is not None and max(images.shape[-2:]) > tile_size:
            return DiagonalGaussianDistribution(self._tiled(images, self._moments, tile_size, 1 / self.downsampling_factor))
        return DiagonalGaussianDistribution(self._moments(images))

    def decode(self, latents: torch.Tensor, tile_size: int | None = None) -> torch.Tensor:
        """Unscaled latents [B, C, h, w] -> images [B, 3, h·f, w·f] (about [-1, 1]; not clamped).

        The latents are cast to the decoder's dtype, so after
        :meth:`upcast_decoder` a float16 model decodes in float32.
        ``tile_size`` is in latent units (e.g. 64 for 512-pixel tiles at f = 8).
        """
        self.check_latents(latents)
        if tile_size is not None and (not isinstance(tile_size, int) or tile_size < 1):
            raise ValueError(f"tile_size must be a positive int (latent units), got {tile_size!r}")
        latents = latents.to(self.decoder.conv_in.weight.dtype)
        if tile_size is not None and max(latents.shape[-2:]) > tile_size:
            return self._tiled(latents, self._pixels, tile_size, self.downsampling_factor)
        return self._pixels(latents)

    def forward(self, images: torch.Tensor, generator: torch.Generator | None = None,
                sample_posterior: bool = True) -> tuple[torch.Tensor, DiagonalGaussianDistribution]:
        """Reconstruct: returns (decoded images, posterior). Used for training."""
        posterior = self.encode(images)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z), posterior

    def scale_latents(self, z: torch.Tensor) -> torch.Tensor:
        """Latents as the diffusion model sees them: (z − shift) · scaling_factor."""
        return (z - self.shift_factor) * self.scaling_factor

    def unscale_latents(self, z: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`scale_latents`: z / scaling_factor + shift."""
        return z / self.scaling_factor + self.shift_factor

    def upcast_decoder(self) -> "AutoencoderKL":
        """Keep the decoder (and post_quant_conv) in float32 whatever the encoder's dtype.

        The SDXL VAE's activations exceed float16's range (65504) inside the
        decoder and turn into inf/NaN (black pictures); float32 avoids it.
        Loading in float16 does this when the config's ``force_upcast`` says so;
        bfloat16 reaches as far as float32 (8 exponent bits), so a bfloat16 VAE
        decodes in bfloat16, with half the activation memory (diffusers' SDXL
        pipeline upcasts for float16 only, too).
        """
        self.decoder.float()
        if self.post_quant_conv is not None:
            self.post_quant_conv.float()
        return self

    # -- tiling -------------------------------------------------------------
    @staticmethod
    def _tiled(x: torch.Tensor, fn, tile: int, ratio: float, overlap: float = 0.25) -> torch.Tensor:
        """Apply ``fn`` to overlapping ``tile``×``tile`` crops of ``x`` and blend them.

        Tiles start every ``tile·(1 − overlap)`` input units. Each output tile
        is linearly cross-faded with its (already blended) upper and left
        neighbours over ``overlap·tile·ratio`` output units, then trimmed so
        the kept parts tile the output exactly (the scheme of diffusers'
        ``tiled_decode``). ``ratio`` = output units per input unit.
        """
        stride = int(tile * (1 - overlap))
        out_tile = int(tile * ratio)
        blend = int(out_tile * overlap)
        keep = out_tile - blend
        rows: list[list[torch.Tensor]] = []
        for i in range(0, x.shape[2], stride):
            row = []
            for j in range(0, x.shape[3], stride):
                y = fn(x[:, :, i:i + tile, j:j + tile])
                if rows:
                    y = _cross_fade(rows[-1][len(row)], y, blend, dim=2)
                if row:
                    y = _cross_fade(row[-1], y, blend, dim=3)
                row.append(y)
            rows.append(row)
        return torch.cat([torch.cat([t[:, :, :keep, :keep] for t in row], dim=3) for row in rows], dim=2)

    # -- loading and saving -------------------------------------------------
    @classmethod
    def from_config_dict(cls, config: Mapping) -> "AutoencoderKL":
        """A randomly initialised model from a diffusers ``config.json`` dict."""
        return cls(VAEConfig.from_dict(config))

    @classmethod
    def from_pretrained(cls, folder: str | Path, dtype: torch.dtype = torch.float32) -> "AutoencoderKL":
        """Load a diffusers VAE folder (``config.json`` + ``diffusion_pytorch_model.safetensors``).

        ``folder`` may also be a whole pipeline folder with a ``vae/`` inside.
        Keys and shapes must match exactly (see :func:`ministd.weights.load_strict`);
        the network is built on the meta device and takes the tensors, read once in ``dtype``.
        """
        folder = Path(folder)
        if (folder / "vae" / "config.json").is_file():
            folder = folder / "vae"
        config = VAEConfig.from_dict(read_json(folder / "config.json"))
        model = build_on_meta(lambda: cls(config))
        load_strict(model, read_weights(folder, DIFFUSERS_WEIGHTS, dtype=dtype), source=str(folder))
        return model._finish_loading(dtype)

    @classmethod
    def from_original_state_dict(cls, state_dict: Mapping[str, torch.Tensor],
                                 config: VAEConfig | Mapping | None = None,
                                 dtype: torch.dtype = torch.float32) -> "AutoencoderKL":
        """Load the VAE of an original single-file checkpoint (keys ``first_stage_model.*``).

        A dict whose keys already lack the prefix is accepted too. ``config``
        defaults to the SD 1.x/2.x VAE (pass ``scaling_factor=0.13025`` for SDXL).
        """
        if config is None:
            config = VAEConfig()
        elif not isinstance(config, VAEConfig):
            config = VAEConfig.from_dict(config)
        model = cls(config)
        load_strict(model, convert_original_vae_state_dict(state_dict), source="original VAE state dict")
        return model._finish_loading(dtype)

    @classmethod
    def load(cls, weights: str | Path, config: str | Path | None = None,
             dtype: torch.dtype = torch.float32) -> "AutoencoderKL":
        """Load a ``name.safetensors`` + ``name.json`` pair written by :meth:`save` (e.g. data/shapes_vae)."""
        model = load_model(weights, lambda fields: cls(VAEConfig.from_dict(fields)), dtype=dtype, config=config)
        return model._finish_loading(dtype)

    def save(self, weights: str | Path, dtype: torch.dtype | None = torch.float16,
             extra_config: Mapping | None = None) -> None:
        """Write weights (float16 by default) and the config as ``.safetensors`` + ``.json``
        (:func:`ministd.weights.save_model`)."""
        save_model(self, weights, self.config.to_dict(), dtype=dtype, extra_config=extra_config)

    def _finish_loading(self, dtype: torch.dtype) -> "AutoencoderKL":
        self.to(dtype).eval()
        if dtype == torch.float16 and self.config.force_upcast:
            self.upcast_decoder()       # bfloat16 has float32's range: it decodes as it is, as in diffusers
        return self


def load_shapes_vae(dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> AutoencoderKL:
    """The shipped ShapesWorld VAE (64×64×3 pictures <-> 16×16×4 latents), in eval mode."""
    return AutoencoderKL.load(SHAPES_VAE_PATH, dtype=dtype).to(device)


def _cross_fade(a: torch.Tensor, b: torch.Tensor, extent: int, dim: int) -> torch.Tensor:
    """Blend the last ``extent`` rows (dim=2) or columns (dim=3) of ``a`` into the first of ``b``.

    Weight of ``b`` rises linearly 0, 1/extent, ..., (extent−1)/extent.
    """
    extent = min(a.shape[dim], b.shape[dim], extent)
    if extent == 0:
        return b
    w = torch.arange(extent, dtype=b.dtype, device=b.device) / extent
    w = w.view(-1, 1) if dim == 2 else w.view(1, -1)
    head = a.narrow(dim, a.shape[dim] - extent, extent) * (1 - w) + b.narrow(dim, 0, extent) * w
    return torch.cat([head, b.narrow(dim, extent, b.shape[dim] - extent)], dim=dim)


# --------------------------------------------------------------------------- #
# The original (CompVis / Stability) single-file layout
# --------------------------------------------------------------------------- #

# inside the middle block's attention: original -> ours
ATTENTION_ORIGINAL = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


def original_prefixes(levels: int, encoder_blocks: int, decoder_blocks: int) -> dict[str, str]:
    """The key map from the original layout, as a table: original module prefix -> ours.

    For a VAE of ``levels`` resolution levels with ``encoder_blocks`` ResNet
    blocks per encoder level and ``decoder_blocks`` per decoder level
    (``layers_per_block`` and one more). The layouts differ in

    * names: ``down.{i}.block.{j}`` -> ``down_blocks.{i}.resnets.{j}``, ``mid.block_1`` ->
      ``mid_block.resnets.0``, ``mid.attn_1.q`` -> ``mid_block.attentions.0.to_q``,
      ``nin_shortcut`` -> ``conv_shortcut``, ``norm_out`` -> ``conv_norm_out``;
    * the order of decoder levels: the original ``up.{i}`` counts from the *highest*
      resolution, ours from the lowest, so ``up.{i}`` -> ``up_blocks.{levels-1-i}``.
    """
    table: dict[str, str] = {}
    for part, kind, ours_kind, blocks, sampler in (("encoder", "down", "down_blocks", encoder_blocks, "downsample"),
                                                   ("decoder", "up", "up_blocks", decoder_blocks, "upsample")):
        for i in range(levels):
            level = i if kind == "down" else levels - 1 - i
            theirs, ours = f"{part}.{kind}.{i}.", f"{part}.{ours_kind}.{level}."
            for j in range(blocks):
                table[f"{theirs}block.{j}."] = f"{ours}resnets.{j}."
                table[f"{theirs}block.{j}.nin_shortcut."] = f"{ours}resnets.{j}.conv_shortcut."
            table[f"{theirs}{sampler}."] = f"{ours}{sampler}rs.0."
        table[f"{part}.mid.block_1."] = f"{part}.mid_block.resnets.0."
        table[f"{part}.mid.block_2."] = f"{part}.mid_block.resnets.1."
        for a, b in ATTENTION_ORIGINAL.items():
            table[f"{part}.mid.attn_1.{a}."] = f"{part}.mid_block.attentions.0.{b}."
        table[f"{part}.norm_out."] = f"{part}.conv_norm_out."
    return table


def _count(keys, pattern: str) -> int:
    """1 + the largest number ``pattern`` (a regex with one group) finds in ``keys``, or 0."""
    found = [int(m.group(1)) for k in keys if (m := re.match(pattern, k))]
    return max(found) + 1 if found else 0


def convert_original_vae_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an original-layout VAE state dict to ours (the diffusers names).

    ``first_stage_model.`` is stripped if present. Names follow the table of
    :func:`original_prefixes`, sized by the levels and blocks the keys show; the
    middle attention's projections are 1×1 convolutions [C, C, 1, 1] there and
    linear layers [C, C] here. Keys that match no entry are passed through
    unchanged, so a strict load reports them as unexpected instead of dropping them.
    """
    if any(k.startswith("first_stage_model.") for k in state_dict):
        state_dict = strip_prefix(state_dict, "first_stage_model.")
    table = original_prefixes(levels=max(_count(state_dict, r"encoder\.down\.(\d+)\."),
                                         _count(state_dict, r"decoder\.up\.(\d+)\.")),
                              encoder_blocks=_count(state_dict, r"encoder\.down\.\d+\.block\.(\d+)\."),
                              decoder_blocks=_count(state_dict, r"decoder\.up\.\d+\.block\.(\d+)\."))
    out = {}
    for key, value in state_dict.items():
        new = rename_by_prefix(key, table)
        if ".attentions.0.to_" in new and new.endswith(".weight") and value.ndim == 4:
            value = value[:, :, 0, 0]  # 1×1 conv -> linear
        out[new] = value
    return out
