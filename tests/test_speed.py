"""ministd.speed: the CPU tricks change speed, never results, on whatever CPU runs the tests.

Which convolution kernel is faster is the machine's business (it differs between
an Intel CPU with AMX and an AMD one without), so no test here asserts which one
a CPU picks. Instead every path is forced in turn through ministd's own switch
(``speed.force_kernel``) and must compute what the plain module and the
reference implementation compute; the measuring itself is tested for what it
records, not for what it finds.

Tolerances: float32 paths agree with ``nn.Conv2d`` / diffusers to float32
rounding of sums taken in another order (measured <= 3e-6 on these tiny
models): atol 1e-5 as in tests/test_unet.py. bfloat16 (8 significant bits):
a few units in the last place, atol 3e-2 / rtol 2e-2 on outputs of size ~1.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from ministd import speed
from ministd import unet as U
from ministd.vae import AutoencoderKL, VAEConfig
from tests.test_unet import ATOL, RTOL, inputs, reference, run_ours, run_reference
from tests.test_vae import tiny_diffusers_vae


@pytest.fixture(autouse=True)
def one_thread_and_fresh_choices():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    speed.CHOICES.clear()
    yield
    speed.CHOICES.clear()
    torch.set_num_threads(before)


def fast_copy(model: nn.Module) -> nn.Module:
    return speed.optimize(copy.deepcopy(model))


@pytest.mark.parametrize("kernel", [*speed.KERNELS, None])
@pytest.mark.parametrize("shape", [(2, 8, 16, 16), (1, 8, 8, 24), (64, 8, 16, 16)], ids=["small", "wide", "large"])
@pytest.mark.parametrize("conv", [dict(kernel_size=3, padding=1), dict(kernel_size=3, stride=2, padding=1),
                                  dict(kernel_size=1)], ids=["3x3", "3x3-stride2", "1x1"])
def test_fast_conv_equals_plain_conv(kernel, shape, conv):
    plain = nn.Conv2d(8, 16, **conv).eval()
    fast = fast_copy(plain)
    assert type(fast) is speed.FastConv2d
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode(), speed.force_kernel(kernel):
        torch.testing.assert_close(fast(x), plain(x), atol=1e-6, rtol=1e-5)
    for dtype in (torch.bfloat16, torch.float16):
        low, plain_low = copy.deepcopy(fast).to(dtype), copy.deepcopy(plain).to(dtype)
        with torch.inference_mode(), speed.force_kernel(kernel):
            torch.testing.assert_close(low(x.to(dtype)).float(), plain_low(x.to(dtype)).float(),
                                       atol=3e-2, rtol=2e-2)


def test_measurement_records_one_choice_per_small_map_and_none_for_large_maps():
    fast = fast_copy(nn.Conv2d(8, 16, 3, padding=1).eval())
    with torch.inference_mode():
        fast(torch.randn(2, 8, 16, 16))                       # 512 positions: measured
        fast(torch.randn(2, 8, 16, 16))                       # same key: not measured again
        fast(torch.randn(4, 8, 32, 32))                       # 4096 positions: oneDNN, nothing measured
    assert list(speed.CHOICES) == [((16, 8, 3, 3), (1, 1), (1, 1), (2, 8, 16, 16), torch.float32)]
    assert set(speed.CHOICES.values()) <= set(speed.KERNELS)
    with torch.inference_mode(), speed.force_kernel("im2col"):   # forcing bypasses measuring
        fast(torch.randn(1, 8, 4, 4))
    assert len(speed.CHOICES) == 1
    fast(torch.randn(2, 8, 16, 16, requires_grad=True))         # with autograd: plain nn.Conv2d
    assert len(speed.CHOICES) == 1
    with pytest.raises(ValueError, match="kernel must be one of"):
        with speed.force_kernel("winograd"):
            pass


@pytest.mark.parametrize("kernel", [*speed.KERNELS, None])
def test_optimized_unet_equals_diffusers_with_every_kernel(kernel):
    ref = reference("sd1")
    ours = U.UNet(U.from_diffusers_config(ref.config)).eval()
    ours.load_state_dict(ref.state_dict())
    speed.optimize(ours)
    assert {type(m) for m in ours.modules()} >= {speed.FastConv2d, speed.FastUNetResnetBlock, speed.FastGEGLU}
    args = inputs("sd1", ref.config)
    with speed.force_kernel(kernel):
        torch.testing.assert_close(run_ours(ours, *args), run_reference(ref, *args), atol=ATOL, rtol=RTOL)


def test_optimize_keeps_weights_and_restore_gives_plain_classes_back():
    ours = U.UNet(U.from_diffusers_config(reference("sd1").config)).eval()
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    classes = [type(m) for m in ours.modules()]
    speed.optimize(ours)
    assert speed.is_optimized(ours)
    assert all(torch.equal(v, before[k]) for k, v in ours.state_dict().items()) and len(before) == len(ours.state_dict())
    speed.restore(ours)
    assert [type(m) for m in ours.modules()] == classes and not speed.is_optimized(ours)


def test_unet_inference_leaves_inputs_alone_and_training_gradients_match():
    """In-place SiLU / sums run only without autograd and only on fresh tensors: the caller's
    tensors are untouched; with gradients on, an optimised U-Net gives diffusers' output and
    parameter gradients (atol 1e-5 on outputs, 1e-4 on gradients)."""
    ref = reference("sd1")
    ours = U.UNet(U.from_diffusers_config(ref.config))
    ours.load_state_dict(ref.state_dict())
    speed.optimize(ours.eval())
    latents, t, text, _ = inputs("sd1", ref.config)
    kept = latents.clone(), text.clone()
    with torch.inference_mode():
        fast = ours(latents, t, text)
    assert torch.equal(latents, kept[0]) and torch.equal(text, kept[1])
    out = ours.train()(latents, t, text)
    ref_out = ref.train()(latents, t, encoder_hidden_states=text).sample
    torch.testing.assert_close(out, fast, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(out, ref_out, atol=ATOL, rtol=RTOL)
    out.square().mean().backward()
    ref_out.square().mean().backward()
    ref_grads = dict(ref.named_parameters())
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[name].grad, atol=1e-4, rtol=1e-3, msg=name)


@pytest.mark.parametrize("kernel", [*speed.KERNELS, None])
def test_optimized_vae_equals_diffusers_and_keeps_latents(kernel):
    """VAE decode with the fast ResNet blocks and convolutions (atol 1e-5, rtol 1e-4 as in
    tests/test_vae.py); with autograd on, gradients equal diffusers' (1e-4)."""
    ref = tiny_diffusers_vae()
    ours = AutoencoderKL(VAEConfig.from_dict(dict(ref.config))).eval()
    ours.load_state_dict(ref.state_dict())
    speed.optimize(ours)
    assert speed.FastVAEResnetBlock in {type(m) for m in ours.modules()}
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    kept = z.clone()
    with torch.inference_mode(), speed.force_kernel(kernel):
        fast = ours.decode(z)
        torch.testing.assert_close(fast, ref.decode(z).sample, atol=1e-5, rtol=1e-4)
    assert torch.equal(z, kept)
    out, ref_out = ours.decode(z), ref.decode(z).sample
    torch.testing.assert_close(out, fast, atol=1e-5, rtol=1e-4)
    out.square().mean().backward()
    ref_out.square().mean().backward()
    ref_grads = dict(ref.named_parameters())
    for name, p in ours.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(p.grad, ref_grads[name].grad, atol=1e-4, rtol=1e-3, msg=name)


def test_load_pipeline_applies_the_switch(monkeypatch):
    import ministd

    assert speed.is_optimized(ministd.load_pipeline("shapes").unet)
    assert not speed.is_optimized(ministd.load_pipeline("shapes", optimize=False).unet)
    monkeypatch.setenv("MINISTD_SPEED", "0")
    pipe = ministd.load_pipeline("shapes")
    assert not speed.is_optimized(pipe.unet) and not speed.is_optimized(pipe.vae)
    assert speed.is_optimized(ministd.load_pipeline("shapes", optimize=True).vae)


def test_network_modules_do_not_import_the_speed_tricks():
    """The modules a reader studies stay plain: only the pipelines apply ministd.speed."""
    import inspect

    from ministd import text, vae
    for module in (U, vae, text):
        source = inspect.getsource(module)
        assert "speed" not in source.replace("speeds", "") and "thnn_conv2d" not in source, module.__name__
        assert "inplace=" not in source, module.__name__
