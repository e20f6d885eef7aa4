"""Noise schedules and the forward diffusion process (chapter 01).

Diffusion destroys an image x0 a little at a time. At training step t
(0 <= t < T, T = ``num_train_timesteps``, usually 1000) a fraction beta_t of
the signal's variance is replaced by fresh Gaussian noise:

    q(x_t | x_{t-1}) = N( sqrt(1 - beta_t) x_{t-1},  beta_t I )

Because Gaussians compose, we can jump straight from x0 to any x_t
(Ho et al. 2020, "Denoising Diffusion Probabilistic Models", eq. 4):

    q(x_t | x0) = N( sqrt(alpha_bar_t) x0,  (1 - alpha_bar_t) I )
    x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps,   eps ~ N(0, I)

with alpha_t = 1 - beta_t and alpha_bar_t = prod_{s<=t} alpha_s
(``alphas_cumprod``). Everything a sampler needs follows from alpha_bar:

* signal-to-noise ratio  SNR_t = alpha_bar_t / (1 - alpha_bar_t)
* the "sigma" of Karras et al. 2022 (EDM), sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t)
  = 1 / sqrt(SNR_t): the noise level of x_t / sqrt(alpha_bar_t) = x0 + sigma_t eps.

Three beta schedules are used by real models:

* ``linear``: beta from 1e-4 to 0.02 (DDPM);
* ``scaled_linear``: sqrt(beta) linear from sqrt(0.00085) to sqrt(0.012), the
  latent-diffusion schedule every Stable Diffusion checkpoint was trained with;
* ``squaredcos_cap_v2``: alpha_bar_t = cos^2(((t/T + 0.008) / 1.008) pi/2)
  (Nichol & Dhariwal 2021, "Improved DDPM", eq. 17), betas capped at 0.999.

``rescale_zero_terminal_snr`` (Lin et al. 2023, "Common Diffusion Noise
Schedules and Sample Steps are Flawed", Algorithm 1) shifts a schedule so
that the last step is pure noise (SNR_T = 0).

A model may be trained to predict the noise eps, the clean image x0
("sample"), or the velocity v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x0
(Salimans & Ho 2022, "Progressive Distillation", section 4; SD 2.x uses v).
``convert_prediction`` turns any one into the others.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


# ---------------------------------------------------------------------------
# beta schedules
# ---------------------------------------------------------------------------


def cosine_betas(num_train_timesteps: int, max_beta: float = 0.999) -> torch.Tensor:
    """Betas of the cosine schedule (Nichol & Dhariwal 2021, eq. 17), float32 [T].

    alpha_bar(s) = cos^2(((s + 0.008) / 1.008) * pi / 2) for s in [0, 1], and
    beta_t = 1 - alpha_bar((t+1)/T) / alpha_bar(t/T), capped at ``max_beta``
    so the last step does not divide by a number near zero.
    """

    def alpha_bar(s: float) -> float:
        return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

    T = num_train_timesteps
    betas = [min(1 - alpha_bar((t + 1) / T) / alpha_bar(t / T), max_beta) for t in range(T)]
    return torch.tensor(betas, dtype=torch.float32)


def make_betas(
    beta_schedule: str = "scaled_linear",
    num_train_timesteps: int = 1000,
    beta_start: float = 0.00085,
    beta_end: float = 0.012,
) -> torch.Tensor:
    """The betas of a named schedule, float32 tensor of shape [num_train_timesteps].

    ``beta_start`` / ``beta_end`` are used by ``linear`` (beta itself is linear)
    and ``scaled_linear`` (sqrt(beta) is linear); the cosine schedule has no range.
    """
    if beta_schedule not in BETA_SCHEDULES:
        raise ValueError(f"beta_schedule must be one of {BETA_SCHEDULES}, got {beta_schedule!r}")
    if not isinstance(num_train_timesteps, int) or num_train_timesteps < 2:
        raise ValueError(f"num_train_timesteps must be an integer >= 2, got {num_train_timesteps!r}")
    T = num_train_timesteps
    if beta_schedule == "linear":
        return torch.linspace(beta_start, beta_end, T, dtype=torch.float32)
    if beta_schedule == "scaled_linear":
        # linear in sqrt(beta): the latent-diffusion (Stable Diffusion) schedule
        return torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=torch.float32) ** 2
    return cosine_betas(T)


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Rescale betas so the final timestep has SNR exactly 0 (Lin et al. 2023, Alg. 1).

    sqrt(alpha_bar) is shifted so its last value is 0, then scaled so its first
    value is unchanged; betas are recovered from the new alpha_bar. Models
    trained this way can make very dark and very bright images; they need
    v-prediction, because at SNR 0 an epsilon prediction says nothing about x0.
    """
    sqrt_ab = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
    sqrt_ab = (sqrt_ab - last) * (first / (first - last))
    alphas_cumprod = sqrt_ab**2
    alphas = torch.cat([alphas_cumprod[:1], alphas_cumprod[1:] / alphas_cumprod[:-1]])
    return 1.0 - alphas


