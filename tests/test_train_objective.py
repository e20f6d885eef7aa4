"""The diffusion training objective (chapter 02): targets, weights, and that it actually trains.

Targets and weights are checked against formulas written out here and against
diffusers' training helpers (``DDPMScheduler.add_noise`` / ``get_velocity``,
``training_utils.compute_snr``); tolerance float32 rtol=1e-5, atol=1e-6.
"""

import pytest
import torch
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr

from ministd.samplers import make_sampler
from ministd.schedules import NoiseSchedule
from ministd.train import (
    PointDenoiser,
    TinyPixelDenoiser,
    diffusion_loss,
    diffusion_loss_terms,
    loss_weights,
    training_step,
)

SCHED_KW = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


class Recorder(torch.nn.Module):
    """A 'model' that returns a fixed function of its input and remembers what it saw."""

    def forward(self, x, t):
        self.seen = (x.clone(), t.clone())
        return 0.5 * x


def _batch():
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 3, 8, 8, generator=g)
    noise = torch.randn(4, 3, 8, 8, generator=g)
    t = torch.tensor([0, 10, 500, 999])
    return x0, noise, t


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_loss_is_mse_to_the_right_target(prediction_type):
    x0, noise, t = _batch()
    ref = DDPMScheduler(**SCHED_KW)
    model = Recorder()
    terms = diffusion_loss_terms(model, x0, NoiseSchedule(**SCHED_KW), prediction_type=prediction_type, t=t, noise=noise)
    x_t = ref.add_noise(x0, noise, t)
    torch.testing.assert_close(model.seen[0], x_t, rtol=1e-5, atol=1e-6)  # the model saw q(x_t | x0)
    assert torch.equal(model.seen[1], t)
    target = {"epsilon": noise, "v_prediction": ref.get_velocity(x0, noise, t), "sample": x0}[prediction_type]
    expected = ((0.5 * x_t - target) ** 2).mean()
    torch.testing.assert_close(terms.loss, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_min_snr_weights_match_the_paper(prediction_type):
    t = torch.arange(0, 1000, 37)
    gamma = 5.0
    snr = compute_snr(DDPMScheduler(**SCHED_KW), t)
    base = torch.minimum(snr, torch.full_like(snr, gamma))
    expected = {"epsilon": base / snr, "v_prediction": base / (snr + 1), "sample": base}[prediction_type]
    got = loss_weights(NoiseSchedule(**SCHED_KW), t, prediction_type, "min_snr", gamma)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    # weighted loss = mean over the batch of weight * per-example MSE
    x0, noise, tt = _batch()
    terms = diffusion_loss_terms(Recorder(), x0, NoiseSchedule(**SCHED_KW), prediction_type=prediction_type,
                                 weighting="min_snr", t=tt, noise=noise)
    per_example = ((terms.prediction - terms.target) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(terms.loss, (terms.weights * per_example).mean(), rtol=1e-6, atol=0)
    assert terms.weights[0] < 1 if prediction_type != "sample" else terms.weights[0] == gamma


def test_uniform_weights_and_zero_snr_are_finite():
    s = NoiseSchedule(rescale_betas_zero_snr=True, **SCHED_KW)
    t = torch.tensor([0, 999])
    assert torch.equal(loss_weights(s, t, "epsilon", "uniform"), torch.ones(2))
    w = loss_weights(s, t, "epsilon", "min_snr")
    assert torch.isfinite(w).all() and w[1] == 1.0


def test_seeded_draws_are_reproducible():
    x0, _, _ = _batch()
    s = NoiseSchedule()
    a = diffusion_loss_terms(Recorder(), x0, s, generator=torch.Generator().manual_seed(3))
    b = diffusion_loss_terms(Recorder(), x0, s, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a.t, b.t) and torch.equal(a.noise, b.noise) and a.loss == b.loss
    assert a.t.min() >= 0 and a.t.max() < 1000


def test_bad_input():
    x0, _, _ = _batch()
    s = NoiseSchedule()
    with pytest.raises(ValueError, match="prediction_type"):
        diffusion_loss(Recorder(), x0, s, prediction_type="v")
    with pytest.raises(ValueError, match="weighting"):
        diffusion_loss(Recorder(), x0, s, weighting="snr")
    with pytest.raises(ValueError, match=r"t must be in \[0, 999\]"):
        diffusion_loss(Recorder(), x0, s, t=torch.tensor([0, 1, 2, 1000]))
    with pytest.raises(ValueError, match="one timestep per example"):
        diffusion_loss(Recorder(), x0, s, t=torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="divisible by 8"):
        TinyPixelDenoiser()(torch.zeros(1, 3, 12, 12), torch.zeros(1))


def two_clusters(n, generator):
    """Half the points near (-1, -1), half near (1, 1), std 0.1."""
    centers = torch.tensor([[-1.0, -1.0], [1.0, 1.0]])
    which = torch.randint(0, 2, (n,), generator=generator)
    return centers[which] + 0.1 * torch.randn(n, 2, generator=generator)


def test_training_learns_two_clusters_end_to_end(one_thread):
    # objective + optimiser + sampler together: a tiny MLP learns the 2D two-cluster data set,
    # and DDIM samples land near the clusters (pure noise would: ~3 % within 0.35 of a centre)
    torch.manual_seed(0)
    schedule = NoiseSchedule(beta_schedule="linear", beta_start=1e-4, beta_end=0.02)
    model = PointDenoiser(hidden=64)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    losses = [training_step(model, opt, two_clusters(256, g), schedule, generator=g) for _ in range(600)]
    assert sum(losses[-50:]) / 50 < 0.7 * sum(losses[:50]) / 50
    sampler = make_sampler("ddim", beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                           timestep_spacing="trailing", steps_offset=0)
    sampler.set_timesteps(30)
    x = torch.randn(400, 2, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for t in sampler.timesteps:
            x = sampler.step(model(x, t), t, x).prev_sample
    d = torch.cdist(x, torch.tensor([[-1.0, -1.0], [1.0, 1.0]])).min(dim=1).values
    assert (d < 0.35).float().mean() > 0.8
    # both clusters are found, roughly in proportion
    assert 0.3 < (x[:, 0] > 0).float().mean() < 0.7


def test_ideal_denoiser_is_the_posterior_mean():
    # three 2D "pictures"; at alpha_bar the noisy x_t = sqrt(ab) y_i + sqrt(1 - ab) eps, so the posterior
    # over i is proportional to exp(-|x_t - sqrt(ab) y_i|^2 / (2 (1 - ab))); written out here in float64
    from ministd.train import IdealDenoiser

    data = torch.tensor([[1.0, 0.0], [-1.0, 0.5], [0.2, -1.0]])
    s = NoiseSchedule()
    model = IdealDenoiser(data, s, prediction_type="sample")
    x_t = torch.tensor([[0.3, 0.1], [-0.5, 0.4], [2.0, -2.0]])
    for t in (10, 300, 800):
        ab = s.alphas_cumprod[t].double()
        logp = -((x_t.double()[:, None] - ab.sqrt() * data.double()[None]) ** 2).sum(-1) / (2 * (1 - ab))
        expected = torch.softmax(logp, dim=1) @ data.double()
        torch.testing.assert_close(model(x_t, torch.full((3,), t)).double(), expected, rtol=1e-4, atol=1e-5)
    # epsilon and v outputs are the same estimate in other units
    eps = IdealDenoiser(data, s)(x_t, torch.full((3,), 300))
    v = IdealDenoiser(data, s, prediction_type="v_prediction")(x_t, torch.full((3,), 300))
    x0 = model(x_t, torch.full((3,), 300))
    ab = s.alphas_cumprod[300]
    torch.testing.assert_close(eps, (x_t - ab.sqrt() * x0) / (1 - ab).sqrt(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(v, ab.sqrt() * eps - (1 - ab).sqrt() * x0, rtol=1e-5, atol=1e-5)


def test_tiny_denoisers_shapes():
    x = torch.randn(2, 3, 32, 32)
    assert TinyPixelDenoiser(width=16)(x, torch.tensor([0, 999])).shape == x.shape
    assert PointDenoiser(hidden=16)(torch.randn(5, 2), 7).shape == (5, 2)
