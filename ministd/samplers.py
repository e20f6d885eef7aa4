"""Samplers: walking the diffusion process backwards (chapter 03).

A trained network tells us, for a noisy x_t, which noise (or clean image, or
velocity) it sees. A *sampler* turns that into a sequence of smaller and
smaller noise levels, from pure noise to an image. Every sampler here shares
one small interface, the one every pipeline in the book uses::

    sampler = make_sampler("euler", prediction_type="epsilon")
    sampler.set_timesteps(30)                       # or (30, strength=0.6) for img2img
    x = torch.randn(shape, generator=g) * sampler.init_noise_sigma
    for t in sampler.timesteps:
        out = model(sampler.scale_model_input(x, t), t)
        step = sampler.step(out, t, x, generator=g)
        x = step.prev_sample                        # step.pred_original_sample: the x0 preview

The samplers, and where each update comes from:

=================  ==========================================================
``ddpm``           ancestral sampling of the learned reverse chain,
                   Ho et al. 2020, eq. 6-7 (posterior mean and variance)
``ddim``           Song et al. 2021, "Denoising Diffusion Implicit Models", eq. 12
                   (eta = 0 deterministic, eta = 1 DDPM-like)
``pndm``/``plms``  Liu et al. 2022, "Pseudo Numerical Methods for Diffusion
                   Models": the transfer of eq. 9 driven by a linear multistep
                   (Adams-Bashforth) combination of noise predictions;
                   SD 1.x's default (``skip_prk_steps``)
``euler``          Karras et al. 2022 (EDM), Algorithm 1 without the Heun
                   correction: Euler steps of dx/dsigma = (x - x0) / sigma
``euler_a``        Euler ancestral (k-diffusion): step down to sigma_down, then
                   add fresh noise of size sigma_up
``heun``           Karras et al. 2022, Algorithm 1 (2nd order, 2 evaluations per step)
``dpmpp_2m``       Lu et al. 2022, "DPM-Solver++", Algorithm 2 (multistep,
                   2nd order, works on x0 predictions in lambda = log(alpha/sigma))
=================  ==========================================================

Numerically each sampler follows the reference implementation, diffusers'
scheduler of the same configuration (``tests/test_samplers.py`` checks
timesteps, sigmas and whole trajectories to rtol 1e-5), including its
conventions where they are choices rather than mathematics (which timesteps
``leading`` / ``trailing`` / ``linspace`` spacing give; DDIM and PLMS step to
``t - T // N`` whatever the spacing). ``from_scheduler_config`` reads a
diffusers ``scheduler_config.json`` dict.

Two kinds of state space appear. DDPM, DDIM, PNDM and DPM-Solver++ keep the
"variance preserving" x_t = sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) eps. The
Karras-style samplers (Euler, Euler a, Heun) keep x_t / sqrt(alpha_bar) =
x0 + sigma eps, whose variance grows to about sigma_max^2: that is why their
``init_noise_sigma`` is large and ``scale_model_input`` divides by
sqrt(sigma^2 + 1) before the network sees it.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import numpy as np
import torch

from ministd.schedules import PREDICTION_TYPES, NoiseSchedule, convert_prediction

SPACINGS = ("leading", "trailing", "linspace")


# ---------------------------------------------------------------------------
# configuration and output
# ---------------------------------------------------------------------------


@dataclass
class SamplerConfig:
    """Everything that decides a sampler's arithmetic. Defaults are SD 1.x's.

    The first block must match how the model was trained; the rest are
    choices made at sampling time. Fields that a sampler does not use are
    ignored by it.
    """

    # training schedule (must match the model)
    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    rescale_betas_zero_snr: bool = False
    prediction_type: str = "epsilon"  # "epsilon" | "v_prediction" | "sample"
    # which timesteps N inference steps visit
    timestep_spacing: str = "leading"  # "leading" | "trailing" | "linspace"
    steps_offset: int = 1
    # DDPM / DDIM / PNDM
    set_alpha_to_one: bool = False  # what alpha_bar the last DDIM/PNDM step lands on (1 or alpha_bar_0)
    clip_sample: bool = False  # clamp the x0 prediction to +-clip_sample_range (DDPM, DDIM, Heun)
    clip_sample_range: float = 1.0
    variance_type: str = "fixed_small"  # DDPM: "fixed_small" (posterior beta tilde) | "fixed_large" (beta)
    eta: float = 0.0  # DDIM: 0 deterministic ... 1 as noisy as DDPM
    skip_prk_steps: bool = True  # PNDM: start with cheap PLMS warm-up instead of 3 Runge-Kutta steps
    # sigma-based samplers
    use_karras_sigmas: bool = False  # Euler, Heun, DPM++ 2M: Karras et al. 2022 eq. 5, rho = 7
    # DPM-Solver++
    solver_order: int = 2  # 1 or 2
    solver_type: str = "midpoint"  # "midpoint" | "heun" (how the 2nd-order correction is formed)
    lower_order_final: bool = True  # kept for config round trips; affects 3rd-order solvers only
    euler_at_final: bool = False  # likewise


@dataclass
class SamplerOutput:
    """Result of one ``step``: the sample at the next noise level and the current x0 estimate."""

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor


# ---------------------------------------------------------------------------
# where the inference steps go
# ---------------------------------------------------------------------------


def spaced_timesteps(num_inference_steps: int, num_train_timesteps: int, spacing: str, steps_offset: int = 0) -> np.ndarray:
    """N timesteps in [0, T) in decreasing order, float64 (Lin et al. 2023, Table 2).

    * ``linspace``: N points evenly from 0 to T-1 inclusive (fractional, e.g. 946.42)
    * ``leading``: 0, T//N, 2T//N, ... plus ``steps_offset``; the first step is
      well below T-1 (951 for 20 steps with offset 1), so it never sees pure noise
    * ``trailing``: T, T - T/N, ... rounded, minus 1; always starts at T-1
    """
    N, T = num_inference_steps, num_train_timesteps
    if spacing == "linspace":
        ts = np.linspace(0, T - 1, N)[::-1]
    elif spacing == "leading":
        ts = (np.arange(N) * (T // N)).astype(np.float64)[::-1] + steps_offset
    elif spacing == "trailing":
        # T - i*T/N for i < N, computed as the reference does, with np.arange(T, 0, -T/N):
        # where i*T/N is a tie (N = 48, i = 3: 937.5) arange's rounding decides which way
        # it goes (938 there, 937 from T - i*T/N). For some N (61, 103, ...) that arange
        # gets one extra, negative, timestep: we take exactly N
        ts = np.round(np.arange(T, 0, -T / N)[:N]) - 1
    else:
        raise ValueError(f"timestep_spacing must be one of {SPACINGS}, got {spacing!r}")
    return ts.copy()


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> np.ndarray:
    """Noise levels of Karras et al. 2022 eq. 5: evenly spaced in sigma^(1/rho), n values, decreasing.

    rho = 7 spends more of the steps at low noise, where details are made.
    """
    ramp = np.linspace(0, 1, n)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def sigma_to_timestep(sigmas: np.ndarray, sigma_table: np.ndarray) -> np.ndarray:
    """Fractional timestep whose sigma is ``sigmas``: linear interpolation in log sigma.

    ``sigma_table`` [T] is sqrt((1 - alpha_bar_t) / alpha_bar_t), increasing in t.
    Values outside the table are clamped to timestep 0 or T-1. The log of the
    table is taken in float32, as the reference does with its float32 table: a
    float64 log moves some float32 timesteps by one unit in the last place.
    """
    log_table = np.log(np.asarray(sigma_table, dtype=np.float32)).astype(np.float64)
    return np.interp(np.log(np.maximum(sigmas, 1e-10)), log_table, np.arange(len(sigma_table), dtype=np.float64))


def _randn(shape, like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Standard normal noise with ``like``'s dtype and device.

    Drawn on the generator's device (a CPU generator gives the same numbers on
    every machine) and then moved, as in the reference implementation.
    """
    device = generator.device if generator is not None else like.device
    return torch.randn(shape, generator=generator, device=device, dtype=like.dtype).to(like.device)


