"""Training code used by the book and the model-zoo scripts.

``ministd.train`` itself (chapter 02) holds the diffusion training objective;
the submodules train the shipped ShapesWorld models:
``python -m ministd.train vae|clip|unet ...``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ministd.schedules import NoiseSchedule

PREDICTION_TARGETS = ("epsilon", "v_prediction", "sample")
LOSS_WEIGHTINGS = ("uniform", "min_snr")


@dataclass
class DiffusionLossTerms:
    """Everything one evaluation of the training objective used (handy for plots).

    loss: scalar; t: [B] timesteps; noise, x_t, target, prediction: [B, ...];
    weights: [B] per-example loss weights.
    """

    loss: torch.Tensor
    t: torch.Tensor
    noise: torch.Tensor
    x_t: torch.Tensor
    target: torch.Tensor
    prediction: torch.Tensor
    weights: torch.Tensor


def loss_weights(
    schedule: NoiseSchedule, t: torch.Tensor, prediction_type: str = "epsilon",
    weighting: str = "uniform", snr_gamma: float = 5.0,
) -> torch.Tensor:
    """Per-example weights of the mean-squared error, [B].

    * ``uniform``: 1 for every t: Ho et al. 2020's "simple" loss (section 3.4);
      with an epsilon target it over-weights nearly clean images, whose noise
      is easy to see, relative to the likelihood bound.
    * ``min_snr``: min-SNR-gamma (Hang et al. 2023, "Efficient Diffusion
      Training via Min-SNR Weighting Strategy"): weight the x0 error by
      min(SNR, gamma), so easy low-noise steps stop dominating. Written for the
      target actually regressed: epsilon -> min(SNR, gamma) / SNR,
      v -> min(SNR, gamma) / (SNR + 1), x0 -> min(SNR, gamma).
    """
    if weighting not in LOSS_WEIGHTINGS:
        raise ValueError(f"weighting must be one of {LOSS_WEIGHTINGS}, got {weighting!r}")
    if prediction_type not in PREDICTION_TARGETS:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TARGETS}, got {prediction_type!r}")
    if weighting == "uniform":
        return torch.ones(t.shape, dtype=torch.float32, device=t.device)
    if not snr_gamma > 0:
        raise ValueError(f"snr_gamma must be > 0, got {snr_gamma}")
    snr = schedule.snr.to(t.device)[t].float()
    clipped = torch.clamp(snr, max=snr_gamma)
    if prediction_type == "epsilon":
        return torch.clamp(snr_gamma / snr, max=1.0)  # = min(SNR, gamma) / SNR, and 1 where SNR = 0
    if prediction_type == "v_prediction":
        return clipped / (snr + 1)
    return clipped


def diffusion_loss_terms(
    model,
    x0: torch.Tensor,
    schedule: NoiseSchedule,
    *,
    prediction_type: str = "epsilon",
    weighting: str = "uniform",
    snr_gamma: float = 5.0,
    t: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    **model_kwargs,
) -> DiffusionLossTerms:
    """One evaluation of the denoising objective (Ho et al. 2020, Algorithm 1).

    1. pick a timestep t ~ Uniform{0, ..., T-1} per example (or use ``t``)
    2. pick noise eps ~ N(0, I) (or use ``noise``)
    3. make x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps
    4. ask the model: prediction = model(x_t, t, **model_kwargs)
    5. regress the target: eps ("epsilon"), v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x0
       ("v_prediction", Salimans & Ho 2022) or x0 ("sample"), with the MSE
       averaged over each example, weighted (``loss_weights``), then averaged over the batch.

    x0: [B, ...] clean data (images in [-1, 1], latents, or 2D points).
    """
    if prediction_type not in PREDICTION_TARGETS:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TARGETS}, got {prediction_type!r}")
    if weighting not in LOSS_WEIGHTINGS:
        raise ValueError(f"weighting must be one of {LOSS_WEIGHTINGS}, got {weighting!r}")
    B = x0.shape[0]
    T = schedule.num_train_timesteps
    if t is None:
        t = torch.randint(0, T, (B,), generator=generator, device="cpu" if generator is None else generator.device)
    t = torch.as_tensor(t).to(x0.device).long().reshape(-1)
    if t.shape != (B,):
        raise ValueError(f"t must hold one timestep per example, shape ({B},), got {tuple(t.shape)}")
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype,
                            device="cpu" if generator is None else generator.device).to(x0.device)
    x_t = schedule.add_noise(x0, noise, t)  # validates t in [0, T)
    if prediction_type == "epsilon":
        target = noise
    elif prediction_type == "v_prediction":
        target = schedule.get_velocity(x0, noise, t)
    else:
        target = x0
    prediction = model(x_t, t, **model_kwargs)
    if prediction.shape != target.shape:
        raise ValueError(f"model output shape {tuple(prediction.shape)} must equal x0 shape {tuple(target.shape)}")
    per_example = ((prediction.float() - target.float()) ** 2).reshape(B, -1).mean(dim=1)
    weights = loss_weights(schedule, t, prediction_type, weighting, snr_gamma)
    loss = (weights * per_example).mean()
    return DiffusionLossTerms(loss, t, noise, x_t, target, prediction, weights)


def diffusion_loss(model, x0: torch.Tensor, schedule: NoiseSchedule, **kwargs) -> torch.Tensor:
    """The scalar training loss; see ``diffusion_loss_terms`` for the recipe and options."""
    return diffusion_loss_terms(model, x0, schedule, **kwargs).loss


def training_step(model, optimizer: torch.optim.Optimizer, x0: torch.Tensor, schedule: NoiseSchedule, **kwargs) -> float:
    """One optimiser step on ``diffusion_loss``; returns the loss as a float."""
    optimizer.zero_grad(set_to_none=True)
    loss = diffusion_loss(model, x0, schedule, **kwargs)
    loss.backward()
    optimizer.step()
    return float(loss.detach())


# ---------------------------------------------------------------------------
# tiny denoisers for the book's small experiments (chapters 02-03)
# ---------------------------------------------------------------------------


def timestep_features(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features of the timestep, [B] -> [B, dim] (Vaswani et al. 2017; DDPM uses the same).

    Frequencies are spread geometrically from 1 to 1/max_period, so nearby
    timesteps get similar features and distant ones can be told apart.
    """
    half = dim // 2
    freqs = torch.exp(-torch.log(torch.tensor(max_period)) * torch.arange(half, device=t.device) / half)
    angles = t.float().reshape(-1, 1) * freqs.reshape(1, -1)
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)