# ---------------------------------------------------------------------------
# the schedule object: alpha_bar and everything derived from it
# ---------------------------------------------------------------------------


@dataclass
class NoiseSchedule:
    """A training noise schedule and the forward process it defines.

    Defaults are Stable Diffusion's (``scaled_linear`` 0.00085..0.012 over
    1000 steps). After construction the tensors ``betas``, ``alphas`` and
    ``alphas_cumprod`` (all float32, shape [num_train_timesteps]) are set.

    >>> s = NoiseSchedule()
    >>> x_t = s.add_noise(x0, torch.randn_like(x0), t=500)
    """

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    rescale_betas_zero_snr: bool = False
    betas: torch.Tensor = field(init=False, repr=False)
    alphas: torch.Tensor = field(init=False, repr=False)
    alphas_cumprod: torch.Tensor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        betas = make_betas(self.beta_schedule, self.num_train_timesteps, self.beta_start, self.beta_end)
        if self.rescale_betas_zero_snr:
            betas = rescale_zero_terminal_snr(betas)
        self.betas = betas
        self.alphas = 1.0 - betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)

    # -- derived curves, each [T] ------------------------------------------
    @property
    def snr(self) -> torch.Tensor:
        """Signal-to-noise ratio alpha_bar / (1 - alpha_bar) per timestep, [T]."""
        return self.alphas_cumprod / (1.0 - self.alphas_cumprod)

    @property
    def sigmas(self) -> torch.Tensor:
        """Karras sigma = sqrt((1 - alpha_bar) / alpha_bar) per timestep, [T] (increasing in t)."""
        return ((1.0 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5

    # -- the forward process -------------------------------------------------
    def _alpha_bar_at(self, t, like: torch.Tensor) -> torch.Tensor:
        """alpha_bar at integer timestep(s) ``t``, shaped to broadcast against ``like``.

        ``t`` is an int or an integer tensor of shape [] or [B] (one per batch item).
        """
        t = torch.as_tensor(t, device=self.alphas_cumprod.device)
        if t.is_floating_point():
            if not torch.equal(t, t.round()):
                raise ValueError(f"t must hold integer timesteps, got {t.tolist()}")
            t = t.long()
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= self.num_train_timesteps):
            raise ValueError(
                f"t must be in [0, {self.num_train_timesteps - 1}] (num_train_timesteps - 1), got {t.tolist()}"
            )
        ab = self.alphas_cumprod[t.long()].to(device=like.device, dtype=like.dtype).flatten()
        return ab.reshape(-1, *([1] * (like.ndim - 1))) if ab.numel() > 1 else ab.reshape([])

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t) -> torch.Tensor:
        """Sample q(x_t | x0): sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) noise (DDPM eq. 4).

        x0, noise: [B, ...]; t: int or LongTensor [B]. Returns x_t, same shape as x0.
        """
        if x0.shape != noise.shape:
            raise ValueError(f"x0 and noise must have the same shape, got {tuple(x0.shape)} and {tuple(noise.shape)}")
        ab = self._alpha_bar_at(t, x0)
        return ab.sqrt() * x0 + (1.0 - ab).sqrt() * noise

    def get_velocity(self, x0: torch.Tensor, noise: torch.Tensor, t) -> torch.Tensor:
        """The v-prediction target v = sqrt(alpha_bar) noise - sqrt(1 - alpha_bar) x0."""
        ab = self._alpha_bar_at(t, x0)
        return ab.sqrt() * noise - (1.0 - ab).sqrt() * x0

    def convert(self, model_output: torch.Tensor, x_t: torch.Tensor, t, from_type: str, to_type: str):
        """``convert_prediction`` at integer timestep(s) t of this schedule."""
        return convert_prediction(model_output, x_t, self._alpha_bar_at(t, x_t), from_type, to_type)