# ---------------------------------------------------------------------------
# the shared machinery
# ---------------------------------------------------------------------------


class Sampler:
    """Common bookkeeping: the schedule, the step counter, img2img starts, input checks.

    Subclasses implement ``_make_timesteps`` (fill ``self._timesteps``, and
    ``self._sigmas`` where the update works on sigmas) and ``_step``.
    """

    name = "sampler"
    order = 1  # model evaluations per step (Heun: 2); img2img skips order * t_start entries
    sigma_space = False  # True when the state is x0 + sigma * eps (Euler family)

    def __init__(self, config: SamplerConfig | None = None, **overrides):
        config = replace(config or SamplerConfig(), **overrides)
        self._check_config(config)
        self.config = config
        self.schedule = NoiseSchedule(
            num_train_timesteps=config.num_train_timesteps,
            beta_start=config.beta_start,
            beta_end=config.beta_end,
            beta_schedule=config.beta_schedule,
            rescale_betas_zero_snr=config.rescale_betas_zero_snr,
        )
        self.alphas_cumprod = self.schedule.alphas_cumprod
        # alpha_bar after the very last step of DDIM / PNDM (there is no "t = -1")
        self.final_alpha_cumprod = torch.tensor(1.0) if config.set_alpha_to_one else self.alphas_cumprod[0]
        self.num_inference_steps: int | None = None
        self._timesteps: torch.Tensor | None = None
        self._sigmas: torch.Tensor | None = None
        self._begin = 0
        self._index = 0

    # -- configuration checks ---------------------------------------------------
    def _check_config(self, c: SamplerConfig) -> None:
        if c.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {c.prediction_type!r}")
        if c.timestep_spacing not in SPACINGS:
            raise ValueError(f"timestep_spacing must be one of {SPACINGS}, got {c.timestep_spacing!r}")
        if not isinstance(c.steps_offset, int) or c.steps_offset < 0:
            raise ValueError(f"steps_offset must be an integer >= 0, got {c.steps_offset!r}")
        if c.use_karras_sigmas and self.name not in ("euler", "heun", "dpmpp_2m"):
            raise ValueError(
                f"use_karras_sigmas applies to euler, heun and dpmpp_2m only, not {self.name}"
            )

    # -- choosing the steps ------------------------------------------------------
    def set_timesteps(self, num_inference_steps: int, strength: float | None = None) -> None:
        """Choose ``num_inference_steps`` steps; with ``strength`` start part-way (img2img).

        strength in [0, 1] is the fraction of the schedule that is run, as in
        SDEdit and the reference img2img: init = min(int(N * strength), N),
        t_start = max(N - init, 0), and the first ``t_start * order`` entries of
        the timesteps are skipped. The noisy start is ``add_noise(x0, noise,
        timesteps[0])``.
        """
        T = self.config.num_train_timesteps
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, (int, np.integer)):
            raise ValueError(f"num_inference_steps must be an integer in [1, {T}], got {num_inference_steps!r}")
        if not 1 <= num_inference_steps <= T:
            raise ValueError(
                f"num_inference_steps must be in [1, {T}] (1 to num_train_timesteps), got {num_inference_steps}"
            )
        if strength is not None and not (0.0 <= float(strength) <= 1.0):
            raise ValueError(f"strength must be in [0, 1], got {strength}")
        N = int(num_inference_steps)
        self.num_inference_steps = N
        self._make_timesteps(N)
        if float(self._timesteps.min()) < 0 or len(self._timesteps) < N:  # a bug, not bad input
            raise AssertionError(f"internal error: {self.name} made timesteps {self._timesteps.tolist()}")
        if float(self._timesteps.max()) > T - 1:
            raise ValueError(
                f"num_inference_steps={N} with timestep_spacing={self.config.timestep_spacing!r} and "
                f"steps_offset={self.config.steps_offset} reaches timestep {float(self._timesteps.max()):g}, "
                f"beyond num_train_timesteps - 1 = {T - 1}; use fewer steps or steps_offset=0"
            )
        self._reset_state()
        t_start = 0
        if strength is not None:
            init = min(int(N * strength), N)
            t_start = max(N - init, 0)
        # Heun lists 2N - 1 entries: strength 0 skips past the end (nothing left, as in the reference)
        self.set_begin_index(min(t_start * self.order, len(self._timesteps)))

    def set_begin_index(self, begin_index: int) -> None:
        """Start at entry ``begin_index`` of the full timestep list (img2img, refiner hand-off)."""
        if self._timesteps is None:
            raise ValueError("call set_timesteps before set_begin_index")
        if not 0 <= begin_index <= len(self._timesteps):
            raise ValueError(f"begin_index must be in [0, {len(self._timesteps)}], got {begin_index}")
        self._begin = self._index = int(begin_index)

    @property
    def timesteps(self) -> torch.Tensor:
        """The timesteps still to run, in order (the model is called once per entry)."""
        self._require_timesteps()
        return self._timesteps[self._begin :]

    @property
    def sigmas(self) -> torch.Tensor:
        """Noise level sigma = sqrt((1 - alpha_bar) / alpha_bar) of the input at each entry of
        ``timesteps``, followed by that of the final output (length len(timesteps) + 1)."""
        self._require_timesteps()
        if self._sigmas is not None:
            return self._sigmas[self._begin :]
        ab = self.alphas_cumprod[self.timesteps.long()]
        final = self._final_alpha_cumprod_of_chain()
        ab = torch.cat([ab, final.reshape(1)])
        return ((1 - ab) / ab).sqrt()

    def _final_alpha_cumprod_of_chain(self) -> torch.Tensor:
        return self.final_alpha_cumprod

    @property
    def init_noise_sigma(self) -> float:
        """Multiply unit Gaussian noise by this to get the first sample."""
        return 1.0

    def scale_model_input(self, sample: torch.Tensor, timestep) -> torch.Tensor:
        """What the network sees at ``timestep`` (identity for variance-preserving samplers)."""
        self._expect(timestep)
        return sample

    # -- one step ----------------------------------------------------------------
    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None) -> SamplerOutput:
        """Move ``sample`` from ``timestep`` to the next noise level.

        model_output, sample: [B, C, H, W]. ``timestep`` must be the current
        entry of ``timesteps`` (the sampler counts its steps). Raises
        FloatingPointError naming the step if the model output holds NaN or inf.
        """
        i = self._expect(timestep)
        if model_output.shape != sample.shape:
            raise ValueError(
                f"model_output shape {tuple(model_output.shape)} must equal sample shape {tuple(sample.shape)}"
            )
        if not torch.isfinite(model_output).all():
            raise FloatingPointError(
                f"model output contains NaN or inf at step {i - self._begin + 1} of {len(self.timesteps)} "
                f"(timestep {float(timestep):g}); the model or its inputs broke down here "
                "(in float16, try float32 or an fp16-safe VAE/U-Net)"
            )
        out = self._step(model_output, i, sample, generator)
        self._index += 1
        return out

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        """Noise clean samples to ``timesteps`` in this sampler's state space (img2img, inpainting)."""
        return self.schedule.add_noise(original_samples, noise, timesteps)

    # -- helpers shared by the subclasses --------------------------------------------
    def _require_timesteps(self) -> None:
        if self._timesteps is None:
            raise ValueError(f"call set_timesteps(num_inference_steps) before using the {self.name} sampler")

    def _expect(self, timestep) -> int:
        """Check ``timestep`` is the one due now; return its index in the full list."""
        self._require_timesteps()
        i = self._index
        if i >= len(self._timesteps):
            raise ValueError(
                f"the {self.name} sampler has already taken all {len(self.timesteps)} steps; call set_timesteps again"
            )
        t = torch.as_tensor(timestep).flatten()
        expected = float(self._timesteps[i])
        if t.numel() == 0 or not torch.all(t.float() == self._timesteps[i].float()):
            raise ValueError(
                f"timestep {t.tolist()} is not the one due: step {i - self._begin + 1} runs at timestep "
                f"{expected:g}; iterate over sampler.timesteps in order"
            )
        return i

    def _reset_state(self) -> None:
        """Forget multistep history (overridden by samplers that keep some)."""

    def _clip(self, x0: torch.Tensor) -> torch.Tensor:
        r = self.config.clip_sample_range
        return x0.clamp(-r, r) if self.config.clip_sample else x0

    def _sigma_table(self) -> np.ndarray:
        """sigma_t for every training timestep, [T] float64 (computed in float32 like alpha_bar)."""
        ab = self.alphas_cumprod.clone()
        if self.config.rescale_betas_zero_snr:
            ab[-1] = 2**-24  # keep sigma_max finite when the last step is pure noise
        return (((1 - ab) / ab) ** 0.5).numpy().astype(np.float64)

    def _sigma_at(self, timesteps, like) -> torch.Tensor:
        """sigma for each timestep in ``timesteps`` (looked up in the current schedule), shaped to broadcast."""
        t = torch.as_tensor(timesteps).flatten()
        here = self.timesteps
        sig = []
        for v in t.tolist():
            hits = (here.double() == v).nonzero()
            if len(hits):
                sig.append(self._sigmas[self._begin + int(hits[0])])
            else:  # not a step of this schedule: interpolate the training table
                table = self._sigma_table()
                sig.append(torch.tensor(np.interp(v, np.arange(len(table)), table), dtype=torch.float32))
        sig = torch.stack(sig).to(device=like.device, dtype=like.dtype)
        return sig.reshape(-1, *([1] * (like.ndim - 1)))

    def _discrete_timesteps(self, N: int) -> torch.Tensor:
        c = self.config
        ts = spaced_timesteps(N, c.num_train_timesteps, c.timestep_spacing, c.steps_offset)
        return torch.from_numpy(ts.round().astype(np.int64))

    def __repr__(self) -> str:
        changed = {
            f.name: getattr(self.config, f.name)
            for f in fields(self.config)
            if getattr(self.config, f.name) != f.default
        }
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in changed.items())})"


