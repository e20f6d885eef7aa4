"""Every sampler against diffusers' scheduler of the same configuration (test-only reference).

Each case builds the diffusers scheduler and ours from the same
scheduler_config dict (ours through ``from_scheduler_config``), then drives
both through a whole sampling loop with the same deterministic fake model
output f(x, t) and, for samplers that draw noise, identically seeded CPU
generators. Compared: timesteps, sigmas, init_noise_sigma, the scaled model
input, and prev_sample / pred_original_sample at every step.

Tolerance: float32, rtol=1e-5 and atol=1e-5 (absolute floor for entries that
pass near zero); timesteps must be equal (float timesteps: rtol 1e-5).
Tensors are 1x4x8x8 so the whole file runs in a few seconds.
"""

import inspect
import math

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    PNDMScheduler,
)
from diffusers.utils import logging as diffusers_logging

from ministd.samplers import (
    SamplerConfig,
    from_scheduler_config,
    make_sampler,
)

diffusers_logging.set_verbosity_error()
# diffusers calls np.array on torch tensors in a way numpy 2 warns about; not ours to fix
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

RTOL, ATOL = 1e-5, 1e-5
SHAPE = (1, 4, 8, 8)

REFERENCE = {
    "DDPMScheduler": DDPMScheduler,
    "DDIMScheduler": DDIMScheduler,
    "PNDMScheduler": PNDMScheduler,
    "EulerDiscreteScheduler": EulerDiscreteScheduler,
    "EulerAncestralDiscreteScheduler": EulerAncestralDiscreteScheduler,
    "HeunDiscreteScheduler": HeunDiscreteScheduler,
    "DPMSolverMultistepScheduler": DPMSolverMultistepScheduler,
}
KARRAS = ("EulerDiscreteScheduler", "HeunDiscreteScheduler", "DPMSolverMultistepScheduler")

# SD 1.x's training schedule, as in its scheduler_config.json
SD_CONFIG = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "steps_offset": 1,
    "set_alpha_to_one": False,
    "clip_sample": False,
    "skip_prk_steps": True,
    "trained_betas": None,
}


def fake_model(x: torch.Tensor, t) -> torch.Tensor:
    """A fixed, smooth, deterministic stand-in for a U-Net: depends on the input and the timestep."""
    t = float(t)
    return 0.7 * torch.tanh(x) * math.cos(t / 400.0) + 0.2 * torch.sin(1.3 * x + t / 150.0)


def start_noise():
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(1234))


def ref_step(ref, out, t, x, generator, eta):
    params = inspect.signature(ref.step).parameters
    kwargs = {}
    if "generator" in params:
        kwargs["generator"] = generator
    if "eta" in params:
        kwargs["eta"] = eta
    return ref.step(out, t, x, **kwargs)


def compare_runs(cls_name, config, steps, strength=None, eta=0.0, seed=7):
    ref = REFERENCE[cls_name].from_config(dict(config))
    ours = from_scheduler_config({"_class_name": cls_name, **config})
    if eta:
        ours = make_sampler(ours.name, ours.config, eta=eta)

    ref.set_timesteps(steps)
    ours.set_timesteps(steps, strength=strength)
    ref_ts = ref.timesteps
    x0_image = None
    if strength is not None:  # img2img start, the reference pipeline's rule
        order = getattr(ref, "order", 1)
        init = min(int(steps * strength), steps)
        t_start = max(steps - init, 0)
        ref_ts = ref.timesteps[t_start * order :]
        if hasattr(ref, "set_begin_index"):
            ref.set_begin_index(t_start * order)

    # timesteps (and sigmas, for samplers that have them)
    assert ours.timesteps.dtype == ref_ts.dtype, (ours.timesteps.dtype, ref_ts.dtype)
    if ref_ts.is_floating_point():
        torch.testing.assert_close(ours.timesteps, ref_ts, rtol=1e-5, atol=1e-4)
    else:
        assert torch.equal(ours.timesteps, ref_ts), (ours.timesteps.tolist(), ref_ts.tolist())
    if hasattr(ref, "sigmas") and cls_name not in ("DDPMScheduler", "DDIMScheduler", "PNDMScheduler"):
        begin = len(ref.timesteps) - len(ref_ts)
        torch.testing.assert_close(ours.sigmas, ref.sigmas[begin:].float(), rtol=RTOL, atol=1e-6)

    noise = start_noise()
    if strength is None:
        assert float(ours.init_noise_sigma) == pytest.approx(float(ref.init_noise_sigma), rel=1e-6)
        x_ref = noise * ref.init_noise_sigma
        x_ours = noise * ours.init_noise_sigma
    else:
        x0_image = torch.tanh(torch.randn(SHAPE, generator=torch.Generator().manual_seed(99)))
        t0 = ref_ts[:1]
        x_ref = ref.add_noise(x0_image, noise, t0)
        x_ours = ours.add_noise(x0_image, noise, ours.timesteps[:1])
        torch.testing.assert_close(x_ours, x_ref, rtol=RTOL, atol=ATOL)

    g_ref, g_ours = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
    for i, (t_ref, t_ours) in enumerate(zip(ref_ts, ours.timesteps)):
        inp_ref = ref.scale_model_input(x_ref, t_ref)
        inp_ours = ours.scale_model_input(x_ours, t_ours)
        torch.testing.assert_close(inp_ours, inp_ref, rtol=RTOL, atol=ATOL, msg=lambda m: f"input, step {i}: {m}")
        out_ref, out_ours = fake_model(inp_ref, t_ref), fake_model(inp_ours, t_ours)
        r = ref_step(ref, out_ref, t_ref, x_ref, g_ref, eta)
        o = ours.step(out_ours, t_ours, x_ours, generator=g_ours)
        torch.testing.assert_close(o.prev_sample, r.prev_sample, rtol=RTOL, atol=ATOL, msg=lambda m: f"step {i}: {m}")
        if getattr(r, "pred_original_sample", None) is not None:
            torch.testing.assert_close(
                o.pred_original_sample, r.pred_original_sample, rtol=RTOL, atol=ATOL, msg=lambda m: f"x0, step {i}: {m}"
            )
        x_ref, x_ours = r.prev_sample, o.prev_sample
    assert len(ours.timesteps) == len(ref_ts) > 0 or steps * (strength or 1) < 1
    return x_ours