# ---------------------------------------------------------------------------
# prediction types: epsilon, x0 ("sample") and v are interchangeable given x_t
# ---------------------------------------------------------------------------


def convert_prediction(
    model_output: torch.Tensor,
    x_t: torch.Tensor,
    alpha_bar: torch.Tensor | float | None,
    from_type: str,
    to_type: str,
    *,
    alpha: torch.Tensor | float | None = None,
    sigma: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """Turn a prediction of one kind into another, given the noisy input x_t.

    The one place where epsilon, x0 and v are converted: every sampler (chapter 03)
    and the training code call it. With a = sqrt(alpha_bar), b = sqrt(1 - alpha_bar)
    and the variance-preserving x_t = a x0 + b eps (DDPM, DDIM, PNDM, DPM-Solver++):

        from eps:  x0 = (x_t - b eps) / a
        from x0:   eps = (x_t - a x0) / b
        from v:    x0 = a x_t - b v,   eps = a v + b x_t     (since a^2 + b^2 = 1)
        v = a eps - b x0

    ``from_type`` / ``to_type``: "epsilon", "sample" (x0) or "v_prediction".
    ``alpha_bar`` is a float or a tensor broadcastable to x_t (a tensor keeps its own
    dtype, as in the reference schedulers: half-precision samples meet float32
    coefficients).

    Samplers that already hold the coefficients pass ``alpha_bar=None`` and:

    - ``alpha=a, sigma=b``: the same variance-preserving form with a and b given
      (DPM-Solver++ keeps them, computed from its sigmas);
    - ``sigma=s`` alone: the Karras form x_t = x0 + s eps that Euler, Euler a and Heun
      keep (the VP sample divided by a, s = b / a). Then x0 = x_t - s eps; v, defined on
      the VP sample, gives x0 = x_t / (s^2 + 1) - v s / sqrt(s^2 + 1).

    Each form is written as the reference (diffusers) writes it, so samplers built on
    this function match it to float64 rounding.
    """
    for name, value in (("from_type", from_type), ("to_type", to_type)):
        if value not in PREDICTION_TYPES:
            raise ValueError(f"{name} must be one of {PREDICTION_TYPES}, got {value!r}")
    if (alpha_bar is None) == (sigma is None) or (alpha is not None and sigma is None):
        raise ValueError("give alpha_bar, or sigma (with alpha for the variance-preserving form)")
    if from_type == to_type:
        return model_output

    def coefficient(value):
        if isinstance(value, torch.Tensor):
            return value.to(x_t.device)
        return torch.tensor(value, dtype=x_t.dtype, device=x_t.device)

    karras = alpha_bar is None and alpha is None
    if alpha_bar is not None:
        alpha_bar = coefficient(alpha_bar)
        a, b = alpha_bar.sqrt(), (1.0 - alpha_bar).sqrt()
    elif not karras:
        a, b = coefficient(alpha), coefficient(sigma)
    else:
        s = coefficient(sigma)
        norm = (s**2 + 1) ** 0.5                     # x_t * ... / norm is the VP sample
    # first recover (x0, eps), then build what was asked for
    if from_type == "epsilon":
        eps = model_output
        x0 = x_t - s * eps if karras else (x_t - b * eps) / a
    elif from_type == "sample":
        x0 = model_output
        eps = (x_t - x0) / s if karras else (x_t - a * x0) / b
    elif karras:  # v_prediction, Karras form
        x0 = model_output * (-s / norm) + x_t / (s**2 + 1)
        eps = (x_t - x0) / s
    else:  # v_prediction
        x0 = a * x_t - b * model_output
        eps = a * model_output + b * x_t
    if to_type == "epsilon":
        return eps
    if to_type == "sample":
        return x0
    return (eps - s * x0) / norm if karras else a * eps - b * x0