# ---------------------------------------------------------------------------
# DDPM
# ---------------------------------------------------------------------------


class DDPMSampler(Sampler):
    """Ancestral sampling of the learned reverse chain (Ho et al. 2020).

    From x_t to the next timestep s < t (a = alpha_bar, beta_ts = 1 - a_t / a_s):

        x0_hat = prediction of x0
        mean   = sqrt(a_s) beta_ts / (1 - a_t) * x0_hat + sqrt(a_t / a_s) (1 - a_s) / (1 - a_t) * x_t   (eq. 7)
        var    = (1 - a_s) / (1 - a_t) * beta_ts     ("fixed_small", the posterior variance)
                 or beta_ts                           ("fixed_large")
        x_s    = mean + sqrt(var) * z,   z ~ N(0, I)   (no noise when t = 0)
    """

    name = "ddpm"

    def _check_config(self, c):
        super()._check_config(c)
        if c.variance_type not in ("fixed_small", "fixed_large"):
            raise ValueError(f"variance_type must be 'fixed_small' or 'fixed_large', got {c.variance_type!r}")

    def _make_timesteps(self, N):
        self._timesteps = self._discrete_timesteps(N)

    def _final_alpha_cumprod_of_chain(self):
        return torch.tensor(1.0)  # DDPM's chain ends at x0 itself

    def _step(self, model_output, i, sample, generator):
        t = int(self._timesteps[i])
        s = int(self._timesteps[i + 1]) if i + 1 < len(self._timesteps) else -1
        a_t = self.alphas_cumprod[t]
        a_s = self.alphas_cumprod[s] if s >= 0 else torch.tensor(1.0)
        alpha_ts = a_t / a_s
        beta_ts = 1 - alpha_ts
        x0 = self._clip(convert_prediction(model_output, sample, a_t, self.config.prediction_type, "sample"))
        mean = (a_s**0.5 * beta_ts / (1 - a_t)) * x0 + (alpha_ts**0.5 * (1 - a_s) / (1 - a_t)) * sample
        if t > 0:
            if self.config.variance_type == "fixed_small":
                var = torch.clamp((1 - a_s) / (1 - a_t) * beta_ts, min=1e-20)
            else:
                var = beta_ts
            mean = mean + var**0.5 * _randn(model_output.shape, model_output, generator)
        return SamplerOutput(mean, x0)