class PointDenoiser(nn.Module):
    """A small MLP that predicts the noise in 2D points: (x_t [B, 2], t [B]) -> [B, 2]."""

    def __init__(self, hidden: int = 128, time_dim: int = 32):
        super().__init__()
        self.time_dim = time_dim
        self.net = nn.Sequential(
            nn.Linear(2 + time_dim, hidden), nn.SiLU(),
            nn.Linear(hidden, hidden), nn.SiLU(),
            nn.Linear(hidden, hidden), nn.SiLU(),
            nn.Linear(hidden, 2),
        )

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t, device=x.device).float().reshape(-1).expand(x.shape[0])
        return self.net(torch.cat([x, timestep_features(t, self.time_dim)], dim=1))


class _ResBlock(nn.Module):
    """GroupNorm -> SiLU -> conv, twice, with the timestep added in between, plus a skip."""

    def __init__(self, c_in: int, c_out: int, time_dim: int):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(8, c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.time = nn.Linear(time_dim, c_out)
        self.norm2, self.conv2 = nn.GroupNorm(8, c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x, temb):
        h = self.conv1(nn.functional.silu(self.norm1(x)))
        h = h + self.time(temb)[:, :, None, None]
        h = self.conv2(nn.functional.silu(self.norm2(h)))
        return h + self.skip(x)


class TinyPixelDenoiser(nn.Module):
    """A small U-Net without attention for small images: (x_t [B, C, H, W], t [B]) -> [B, C, H, W].

    Pixels are first folded 2x2 into channels (pixel unshuffle, as in many
    fast diffusion models), so the network works at H/2, H/4 and H/8 with
    skip connections between levels of equal size; H and W must be divisible
    by 8. About 0.4 M parameters at ``width=32``: small enough to learn
    something on a laptop CPU in half a minute, the same shape of network as
    SD's U-Net (chapter 08) with everything but the idea removed.
    """

    def __init__(self, channels: int = 3, width: int = 32, time_dim: int = 64):
        super().__init__()
        w = width
        self.time_dim = time_dim
        self.time_mlp = nn.Sequential(nn.Linear(time_dim, time_dim), nn.SiLU(), nn.Linear(time_dim, time_dim))
        self.fold, self.unfold = nn.PixelUnshuffle(2), nn.PixelShuffle(2)
        self.conv_in = nn.Conv2d(4 * channels, w, 3, padding=1)
        self.down1 = _ResBlock(w, w, time_dim)
        self.pool1 = nn.Conv2d(w, w, 3, stride=2, padding=1)
        self.down2 = _ResBlock(w, 2 * w, time_dim)
        self.pool2 = nn.Conv2d(2 * w, 2 * w, 3, stride=2, padding=1)
        self.mid = _ResBlock(2 * w, 2 * w, time_dim)
        self.up2 = _ResBlock(4 * w, 2 * w, time_dim)
        self.up1 = _ResBlock(3 * w, w, time_dim)
        self.norm_out = nn.GroupNorm(8, w)
        self.conv_out = nn.Conv2d(w, 4 * channels, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] % 8 or x.shape[-2] % 8:
            raise ValueError(f"height and width must be divisible by 8, got {tuple(x.shape[-2:])}")
        t = torch.as_tensor(t, device=x.device).float().reshape(-1).expand(x.shape[0])
        temb = self.time_mlp(timestep_features(t, self.time_dim))
        h1 = self.down1(self.conv_in(self.fold(x)), temb)  # H/2
        h2 = self.down2(self.pool1(h1), temb)  # H/4
        h = self.mid(self.pool2(h2), temb)  # H/8
        h = nn.functional.interpolate(h, scale_factor=2.0, mode="nearest")
        h = self.up2(torch.cat([h, h2], dim=1), temb)
        h = nn.functional.interpolate(h, scale_factor=2.0, mode="nearest")
        h = self.up1(torch.cat([h, h1], dim=1), temb)
        return self.unfold(self.conv_out(nn.functional.silu(self.norm_out(h))))


class IdealDenoiser(nn.Module):
    """The best possible denoiser for a finite data set, in closed form (no training).

    If the data are exactly the N examples y_i, then x_t / sqrt(alpha_bar) = x0 + sigma eps
    with sigma^2 = (1 - alpha_bar) / alpha_bar, and the minimum-MSE estimate of x0 is a
    softmax-weighted average of the examples (Karras et al. 2022, "Elucidating the
    Design Space", appendix B.3, the "ideal denoiser"):

        x0_hat = sum_i w_i y_i,   w = softmax_i( -|x_t / sqrt(alpha_bar) - y_i|^2 / (2 sigma^2) )

    Sampling with it reproduces training examples exactly (it has memorised them),
    which makes it a clean instrument for comparing samplers: every error
    is the sampler's. Forward: (x_t [B, ...], t [B] or scalar, may be fractional) ->
    the prediction of ``prediction_type`` ("epsilon", "v_prediction" or "sample").
    """

    def __init__(self, data: torch.Tensor, schedule: NoiseSchedule, prediction_type: str = "epsilon"):
        super().__init__()
        if prediction_type not in PREDICTION_TARGETS:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TARGETS}, got {prediction_type!r}")
        self.register_buffer("data", data.float().reshape(data.shape[0], -1))
        self.schedule, self.prediction_type = schedule, prediction_type

    def alpha_bar(self, t: torch.Tensor) -> torch.Tensor:
        """alpha_bar at (possibly fractional) timesteps, via sigma interpolated linearly in t as the Euler samplers do."""
        sig = self.schedule.sigmas.double()
        t = t.double().clamp(0, len(sig) - 1)
        lo = t.floor().long().clamp(max=len(sig) - 2)
        w = t - lo
        sigma = (1 - w) * sig[lo] + w * sig[lo + 1]
        return (1 / (sigma**2 + 1)).float()

    def forward(self, x: torch.Tensor, t) -> torch.Tensor:
        B = x.shape[0]
        t = torch.as_tensor(t, device=x.device).reshape(-1).expand(B)
        ab = self.alpha_bar(t).to(x.device).reshape(B, 1)
        flat = x.float().reshape(B, -1)
        z = flat / ab.sqrt()  # = x0 + sigma * eps
        sigma2 = (1 - ab) / ab
        d2 = torch.cdist(z, self.data) ** 2  # [B, N]
        w = torch.softmax(-d2 / (2 * sigma2), dim=1)
        x0 = w @ self.data
        if self.prediction_type == "sample":
            out = x0
        else:
            eps = (flat - ab.sqrt() * x0) / (1 - ab).sqrt()
            out = eps if self.prediction_type == "epsilon" else ab.sqrt() * eps - (1 - ab).sqrt() * x0
        return out.reshape(x.shape).to(x.dtype)