CASES = [
    pytest.param(cls, pred, spacing, karras, id=f"{cls.removesuffix('Scheduler')}-{pred}-{spacing}{'-karras' if karras else ''}")
    for cls in REFERENCE
    for pred in ("epsilon", "v_prediction")
    for spacing in ("leading", "trailing", "linspace")
    for karras in ((False, True) if cls in KARRAS else (False,))
]


@pytest.mark.parametrize("cls_name,prediction_type,spacing,karras", CASES)
@pytest.mark.parametrize("steps", [7, 20])
def test_trajectory_matches_diffusers(cls_name, prediction_type, spacing, karras, steps):
    config = dict(SD_CONFIG, prediction_type=prediction_type, timestep_spacing=spacing)
    if karras:
        config["use_karras_sigmas"] = True
    compare_runs(cls_name, config, steps)


@pytest.mark.parametrize("cls_name", list(REFERENCE))
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_img2img_start_matches_diffusers(cls_name, spacing):
    config = dict(SD_CONFIG, timestep_spacing=spacing)
    compare_runs(cls_name, config, steps=12, strength=0.6)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_ddim_with_noise_eta_1(prediction_type, spacing):
    config = dict(SD_CONFIG, prediction_type=prediction_type, timestep_spacing=spacing)
    compare_runs("DDIMScheduler", config, steps=10, eta=1.0)


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_pndm_with_runge_kutta_warmup(spacing, prediction_type):
    config = dict(SD_CONFIG, skip_prk_steps=False, timestep_spacing=spacing, prediction_type=prediction_type)
    compare_runs("PNDMScheduler", config, steps=10)


@pytest.mark.parametrize("cls_name", list(REFERENCE))
def test_class_defaults_match_diffusers(cls_name):
    # a config file that names only the class must mean that class's defaults
    compare_runs(cls_name, {}, steps=10)


def test_other_options_match_diffusers():
    base = dict(SD_CONFIG, prediction_type="v_prediction", timestep_spacing="trailing")
    compare_runs("DDIMScheduler", dict(base, rescale_betas_zero_snr=True, set_alpha_to_one=True), steps=10)
    compare_runs("EulerDiscreteScheduler", dict(base, rescale_betas_zero_snr=True), steps=10)
    compare_runs("DDPMScheduler", dict(SD_CONFIG, variance_type="fixed_large", clip_sample=True), steps=10)
    compare_runs("DDIMScheduler", dict(SD_CONFIG, beta_schedule="squaredcos_cap_v2", clip_sample=True), steps=10)
    compare_runs("DPMSolverMultistepScheduler", dict(SD_CONFIG, solver_type="heun", use_karras_sigmas=True), steps=10)
    compare_runs("HeunDiscreteScheduler", dict(SD_CONFIG, beta_schedule="linear", clip_sample=True), steps=10)


def test_facts_timesteps():
    # FACTS.md, independently of diffusers: 20 steps over T = 1000
    s = make_sampler("ddim", timestep_spacing="leading", steps_offset=1)
    s.set_timesteps(20)
    assert s.timesteps[:3].tolist() == [951, 901, 851] and s.timesteps[-1] == 1
    s = make_sampler("ddim", timestep_spacing="trailing")
    s.set_timesteps(20)
    assert s.timesteps[:3].tolist() == [999, 949, 899] and s.timesteps[-1] == 49
    e = make_sampler("euler", timestep_spacing="linspace")
    e.set_timesteps(20)
    assert float(e.timesteps[1]) == pytest.approx(999 * 18 / 19, abs=1e-3)  # 946.42, fractional