# ---------------------------------------------------------------------------
# DDIM
# ---------------------------------------------------------------------------


class DDIMSampler(Sampler):
    """Denoising Diffusion Implicit Models (Song et al. 2021, eq. 12).

    From x_t to s = t - T // N (a = alpha_bar):

        x0_hat, eps_hat = the model's view of x_t
        sigma_t = eta * sqrt((1 - a_s) / (1 - a_t)) * sqrt(1 - a_t / a_s)
        x_s = sqrt(a_s) x0_hat + sqrt(1 - a_s - sigma_t^2) eps_hat + sigma_t z

    With eta = 0 the step is deterministic: the same noise eps_hat is put back
    at the lower level, so a noise image maps to one image (and back).
    """

    name = "ddim"

    def _check_config(self, c):
        super()._check_config(c)
        if not c.eta >= 0:
            raise ValueError(f"eta must be >= 0, got {c.eta}")

    def _make_timesteps(self, N):
        self._timesteps = self._discrete_timesteps(N)

    def _prev_timestep(self, t: int) -> int:
        # the reference steps by a fixed T // N whatever the spacing
        return t - self.config.num_train_timesteps // self.num_inference_steps

    def _step(self, model_output, i, sample, generator):
        t = int(self._timesteps[i])
        s = self._prev_timestep(t)
        a_t = self.alphas_cumprod[t]
        a_s = self.alphas_cumprod[s] if s >= 0 else self.final_alpha_cumprod
        x0 = self._clip(convert_prediction(model_output, sample, a_t, self.config.prediction_type, "sample"))
        eps = convert_prediction(model_output, sample, a_t, self.config.prediction_type, "epsilon")
        variance = (1 - a_s) / (1 - a_t) * (1 - a_t / a_s)
        std = self.config.eta * variance**0.5
        prev = a_s**0.5 * x0 + (1 - a_s - std**2) ** 0.5 * eps
        if self.config.eta > 0:
            prev = prev + std * _randn(model_output.shape, model_output, generator)
        return SamplerOutput(prev, x0)


# ---------------------------------------------------------------------------
# PNDM / PLMS
# ---------------------------------------------------------------------------


