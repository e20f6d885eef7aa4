"""Schedules and the forward process, checked against diffusers (test-only reference).

Tolerance: float32 tensors built by the same formula; we demand rtol=1e-6,
atol=1e-7 for betas / alphas_cumprod and rtol=1e-5, atol=1e-6 for noised samples.
"""

import math

import pytest
import torch
from diffusers import DDPMScheduler

from ministd.schedules import (
    NoiseSchedule,
    convert_prediction,
    cosine_betas,
    make_betas,
    rescale_zero_terminal_snr,
)

SCHEDULES = [
    ("linear", 0.0001, 0.02),
    ("scaled_linear", 0.00085, 0.012),
    ("squaredcos_cap_v2", 0.0001, 0.02),
]


@pytest.mark.parametrize("zero_snr", [False, True])
@pytest.mark.parametrize("name,start,end", SCHEDULES)
def test_alphas_cumprod_match_diffusers(name, start, end, zero_snr):
    ref = DDPMScheduler(beta_schedule=name, beta_start=start, beta_end=end, rescale_betas_zero_snr=zero_snr)
    ours = NoiseSchedule(beta_schedule=name, beta_start=start, beta_end=end, rescale_betas_zero_snr=zero_snr)
    torch.testing.assert_close(ours.betas, ref.betas, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(ours.alphas_cumprod, ref.alphas_cumprod, rtol=1e-6, atol=1e-7)


def test_scaled_linear_is_sd_formula():
    # FACTS.md: betas = linspace(0.00085**0.5, 0.012**0.5, 1000)**2, written independently here in float64
    T = 1000
    expected = [(0.00085**0.5 + (0.012**0.5 - 0.00085**0.5) * i / (T - 1)) ** 2 for i in range(T)]
    torch.testing.assert_close(make_betas("scaled_linear"), torch.tensor(expected), rtol=1e-5, atol=0)


def test_cosine_alpha_bar_follows_cosine():
    betas = cosine_betas(1000).double()
    ab = torch.cumprod(1 - betas, 0)
    f = lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    # away from the capped tail, alpha_bar_t = f((t+1)/T) / f(0)
    for t in (0, 100, 500, 900):
        assert ab[t].item() == pytest.approx(f((t + 1) / 1000) / f(0), rel=1e-5)


def test_zero_terminal_snr():
    betas = rescale_zero_terminal_snr(make_betas("scaled_linear"))
    ab = torch.cumprod(1 - betas, 0)
    assert ab[-1].item() == pytest.approx(0.0, abs=1e-12)
    assert ab[0].item() == pytest.approx(torch.cumprod(1 - make_betas("scaled_linear"), 0)[0].item(), rel=1e-6)


def test_snr_and_sigma_are_monotone_and_consistent():
    s = NoiseSchedule()
    assert (s.snr[1:] < s.snr[:-1]).all()
    torch.testing.assert_close(s.sigmas, s.snr.rsqrt(), rtol=1e-5, atol=0)


def test_add_noise_and_velocity_match_diffusers():
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 4, 8, 8, generator=g)
    noise = torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([0, 500, 999])
    ref = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    ours = NoiseSchedule()
    torch.testing.assert_close(ours.add_noise(x0, noise, t), ref.add_noise(x0, noise, t), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.get_velocity(x0, noise, t), ref.get_velocity(x0, noise, t), rtol=1e-5, atol=1e-6)
    # a single int timestep broadcasts over the batch
    torch.testing.assert_close(
        ours.add_noise(x0, noise, 250), ref.add_noise(x0, noise, torch.tensor([250] * 3)), rtol=1e-5, atol=1e-6
    )


def test_forward_process_statistics():
    # x_t at the last step of SD's schedule is almost pure noise: mean ~0, std ~1
    s = NoiseSchedule()
    x0 = torch.full((1, 3, 64, 64), 0.8)
    x_t = s.add_noise(x0, torch.randn(x0.shape, generator=torch.Generator().manual_seed(1)), 999)
    assert abs(x_t.mean().item()) < 0.1 and abs(x_t.std().item() - 1) < 0.05


@pytest.mark.parametrize("src", ["epsilon", "sample", "v_prediction"])
@pytest.mark.parametrize("dst", ["epsilon", "sample", "v_prediction"])
def test_prediction_conversions_round_trip(src, dst):
    g = torch.Generator().manual_seed(2)
    x0, eps = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64), torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64)
    ab = torch.tensor(0.3, dtype=torch.float64)
    x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * eps
    truth = {"epsilon": eps, "sample": x0, "v_prediction": ab.sqrt() * eps - (1 - ab).sqrt() * x0}
    out = convert_prediction(truth[src], x_t, ab, src, dst)
    torch.testing.assert_close(out, truth[dst], rtol=1e-10, atol=1e-10)


def test_bad_input():
    with pytest.raises(ValueError, match="beta_schedule"):
        NoiseSchedule(beta_schedule="cosine")
    s = NoiseSchedule()
    x = torch.zeros(1, 3, 4, 4)
    with pytest.raises(ValueError, match=r"t must be in \[0, 999\]"):
        s.add_noise(x, x, 1000)
    with pytest.raises(ValueError, match="to_type"):
        convert_prediction(x, x, 0.5, "epsilon", "v")


@pytest.mark.parametrize("src", ["epsilon", "sample", "v_prediction"])
@pytest.mark.parametrize("dst", ["epsilon", "sample", "v_prediction"])
def test_prediction_conversions_in_every_form(src, dst):
    # the forms the samplers use agree with the alpha_bar form: (alpha, sigma) given directly
    # (DPM-Solver++), and the Karras form x = x0 + sigma eps (Euler, Heun)
    g = torch.Generator().manual_seed(3)
    x0, eps = (torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64) for _ in range(2))
    ab = torch.tensor(0.3, dtype=torch.float64)
    a, b = ab.sqrt(), (1 - ab).sqrt()
    x_vp = a * x0 + b * eps
    truth = {"epsilon": eps, "sample": x0, "v_prediction": a * eps - b * x0}
    torch.testing.assert_close(convert_prediction(truth[src], x_vp, None, src, dst, alpha=a, sigma=b),
                               truth[dst], rtol=1e-10, atol=1e-10)
    sigma = b / a
    torch.testing.assert_close(convert_prediction(truth[src], x0 + sigma * eps, None, src, dst, sigma=sigma),
                               truth[dst], rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="alpha_bar, or sigma"):
        convert_prediction(truth[src], x_vp, ab, src, dst, sigma=sigma)