def test_sampler_interface_and_names():
    for name in ["ddpm", "ddim", "pndm", "plms", "euler", "euler_a", "heun", "dpmpp_2m", "dpmpp_2m_karras", "DPM++ 2M"]:
        s = make_sampler(name)
        s.set_timesteps(5)
        assert len(s.sigmas) == len(s.timesteps) + 1
    assert make_sampler("dpmpp_2m_karras").config.use_karras_sigmas
    # switching samplers keeps the training schedule
    v = make_sampler("ddim", prediction_type="v_prediction", beta_schedule="linear")
    assert make_sampler("euler", v.config).config.prediction_type == "v_prediction"
    # a Karras setting inherited from another sampler's config is dropped where it does not apply
    k = make_sampler("dpmpp_2m_karras")
    assert not make_sampler("ddim", k.config).config.use_karras_sigmas
    assert make_sampler("heun", k.config).config.use_karras_sigmas


def test_bad_input_is_named():
    s = make_sampler("euler")
    with pytest.raises(ValueError, match="num_inference_steps"):
        s.set_timesteps(0)
    with pytest.raises(ValueError, match=r"num_inference_steps must be in \[1, 1000\]"):
        s.set_timesteps(1001)
    with pytest.raises(ValueError, match="strength must be in"):
        s.set_timesteps(10, strength=1.5)
    with pytest.raises(ValueError, match="timestep_spacing"):
        make_sampler("ddim", timestep_spacing="uniform")
    with pytest.raises(ValueError, match="beta_schedule"):
        make_sampler("ddim", beta_schedule="cosine")
    with pytest.raises(ValueError, match="unknown sampler name"):
        make_sampler("lms")
    with pytest.raises(ValueError, match="set_timesteps"):
        make_sampler("ddim").step(torch.zeros(SHAPE), 1, torch.zeros(SHAPE))
    with pytest.raises(ValueError, match="_class_name"):
        from_scheduler_config({"_class_name": "LMSDiscreteScheduler"})
    with pytest.raises(ValueError, match="thresholding"):
        from_scheduler_config({"_class_name": "DDIMScheduler", "thresholding": True})
    with pytest.raises(ValueError, match="use_karras_sigmas"):
        make_sampler("ddim", use_karras_sigmas=True)
    with pytest.raises(ValueError, match="steps_offset"):  # leading + offset 1 with N = T reaches t = 1000
        make_sampler("ddim").set_timesteps(1000)


def test_wrong_timestep_order_is_caught():
    s = make_sampler("ddim")
    s.set_timesteps(10)
    x = torch.zeros(SHAPE)
    with pytest.raises(ValueError, match="not the one due"):
        s.step(x, s.timesteps[1], x)


@pytest.mark.parametrize("name", ["ddim", "euler", "dpmpp_2m", "pndm"])
def test_nan_is_reported_at_its_step(name):
    s = make_sampler(name)
    s.set_timesteps(10)
    x = start_noise() * s.init_noise_sigma
    for i, t in enumerate(s.timesteps):
        out = fake_model(s.scale_model_input(x, t), t)
        if i == 3:
            out[0, 0, 0, 0] = float("nan")
            with pytest.raises(FloatingPointError, match="step 4 of"):
                s.step(out, t, x)
            return
        x = s.step(out, t, x).prev_sample
    raise AssertionError("unreachable")


def test_config_defaults_are_sd1():
    c = SamplerConfig()
    assert (c.beta_schedule, c.beta_start, c.beta_end, c.timestep_spacing, c.steps_offset) == (
        "scaled_linear", 0.00085, 0.012, "leading", 1,
    )


def test_from_scheduler_config_with_another_sampler_keeps_the_training_schedule():
    sd2 = {"_class_name": "DDIMScheduler", "beta_schedule": "scaled_linear", "beta_start": 0.00085,
           "beta_end": 0.012, "prediction_type": "v_prediction", "timestep_spacing": "leading", "steps_offset": 1,
           "clip_sample": False, "set_alpha_to_one": False}
    s = from_scheduler_config(sd2, name="dpmpp_2m_karras")
    assert s.name == "dpmpp_2m" and s.config.use_karras_sigmas
    assert (s.config.prediction_type, s.config.beta_schedule, s.config.steps_offset) == ("v_prediction", "scaled_linear", 1)
    torch.testing.assert_close(s.alphas_cumprod, DDIMScheduler.from_config(sd2).alphas_cumprod)


@pytest.mark.parametrize("name,cls_name", [("ddim", "DDIMScheduler"), ("euler", "EulerDiscreteScheduler"),
                                           ("dpmpp_2m", "DPMSolverMultistepScheduler")])
def test_trailing_gives_exactly_n_steps(name, cls_name):
    # the reference's np.arange(T, 0, -T/N) yields N + 1 timesteps, the last one -1, for N = 61;
    # ministd takes exactly N, which agree with the reference's first N
    s = make_sampler(name, timestep_spacing="trailing", steps_offset=0)
    s.set_timesteps(61)
    ref = REFERENCE[cls_name].from_config(dict(SD_CONFIG, timestep_spacing="trailing"))
    ref.set_timesteps(61)
    assert len(s.timesteps) == 61 and int(s.timesteps.min()) >= 0
    assert s.timesteps.tolist() == ref.timesteps[:61].tolist()