class PNDMSampler(Sampler):
    """Pseudo numerical methods (Liu et al. 2022), SD 1.x's default sampler.

    Each step moves x_t to s with the "transfer" of eq. 9, which is DDIM's
    deterministic step written for a noise estimate e:

        x_s = sqrt(a_s / a_t) x_t - (a_s - a_t) e / (a_t sqrt(1 - a_s) + sqrt(a_t (1 - a_t) a_s))

    PLMS feeds it a linear multistep (Adams-Bashforth) mix of the last noise
    predictions, (55 e_0 - 59 e_1 + 37 e_2 - 9 e_3) / 24 once four exist, so
    each step costs one model call but is 4th order. The history is started
    either by three Runge-Kutta steps (``skip_prk_steps=False``, 4 calls each)
    or, as in SD, by a cheap warm-up: an extra call that redoes the first step
    with the average of two predictions (a Heun step), then 2nd and 3rd order
    Adams-Bashforth.
    """

    name = "pndm"

    def _make_timesteps(self, N):
        c = self.config
        T = c.num_train_timesteps
        base = spaced_timesteps(N, T, c.timestep_spacing, c.steps_offset).round().astype(np.int64)[::-1]  # increasing
        if c.skip_prk_steps:
            # t_{N-1}, t_{N-2}, t_{N-2}, t_{N-3}, ..., t_0: the warm-up visits t_{N-2} twice
            self._prk = np.array([], dtype=np.int64)
            plms = np.concatenate([base[:-1], base[-2:-1], base[-1:]])[::-1]
        else:
            # three Runge-Kutta steps over the 4 highest timesteps, each evaluated at
            # t, t - h/2, t - h/2, t - h (h = T // N), then PLMS over the rest
            half = T // N // 2
            top = base[-4:]
            pairs = np.stack([top, top + half], axis=1).reshape(-1)  # t0, t0+h/2, t1, t1+h/2, ...
            self._prk = np.repeat(pairs[:-1], 2)[1:-1][::-1].copy()
            plms = base[:-3][::-1]
        self._timesteps = torch.from_numpy(np.concatenate([self._prk, plms]).astype(np.int64))

    def _reset_state(self):
        self.ets: list[torch.Tensor] = []  # noise predictions that start each step, newest last
        self.counter = 0
        self.cur_sample = None
        self.cur_model_output = 0

    def _transfer(self, sample, t: int, s: int, model_output):
        """PNDM eq. 9: move ``sample`` from t to s with noise estimate ``model_output``."""
        a_t = self.alphas_cumprod[t]
        a_s = self.alphas_cumprod[s] if s >= 0 else self.final_alpha_cumprod
        eps = convert_prediction(model_output, sample, a_t, self.config.prediction_type, "epsilon")
        denom = a_t * (1 - a_s) ** 0.5 + (a_t * (1 - a_t) * a_s) ** 0.5
        return (a_s / a_t) ** 0.5 * sample - (a_s - a_t) * eps / denom

    def _step(self, model_output, i, sample, generator):
        t = int(self._timesteps[i])
        x0 = convert_prediction(model_output, sample, self.alphas_cumprod[t], self.config.prediction_type, "sample")
        if self.counter < len(self._prk):
            prev = self._step_prk(model_output, t, sample)
        else:
            prev = self._step_plms(model_output, t, sample)
        self.counter += 1
        return SamplerOutput(prev, x0)

    def _step_prk(self, e, t, sample):
        """One of the 4 evaluations of a classical Runge-Kutta step (weights 1/6, 1/3, 1/3, 1/6)."""
        h = self.config.num_train_timesteps // self.num_inference_steps
        k = self.counter % 4
        s = t - (0 if self.counter % 2 else h // 2)
        t_begin = int(self._prk[self.counter // 4 * 4])
        if k == 0:
            self.cur_model_output = e / 6
            self.ets.append(e)
            self.cur_sample = sample
        elif k in (1, 2):
            self.cur_model_output = self.cur_model_output + e / 3
        else:
            e = self.cur_model_output + e / 6
            self.cur_model_output = 0
        return self._transfer(self.cur_sample, t_begin, s, e)

    def _step_plms(self, e, t, sample):
        """Linear multistep: combine this and earlier noise predictions (PNDM section 3.3).

        A small state machine, driven by ``self.counter`` (model calls so far) and
        ``self.ets`` (the noise predictions that *start* a step, newest last). With
        ``skip_prk_steps`` (SD) the timesteps are t0, t1, t1, t2, t3, ... (t1 = t0 - h):

        ====  ======  =============================================  ==================
        call  at      what happens                                   noise estimate e
        ====  ======  =============================================  ==================
        0     t0      keep x_t0 in ``cur_sample``; step t0 -> t1     e0 (first order)
        1     t1      warm-up: *redo* t0 -> t1 from ``cur_sample``     (e0 + e1) / 2 (Heun)
                      (e1 is not kept in ``ets``)
        2     t1      step t1 -> t2 from the corrected sample        (3 e2 - e0) / 2
        3     t2      step t2 -> t3                                  AB3 of the last 3
        4+    t_k     step t_k -> t_k+1                              AB4 of the last 4
        ====  ======  =============================================  ==================

        ABn is the n-step Adams-Bashforth formula (weights 3/2, -1/2; 23/12, -16/12,
        5/12; 55/24, -59/24, 37/24, -9/24). Each step then moves the sample with the
        transfer of eq. 9 (``_transfer``). After Runge-Kutta warm-up steps
        (``skip_prk_steps=False``) ``ets`` already holds 3 entries (one per RK step), so
        every call here is AB4. The order of the states, and ``e1`` missing from
        ``ets``, follow diffusers' ``PNDMScheduler.step_plms``, which ministd matches
        step for step.
        """
        h = self.config.num_train_timesteps // self.num_inference_steps
        s = t - h
        if self.counter != 1:
            self.ets = self.ets[-3:] + [e]
        else:
            # warm-up call: we are at t - h after a 1st-order step; redo that step from t
            s, t = t, t + h
        ets = self.ets
        if len(ets) == 1 and self.counter == 0:
            self.cur_sample = sample  # remember x_t for the redo
        elif len(ets) == 1 and self.counter == 1:
            e = (e + ets[-1]) / 2
            sample, self.cur_sample = self.cur_sample, None
        elif len(ets) == 2:
            e = (3 * ets[-1] - ets[-2]) / 2
        elif len(ets) == 3:
            e = (23 * ets[-1] - 16 * ets[-2] + 5 * ets[-3]) / 12
        else:
            e = (55 * ets[-1] - 59 * ets[-2] + 37 * ets[-3] - 9 * ets[-4]) / 24
        return self._transfer(sample, t, s, e)


# ---------------------------------------------------------------------------
# the sigma (Karras) family: Euler, Euler ancestral, Heun
# ---------------------------------------------------------------------------


class EulerSampler(Sampler):
    """Euler's method on the probability-flow ODE (Karras et al. 2022, Algorithm 1 without step 8).

    In the sigma parametrisation x = x0 + sigma eps, the ODE is
    dx/dsigma = (x - x0_hat(x, sigma)) / sigma, and one Euler step is

        d = (x - x0_hat) / sigma;   x_next = x + (sigma_next - sigma) d

    The network was trained on variance-preserving inputs, so it is fed
    x / sqrt(sigma^2 + 1) (``scale_model_input``). Its output converts to x0 as
        eps:  x0 = x - sigma eps
        v:    x0 = x / (sigma^2 + 1) - sigma / sqrt(sigma^2 + 1) v
    """

    name = "euler"
    sigma_space = True

    def _make_timesteps(self, N):
        c = self.config
        table = self._sigma_table()
        ts = spaced_timesteps(N, c.num_train_timesteps, c.timestep_spacing, c.steps_offset).astype(np.float32)
        sigmas = np.interp(ts, np.arange(len(table)), table)  # sigma at fractional timesteps
        if c.use_karras_sigmas:
            sigmas = karras_sigmas(sigmas[-1], sigmas[0], N)
            ts = sigma_to_timestep(sigmas, table)
        self._timesteps = torch.from_numpy(ts.astype(np.float32))
        self._sigmas = torch.from_numpy(np.append(sigmas, 0.0).astype(np.float32))

    @property
    def init_noise_sigma(self) -> float:
        s_max = float(self._sigmas.max()) if self._sigmas is not None else float(self._sigma_table().max())
        # leading spacing never starts at sigma_max of training, so the reference keeps
        # the variance-preserving scale sqrt(sigma^2 + 1) there (rounded to float32, as it is
        # there: a float64 value differs by 1e-8 relative, which float64 pipelines can see)
        if self.config.timestep_spacing in ("linspace", "trailing"):
            return s_max
        return float((torch.tensor(s_max, dtype=torch.float32) ** 2 + 1) ** 0.5)

    def scale_model_input(self, sample, timestep):
        i = self._expect(timestep)
        return sample / (self._sigmas[i] ** 2 + 1) ** 0.5

    def _step(self, model_output, i, sample, generator):
        x = sample.float()
        sigma, sigma_next = self._sigmas[i], self._sigmas[i + 1]
        x0 = convert_prediction(model_output, x, None, self.config.prediction_type, "sample", sigma=sigma)
        d = (x - x0) / sigma
        prev = x + d * (sigma_next - sigma)
        return SamplerOutput(prev.to(model_output.dtype), x0)

    def add_noise(self, original_samples, noise, timesteps):
        """x0 + sigma(t) noise: the Karras-space noisy sample at ``timesteps``."""
        self._require_timesteps()
        return original_samples + noise * self._sigma_at(timesteps, original_samples)


class EulerAncestralSampler(EulerSampler):
    """Euler ancestral (k-diffusion's ``sample_euler_ancestral``).

    Split the move from sigma to sigma_next into a deterministic Euler step to
    sigma_down followed by fresh noise of size sigma_up, chosen so the noise
    level lands on sigma_next (sigma_down^2 + sigma_up^2 = sigma_next^2):

        sigma_up   = sqrt(sigma_next^2 (sigma^2 - sigma_next^2) / sigma^2)
        sigma_down = sqrt(sigma_next^2 - sigma_up^2)
        x_next = x + (sigma_down - sigma) (x - x0_hat) / sigma + sigma_up z

    The fresh noise keeps the sample from ever settling: results change with
    the number of steps and never converge to one image.
    """

    name = "euler_a"

    def _step(self, model_output, i, sample, generator):
        x = sample.float()
        sigma, sigma_next = self._sigmas[i], self._sigmas[i + 1]
        x0 = convert_prediction(model_output, x, None, self.config.prediction_type, "sample", sigma=sigma)
        sigma_up = (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5
        sigma_down = (sigma_next**2 - sigma_up**2) ** 0.5
        d = (x - x0) / sigma
        prev = x + d * (sigma_down - sigma)
        prev = prev + _randn(model_output.shape, model_output, generator) * sigma_up
        return SamplerOutput(prev.to(model_output.dtype), x0)


class HeunSampler(EulerSampler):
    """Heun's 2nd-order method (Karras et al. 2022, Algorithm 1, gamma = 0).

    Take an Euler step to sigma_next, evaluate the model there, and redo the
    step from the same start with the average of the two slopes:

        d  = (x - x0_hat(x, sigma)) / sigma
        x' = x + (sigma_next - sigma) d
        d' = (x' - x0_hat(x', sigma_next)) / sigma_next
        x_next = x + (sigma_next - sigma) (d + d') / 2

    Two model calls per step, so ``timesteps`` lists each inner timestep twice
    (2N - 1 calls: the last step, to sigma = 0, stays first order).
    """

    name = "heun"
    order = 2

    def _make_timesteps(self, N):
        super()._make_timesteps(N)
        ts, sig = self._timesteps, self._sigmas
        # evaluation points: t0, t1, t1, t2, t2, ...; sigmas alike, then the final 0
        self._timesteps = torch.cat([ts[:1], ts[1:].repeat_interleave(2)])
        self._sigmas = torch.cat([sig[:1], sig[1:-1].repeat_interleave(2), sig[-1:]])

    def _reset_state(self):
        self.prev_derivative = None
        self.dt = None
        self.first_sample = None

    def _step(self, model_output, i, sample, generator):
        if self.dt is None:  # first evaluation of a step: plain Euler
            sigma, sigma_next = self._sigmas[i], self._sigmas[i + 1]
            kind = self.config.prediction_type
            x0 = self._clip(convert_prediction(model_output, sample, None, kind, "sample", sigma=sigma))
            d = (sample - x0) / sigma
            self.prev_derivative, self.dt, self.first_sample = d, sigma_next - sigma, sample
            return SamplerOutput(sample + d * self.dt, x0)
        # second evaluation, at the Euler guess: average the slopes, restart from the first sample
        sigma_next = self._sigmas[i]
        kind = self.config.prediction_type
        x0 = self._clip(convert_prediction(model_output, sample, None, kind, "sample", sigma=sigma_next))
        d = ((sample - x0) / sigma_next + self.prev_derivative) / 2
        prev = self.first_sample + d * self.dt
        self._reset_state()
        return SamplerOutput(prev, x0)


# ---------------------------------------------------------------------------
# DPM-Solver++ (2M)
# ---------------------------------------------------------------------------


class DPMSolverMultistepSampler(Sampler):
    """DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", Algorithm 2).

    Variance-preserving state x = alpha x0 + sigma_vp eps, with
    alpha = 1 / sqrt(sigma^2 + 1), sigma_vp = sigma alpha and the half
    log-SNR lambda = log(alpha / sigma_vp). With h = lambda_next - lambda and
    x0 predictions D (first order = DDIM):

        x_next = (sigma_vp_next / sigma_vp) x - alpha_next (e^{-h} - 1) D

    where the 2nd-order multistep uses the last two x0 predictions,
    r = h_prev / h, D = D_0 + (D_0 - D_1) / (2 r) ("midpoint").
    The first step (no history yet) and the last, which goes to sigma = 0 and
    returns x0_hat, are first order.
    """

    name = "dpmpp_2m"

    def _check_config(self, c):
        super()._check_config(c)
        if c.solver_order not in (1, 2):
            raise ValueError(f"solver_order must be 1 or 2 for dpmpp_2m, got {c.solver_order}")
        if c.solver_type not in ("midpoint", "heun"):
            raise ValueError(f"solver_type must be 'midpoint' or 'heun', got {c.solver_type!r}")

    def _make_timesteps(self, N):
        c = self.config
        T = c.num_train_timesteps
        table = self._sigma_table()
        # the reference spaces N + 1 points and drops the last (t = 0) for linspace/leading
        if c.timestep_spacing == "linspace":
            ts = np.linspace(0, T - 1, N + 1).round()[::-1][:-1]
        elif c.timestep_spacing == "leading":
            ts = (np.arange(N + 1) * (T // (N + 1))).round()[::-1][:-1] + c.steps_offset
        else:
            ts = spaced_timesteps(N, T, "trailing")
        if c.use_karras_sigmas:
            sigmas = karras_sigmas(table[0], table[-1], N)
            ts = sigma_to_timestep(sigmas, table)
            if c.beta_schedule != "squaredcos_cap_v2":
                ts = ts.round()
        else:
            sigmas = np.interp(ts, np.arange(T), table)
        self._timesteps = torch.from_numpy(ts.astype(np.int64))
        self._sigmas = torch.from_numpy(np.append(sigmas, 0.0).astype(np.float32))

    def _reset_state(self):
        self.model_outputs: list[torch.Tensor | None] = [None] * self.config.solver_order  # x0 history
        self.lower_order_nums = 0

    @staticmethod
    def _alpha_sigma(sigma):
        alpha = 1 / (sigma**2 + 1) ** 0.5
        return alpha, sigma * alpha

    def _step(self, model_output, i, sample, generator):
        c = self.config
        n = len(self._timesteps)
        alpha_s, sigma_s = self._alpha_sigma(self._sigmas[i])
        x0 = convert_prediction(model_output, sample, None, c.prediction_type, "sample", alpha=alpha_s, sigma=sigma_s)
        self.model_outputs = self.model_outputs[1:] + [x0]
        x = sample.float()
        # first order at the start (no history yet) and on the last step, which lands on sigma = 0
        # (lower_order_final / euler_at_final only change 3rd-order solvers, which we do not offer)
        if c.solver_order == 1 or self.lower_order_nums < 1 or i == n - 1:
            prev = self._first_order(x0, x, i)
        else:
            prev = self._second_order(x, i)
        self.lower_order_nums = min(self.lower_order_nums + 1, c.solver_order)
        return SamplerOutput(prev.to(model_output.dtype), x0)

    def _lambda(self, alpha, sigma):
        return torch.log(alpha) - torch.log(sigma)

    def _first_order(self, x0, x, i):
        """DPM-Solver++ 1: the DDIM step in x0 form."""
        if float(self._sigmas[i + 1]) == 0.0:
            return x0  # at sigma 0 the sample is the x0 estimate (alpha = 1)
        alpha_t, sigma_t = self._alpha_sigma(self._sigmas[i + 1])
        alpha_s, sigma_s = self._alpha_sigma(self._sigmas[i])
        h = self._lambda(alpha_t, sigma_t) - self._lambda(alpha_s, sigma_s)
        return (sigma_t / sigma_s) * x - (alpha_t * (torch.exp(-h) - 1.0)) * x0

    def _second_order(self, x, i):
        """DPM-Solver++(2M): correct the slope with the previous x0 prediction."""
        alpha_t, sigma_t = self._alpha_sigma(self._sigmas[i + 1])
        alpha_s0, sigma_s0 = self._alpha_sigma(self._sigmas[i])
        alpha_s1, sigma_s1 = self._alpha_sigma(self._sigmas[i - 1])
        lam_t, lam_s0, lam_s1 = (
            self._lambda(alpha_t, sigma_t),
            self._lambda(alpha_s0, sigma_s0),
            self._lambda(alpha_s1, sigma_s1),
        )
        m0, m1 = self.model_outputs[-1], self.model_outputs[-2]
        h, h_prev = lam_t - lam_s0, lam_s0 - lam_s1
        r = h_prev / h
        D0, D1 = m0, (1.0 / r) * (m0 - m1)
        phi = torch.exp(-h) - 1.0
        if self.config.solver_type == "midpoint":
            return (sigma_t / sigma_s0) * x - (alpha_t * phi) * D0 - 0.5 * (alpha_t * phi) * D1
        return (sigma_t / sigma_s0) * x - (alpha_t * phi) * D0 + (alpha_t * (phi / h + 1.0)) * D1

    def add_noise(self, original_samples, noise, timesteps):
        """alpha x0 + sigma_vp noise, with sigma taken from this schedule at ``timesteps``."""
        self._require_timesteps()
        alpha, sigma_vp = self._alpha_sigma(self._sigma_at(timesteps, original_samples))
        return alpha * original_samples + sigma_vp * noise


# ---------------------------------------------------------------------------
# choosing a sampler by name or from a diffusers config
# ---------------------------------------------------------------------------

SAMPLERS: dict[str, type[Sampler]] = {
    "ddpm": DDPMSampler,
    "ddim": DDIMSampler,
    "pndm": PNDMSampler,
    "euler": EulerSampler,
    "euler_a": EulerAncestralSampler,
    "heun": HeunSampler,
    "dpmpp_2m": DPMSolverMultistepSampler,
}
ALIASES = {
    "plms": "pndm",
    "euler_ancestral": "euler_a",
    "dpm++_2m": "dpmpp_2m",
    "dpmsolver++": "dpmpp_2m",
}


def make_sampler(name: str, config: SamplerConfig | None = None, **overrides) -> Sampler:
    """A sampler by name ("ddim", "euler_a", "dpmpp_2m_karras", ...), config fields as keywords.

    ``config`` (e.g. ``other_sampler.config``) keeps a model's training
    schedule when switching samplers; keywords override single fields.
    The suffix ``_karras`` turns on ``use_karras_sigmas``.
    """
    key = name.lower().replace(" ", "_").replace("-", "_")
    if key.endswith("_karras"):
        key = key[: -len("_karras")]
        overrides.setdefault("use_karras_sigmas", True)
    key = ALIASES.get(key, key)
    if key not in SAMPLERS:
        allowed = sorted(SAMPLERS) + sorted(ALIASES) + ["euler_karras", "heun_karras", "dpmpp_2m_karras"]
        raise ValueError(f"unknown sampler name {name!r}; allowed: {', '.join(allowed)}")
    unknown = set(overrides) - {f.name for f in fields(SamplerConfig)}
    if unknown:
        raise ValueError(f"unknown sampler config field(s) {sorted(unknown)}; see SamplerConfig")
    if config is not None and "use_karras_sigmas" not in overrides and key not in ("euler", "heun", "dpmpp_2m"):
        config = replace(config, use_karras_sigmas=False)  # inherited from a Karras sampler: not ours to keep
    return SAMPLERS[key](config, **overrides)


# diffusers class name -> (our sampler, that class's constructor defaults for the fields we read)
_COMMON = dict(
    num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
    prediction_type="epsilon", steps_offset=0,
)
DIFFUSERS_CLASSES: dict[str, tuple[str, dict]] = {
    "DDPMScheduler": ("ddpm", dict(_COMMON, variance_type="fixed_small", clip_sample=True, clip_sample_range=1.0,
                                   timestep_spacing="leading", rescale_betas_zero_snr=False)),
    "DDIMScheduler": ("ddim", dict(_COMMON, clip_sample=True, clip_sample_range=1.0, set_alpha_to_one=True,
                                   timestep_spacing="leading", rescale_betas_zero_snr=False)),
    "PNDMScheduler": ("pndm", dict(_COMMON, skip_prk_steps=False, set_alpha_to_one=False,
                                   timestep_spacing="leading")),
    "EulerDiscreteScheduler": ("euler", dict(_COMMON, use_karras_sigmas=False, timestep_spacing="linspace",
                                             rescale_betas_zero_snr=False)),
    "EulerAncestralDiscreteScheduler": ("euler_a", dict(_COMMON, timestep_spacing="linspace",
                                                        rescale_betas_zero_snr=False)),
    "HeunDiscreteScheduler": ("heun", dict(_COMMON, beta_start=0.00085, beta_end=0.012, use_karras_sigmas=False,
                                           clip_sample=False, clip_sample_range=1.0, timestep_spacing="linspace")),
    "DPMSolverMultistepScheduler": ("dpmpp_2m", dict(_COMMON, solver_order=2, solver_type="midpoint",
                                                     lower_order_final=True, euler_at_final=False,
                                                     use_karras_sigmas=False, timestep_spacing="linspace",
                                                     rescale_betas_zero_snr=False)),
}
# fields we do not implement: allowed only at the value that leaves the arithmetic unchanged
_MUST_BE = {
    "trained_betas": None, "thresholding": False, "timestep_type": "discrete", "interpolation_type": "linear",
    "use_exponential_sigmas": False, "use_beta_sigmas": False, "use_lu_lambdas": False, "use_flow_sigmas": False,
    "use_dynamic_shifting": False, "final_sigmas_type": "zero", "algorithm_type": "dpmsolver++",
    "lambda_min_clipped": -float("inf"), "sigma_min": None, "sigma_max": None,
}


def from_scheduler_config(config: dict, name: str | None = None) -> Sampler:
    """Build the sampler a diffusers ``scheduler_config.json`` describes.

    Fields the file leaves out take that diffusers class's defaults; fields
    the class does not take are ignored (as diffusers does); fields that
    would change the arithmetic in ways ministd does not implement
    (thresholding, exponential sigmas, SDE solvers, ...) raise ValueError.
    ``name`` picks a different sampler (any name ``make_sampler`` takes)
    with the same training schedule, prediction type and timestep spacing,
    the pipelines' ``sampler=`` option; its other fields are ministd's defaults.
    """
    cls_name = config.get("_class_name")
    if cls_name not in DIFFUSERS_CLASSES:
        raise ValueError(
            f"scheduler _class_name must be one of {sorted(DIFFUSERS_CLASSES)}, got {cls_name!r}"
        )
    ours, defaults = DIFFUSERS_CLASSES[cls_name]
    for key, ok in _MUST_BE.items():
        if key in config and config[key] != ok:
            raise ValueError(f"{cls_name} field {key}={config[key]!r} is not supported by ministd (supported: {ok!r})")
    if ours == "dpmpp_2m" and config.get("variance_type") is not None:
        raise ValueError(f"{cls_name} field variance_type={config['variance_type']!r} is not supported (supported: None)")
    if ours == "dpmpp_2m" and config.get("solver_order", 2) not in (1, 2):
        raise ValueError(f"{cls_name} field solver_order={config['solver_order']!r} is not supported (supported: 1, 2)")
    values = {k: config.get(k, v) for k, v in defaults.items()}
    values["steps_offset"] = int(values["steps_offset"])
    if name is None:
        return make_sampler(ours, **values)
    # another sampler: keep what the model was trained with and how steps are spaced
    keep = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "rescale_betas_zero_snr",
            "prediction_type", "timestep_spacing", "steps_offset")
    return make_sampler(name, **{k: values[k] for k in keep if k in values})
