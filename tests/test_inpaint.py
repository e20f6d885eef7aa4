"""Inpainting and img2img edge cases against diffusers (issue 17, items 1, 2 and 4).

Models: the tiny random SD 1.x-structured pipeline of ``tests/test_pipelines.py``
(4-channel U-Net: diffusers' StableDiffusionInpaintPipeline inpaints with it by
latent blending), and a copy of it whose U-Net takes 9 input channels (latents +
mask + masked-image latents, as SD 1.5 inpainting), both saved as diffusers
folders and loaded by ``ministd.load_pipeline``. Pictures are 16×16 (latents
8×8: the VAE downsamples by 2, the U-Net by 8) unless a test needs a bigger
canvas to crop from.

Tolerances (float32, CPU), as in ``tests/test_pipelines.py``:

* pictures in [0, 1] (``output_type="np"``): |ours - diffusers| <= 2e-5. The two
  run the same arithmetic in a different order (fused attention, concatenation),
  a few 1e-7 per network call, accumulated over the steps.
* PIL pictures (``padding_mask_crop``, paste-back): at most 1 level of 255 on a
  few pixels, where such a 1e-6 difference straddles a rounding boundary before
  the 8-bit Lanczos resize and alpha compositing that both sides then run alike.

Each sampler parity test also checks that another seed moves the picture far
outside the tolerance, so it can fail.
"""

from __future__ import annotations

import shutil
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import ministd
from ministd import inpaint as inp
from ministd.pipelines import load_pipeline
from ministd.samplers import make_sampler
from test_pipelines import folder  # noqa: F401 (the tiny SD 1.x pipeline fixture)

diffusers = pytest.importorskip("diffusers")
# diffusers calls np.array on torch tensors in a way numpy 2 warns about; not ours to fix
pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning"),
              pytest.mark.usefixtures("one_thread")]   # tests/conftest.py

ATOL = 2e-5
PROMPTS = ["a small red circle in the top left", "a big blue box on a yellow background"]
NEGATIVE = ["blurry", ""]




@pytest.fixture(scope="module")
def folder9(folder, tmp_path_factory):  # noqa: F811
    """The same pipeline with a 9-channel (inpainting) U-Net."""
    root = tmp_path_factory.mktemp("tiny_sd1_inpaint") / "pipe"
    shutil.copytree(folder, root)
    config = dict(diffusers.UNet2DConditionModel.load_config(folder / "unet"))
    config["in_channels"] = 9
    torch.manual_seed(1)
    unet = diffusers.UNet2DConditionModel.from_config(config)
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    shutil.rmtree(root / "unet")
    unet.save_pretrained(root / "unet", safe_serialization=True)
    return root


def _reference(path):
    pipe = diffusers.StableDiffusionInpaintPipeline.from_pretrained(path, safety_checker=None,
                                                                    requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _ours(path):
    pipe = load_pipeline(path)
    pipe.progress_bar = False
    return pipe


@pytest.fixture(scope="module")
def pipes(folder, folder9):  # noqa: F811
    """channels -> (diffusers inpaint pipeline, ministd pipeline, the folder's scheduler config)."""
    made = {}
    for channels, path in ((4, folder), (9, folder9)):
        ref = _reference(path)
        made[channels] = ref, _ours(path), dict(ref.scheduler.config)
    return made


def picture(size=(16, 16), seed=3) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def box_mask(size=(16, 16), box=(3, 5, 11, 14)) -> Image.Image:
    """White (repaint) inside box = (x1, y1, x2, y2), black elsewhere; not aligned to latent cells."""
    mask = np.zeros((size[1], size[0]), dtype=np.uint8)
    x1, y1, x2, y2 = box
    mask[y1:y2, x1:x2] = 255
    return Image.fromarray(mask)


# our sampler name -> (diffusers class, its extra config, our extra config)
SAMPLERS = {
    "pndm": ("PNDMScheduler", {}, {}),
    "ddim": ("DDIMScheduler", {"clip_sample": False}, {}),
    "ddpm": ("DDPMScheduler", {"clip_sample": False}, {}),
    "euler": ("EulerDiscreteScheduler", {}, {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}, {}),
    "heun": ("HeunDiscreteScheduler", {}, {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {}, {}),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}, {}),
}


def samplers(pipes_entry, name: str, **config):
    """(diffusers scheduler, ministd sampler) from the folder's training schedule, with ``config``."""
    _, ours, base = pipes_entry
    cls_name, ref_extra, our_extra = SAMPLERS[name]
    ref = getattr(diffusers, cls_name).from_config(base, **ref_extra, **config)
    return ref, make_sampler(name, config=ours.scheduler.config, **our_extra, **config)


def max_gap(a, b) -> float:
    return float(np.abs(np.stack(a).astype(np.float64) - np.stack(b).astype(np.float64)).max())


# ------------------------------------------------------------------ inpaint parity
INPAINT_CASES = [  # (U-Net channels, sampler, strength, spacing, prediction type)
    (9, "pndm", 1.0, "leading", "epsilon"),
    (9, "ddim", 0.6, "leading", "epsilon"),
    (9, "euler_a", 1.0, "trailing", "epsilon"),
    (9, "dpmpp_2m", 0.7, "linspace", "epsilon"),
    (4, "ddim", 1.0, "leading", "epsilon"),
    (4, "euler_a", 0.6, "leading", "epsilon"),
    (4, "heun", 0.8, "trailing", "epsilon"),
    (4, "dpmpp_2m_karras", 1.0, "leading", "epsilon"),
    (4, "pndm", 0.5, "leading", "epsilon"),
    (4, "euler", 0.7, "linspace", "v_prediction"),  # SD 2.x-style model, latent blend
]


@pytest.mark.parametrize("channels, name, strength, spacing, prediction", INPAINT_CASES)
def test_inpaint_matches_diffusers(channels, name, strength, spacing, prediction, pipes):
    ref, ours, _ = pipes[channels]
    ref.scheduler, sampler = samplers(pipes[channels], name, timestep_spacing=spacing, prediction_type=prediction)
    image, mask = picture(), box_mask()
    kwargs = dict(num_inference_steps=6, guidance_scale=7.5, strength=strength, output_type="np")
    expected = ref(PROMPTS, image=image, mask_image=mask, negative_prompt=NEGATIVE, height=16, width=16,
                   generator=torch.Generator().manual_seed(4), **kwargs).images
    got = ours.inpaint(PROMPTS, image, mask, negative_prompt=NEGATIVE, sampler=sampler,
                       generator=torch.Generator().manual_seed(4), **kwargs).images
    assert np.stack(got).shape == expected.shape == (2, 16, 16, 3)
    assert max_gap(got, expected) <= ATOL, (channels, name, max_gap(got, expected))
    other = ours.inpaint(PROMPTS, image, mask, negative_prompt=NEGATIVE, sampler=sampler,
                         generator=torch.Generator().manual_seed(5), **kwargs).images
    assert max_gap(other, expected) > 100 * ATOL  # the seed matters: the check can fail


@pytest.mark.parametrize("channels", [4, 9])
def test_inpaint_seed_and_soft_tensor_mask_match_diffusers(channels, pipes):
    """``seed`` means diffusers' ``generator=torch.Generator().manual_seed(seed)``; a soft float
    mask tensor is binarised at 0.5 as the reference's mask processor does."""
    ref, ours, _ = pipes[channels]
    ref.scheduler, _ = samplers(pipes[channels], "ddim")
    image = picture(seed=7)
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., 2:9, 6:15] = 0.7
    mask[..., 9:12, 6:15] = 0.4  # below 0.5: kept
    kwargs = dict(num_inference_steps=5, guidance_scale=4.0, output_type="np")
    expected = ref(PROMPTS[0], image=image, mask_image=mask, height=16, width=16,
                   generator=torch.Generator().manual_seed(11), **kwargs).images
    got = ours.inpaint(PROMPTS[0], image, mask, seed=11, sampler="ddim", **kwargs).images
    assert max_gap(got, expected) <= ATOL


def test_padding_mask_crop_matches_diffusers(pipes):
    """"Only masked": a 40×28 picture, a small mask, a 16×16 working crop pasted back."""
    ref, ours, _ = pipes[9]
    ref.scheduler, _ = samplers(pipes[9], "ddim")
    image, mask = picture((40, 28), seed=9), box_mask((40, 28), (20, 6, 27, 11))
    kwargs = dict(num_inference_steps=5, guidance_scale=7.5, padding_mask_crop=3, height=16, width=16)
    expected = ref(PROMPTS[0], image=image, mask_image=mask, generator=torch.Generator().manual_seed(2),
                   **kwargs).images[0]
    got = ours.inpaint(PROMPTS[0], image, mask, sampler="ddim", generator=torch.Generator().manual_seed(2),
                       **kwargs).images[0]
    a, b = np.asarray(got, dtype=int), np.asarray(expected, dtype=int)
    assert got.size == expected.size == (40, 28)
    assert np.abs(a - b).max() <= 1 and (a != b).mean() < 0.02
    # outside the mask the input survives exactly; inside it was repainted
    keep = np.asarray(mask) == 0
    assert np.array_equal(a[keep], np.asarray(image, dtype=int)[keep])
    assert np.abs(a[~keep] - np.asarray(image, dtype=int)[~keep]).mean() > 10
    as_np = ours.inpaint(PROMPTS[0], image, mask, sampler="ddim", generator=torch.Generator().manual_seed(2),
                         output_type="np", **kwargs).images[0]
    assert np.abs(as_np * 255 - a).max() < 1e-3


def test_paste_back_matches_diffusers_overlay(pipes):
    ref, ours, _ = pipes[4]
    ref.scheduler, _ = samplers(pipes[4], "ddim")
    image, mask = picture(seed=5), box_mask(box=(0, 0, 9, 7))
    kwargs = dict(num_inference_steps=4, guidance_scale=7.5, height=16, width=16)
    generated = ref(PROMPTS[0], image=image, mask_image=mask, generator=torch.Generator().manual_seed(1),
                    **kwargs).images[0]
    expected = np.asarray(ref.image_processor.apply_overlay(mask, image, generated), dtype=int)
    got = ours.inpaint(PROMPTS[0], image, mask, sampler="ddim", generator=torch.Generator().manual_seed(1),
                       paste_back=True, num_inference_steps=4).images[0]
    got = np.asarray(got, dtype=int)
    assert np.abs(got - expected).max() <= 1
    keep = np.asarray(mask) == 0
    assert np.array_equal(got[keep], np.asarray(image, dtype=int)[keep])
    without = np.asarray(ours.inpaint(PROMPTS[0], image, mask, sampler="ddim", num_inference_steps=4,
                                      generator=torch.Generator().manual_seed(1)).images[0], dtype=int)
    assert np.abs(without[keep] - got[keep]).max() > 2  # the VAE round trip alone changes kept pixels


def test_latent_blend_keeps_the_clean_latents_outside_the_mask(pipes):
    """4-channel rule: after the last step there is no next timestep, so the original latents
    (the seeded posterior sample, first draw of the generator) are pasted in unnoised."""
    _, ours, _ = pipes[4]
    image, mask = picture(seed=2), box_mask(box=(4, 4, 12, 12))
    out = ours.inpaint(PROMPTS[0], image, mask, sampler="euler", seed=8, num_inference_steps=4,
                       output_type="latent")
    expected = ours.encode_image(ministd.data.pil_to_tensor(image)[None], torch.Generator().manual_seed(8))
    keep = inp.latent_mask(inp.mask_to_tensor(mask), (8, 8)) == 0
    keep = keep.expand_as(out.latents)
    assert torch.equal(out.latents[keep], expected[keep])
    assert (out.latents[~keep] - expected[~keep]).abs().max() > 0.1
    assert torch.equal(out.images[0], out.latents[0])


def test_all_white_mask_and_strength_one_is_text_to_image(pipes):
    """A 4-channel inpaint with nothing kept equals txt2img from the same noise (its second draw)."""
    _, ours, _ = pipes[4]
    white = Image.new("L", (16, 16), 255)
    got = ours.inpaint(PROMPTS[0], picture(), white, sampler="ddim", seed=3, num_inference_steps=4,
                       output_type="np").images
    g = torch.Generator().manual_seed(3)
    torch.randn(1, 4, 8, 8, generator=g)  # the VAE sample of the picture
    noise = torch.randn(1, 4, 8, 8, generator=g)
    expected = ours.txt2img(PROMPTS[0], latents=noise, sampler="ddim", num_inference_steps=4,
                            output_type="np").images
    assert max_gap(got, expected) <= 1e-6
    # below strength 1 it is img2img (a deterministic sampler, so the extra draw does not matter)
    kwargs = dict(sampler="ddim", seed=3, num_inference_steps=5, strength=0.6, output_type="np")
    assert max_gap(ours.inpaint(PROMPTS[0], picture(), white, **kwargs).images,
                   ours.img2img(PROMPTS[0], picture(), **kwargs).images) <= 1e-6


def test_inpaint_strength_too_small_returns_the_round_trip(pipes):
    _, ours, _ = pipes[9]
    image, mask = picture(), box_mask()
    with pytest.warns(UserWarning, match="no denoising step"):
        out = ours.inpaint(PROMPTS[0], image, mask, strength=0.1, num_inference_steps=5, seed=1,
                           output_type="pt")
    expected = ours.encode_image(ministd.data.pil_to_tensor(image)[None], torch.Generator().manual_seed(1))
    assert torch.equal(out.latents, expected)
    with pytest.warns(UserWarning, match="no denoising step"):
        cropped = ours.inpaint(PROMPTS[0], picture((32, 32)), box_mask((32, 32)), strength=0.0, seed=1,
                               padding_mask_crop=2)
    assert cropped.images[0].size == (32, 32)


def test_callback_outpaint_blur_and_dilate(pipes):
    _, ours, _ = pipes[9]
    seen = []
    canvas, mask = inp.outpaint_canvas(picture(), right=16)
    out = ours.inpaint(PROMPTS[0], canvas, mask, seed=0, num_inference_steps=3, sampler="ddim", paste_back=True,
                       callback=lambda i, t, lat, x0: seen.append((i, int(t), tuple(lat.shape))))
    assert [s[0] for s in seen] == [0, 1, 2] and seen[0][2] == (1, 4, 8, 16)
    assert out.images[0].size == (32, 16)
    assert np.array_equal(np.asarray(out.images[0])[:, :16], np.asarray(picture()))
    _, ours4, _ = pipes[4]
    kwargs = dict(seed=0, num_inference_steps=3, sampler="ddim", output_type="np")
    plain = ours4.inpaint(PROMPTS[0], picture(), box_mask(), **kwargs).images[0]
    blurred = ours4.inpaint(PROMPTS[0], picture(), box_mask(), mask_blur=1.5, **kwargs).images[0]
    dilated = ours4.inpaint(PROMPTS[0], picture(), box_mask(), mask_dilate=2, **kwargs).images[0]
    assert np.abs(plain - blurred).max() > 1e-3 and np.abs(plain - dilated).max() > 1e-3


# ------------------------------------------------------------------ img2img
IMG2IMG_CASES = [  # (sampler, strength, steps, spacing, prediction type)
    ("ddim", 0.5, 10, "trailing", "epsilon"),
    ("ddpm", 0.4, 10, "leading", "epsilon"),
    ("pndm", 0.75, 8, "leading", "epsilon"),
    ("euler", 0.6, 10, "linspace", "epsilon"),
    ("euler_a", 0.6, 10, "leading", "epsilon"),
    ("heun", 0.5, 6, "leading", "epsilon"),
    ("dpmpp_2m", 0.3, 10, "trailing", "epsilon"),
    ("dpmpp_2m_karras", 0.8, 10, "leading", "epsilon"),
    ("ddim", 0.15, 10, "leading", "epsilon"),  # one step
    ("ddim", 0.6, 10, "leading", "v_prediction"),  # SD 2.x
    ("euler", 0.6, 10, "trailing", "v_prediction"),
]


@pytest.fixture(scope="module")
def img2img_ref(folder):  # noqa: F811
    pipe = diffusers.StableDiffusionImg2ImgPipeline.from_pretrained(folder, safety_checker=None,
                                                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe, dict(pipe.scheduler.config)


@pytest.mark.parametrize("name, strength, steps, spacing, prediction", IMG2IMG_CASES)
def test_img2img_matches_diffusers(name, strength, steps, spacing, prediction, img2img_ref, pipes):
    ref, _ = img2img_ref
    _, ours, _ = pipes[4]
    ref.scheduler, sampler = samplers(pipes[4], name, timestep_spacing=spacing, prediction_type=prediction)
    image = picture(seed=4)
    kwargs = dict(strength=strength, num_inference_steps=steps, guidance_scale=6.0, output_type="np")
    expected = ref(PROMPTS, image=image, negative_prompt=NEGATIVE, generator=torch.Generator().manual_seed(6),
                   **kwargs).images
    got = ours.img2img(PROMPTS, image, negative_prompt=NEGATIVE, sampler=sampler,
                       generator=torch.Generator().manual_seed(6), **kwargs).images
    assert max_gap(got, expected) <= ATOL, (name, max_gap(got, expected))
    assert list(sampler.timesteps.double()) == list(ref.scheduler.timesteps.double()[-len(sampler.timesteps):])
    other = ours.img2img(PROMPTS, image, negative_prompt=NEGATIVE, sampler=sampler,
                         generator=torch.Generator().manual_seed(7), **kwargs).images
    assert max_gap(other, expected) > 100 * ATOL


@pytest.mark.parametrize("name", ["ddim", "heun", "pndm", "dpmpp_2m"])
def test_img2img_no_step_returns_the_vae_round_trip(name, pipes):
    """Strength 0, or so small that int(N * strength) == 0: the posterior sample, decoded, and a
    warning (PNDM's extra warm-up entry does not count as a step; diffusers would run it)."""
    _, ours, _ = pipes[4]
    image = ministd.data.pil_to_tensor(picture(seed=1))[None]
    for strength in (0.0, 0.09):
        with pytest.warns(UserWarning, match="no denoising step"):
            out = ours.img2img(PROMPTS[0], image, strength=strength, num_inference_steps=10, sampler=name,
                               seed=2, output_type="pt")
        expected = ours.encode_image(image, torch.Generator().manual_seed(2))
        assert torch.equal(out.latents, expected)
        with torch.inference_mode():
            pixels = (ours.vae.decode(ours.vae.unscale_latents(expected)) / 2 + 0.5).clamp(0, 1)
        assert torch.allclose(out.images[0], pixels[0], atol=1e-6)


@pytest.mark.parametrize("name", ["ddim", "euler", "euler_a"])
def test_img2img_strength_one_starts_from_pure_noise(name, pipes):
    """Strength 1 ignores the picture: txt2img from the generator's second draw (the first is the
    VAE sample), continuing the same generator for ancestral noise."""
    _, ours, _ = pipes[4]
    got = ours.img2img(PROMPTS[0], picture(seed=1), strength=1.0, num_inference_steps=5, sampler=name,
                       seed=9, output_type="np").images
    other_picture = ours.img2img(PROMPTS[0], picture(seed=2), strength=1.0, num_inference_steps=5, sampler=name,
                                 seed=9, output_type="np").images
    g = torch.Generator().manual_seed(9)
    torch.randn(1, 4, 8, 8, generator=g)
    noise = torch.randn(1, 4, 8, 8, generator=g)
    expected = ours.txt2img(PROMPTS[0], latents=noise, sampler=name, num_inference_steps=5, generator=g,
                            output_type="np").images
    assert max_gap(got, expected) <= 1e-6 and max_gap(other_picture, expected) <= 1e-6


def test_img2img_strength_one_matches_diffusers_inpainting_with_a_white_mask(pipes):
    """diffusers' inpainting pipeline starts strength 1 from pure noise too (is_strength_max)."""
    ref, ours, _ = pipes[4]
    ref.scheduler, _ = samplers(pipes[4], "ddim")
    image = picture(seed=1)
    kwargs = dict(strength=1.0, num_inference_steps=5, guidance_scale=7.5, output_type="np")
    expected = ref(PROMPTS[0], image=image, mask_image=Image.new("L", (16, 16), 255), height=16, width=16,
                   generator=torch.Generator().manual_seed(3), **kwargs).images
    got = ours.img2img(PROMPTS[0], image, sampler="ddim", seed=3, **kwargs).images
    assert max_gap(got, expected) <= ATOL


# ------------------------------------------------------------------ masks
def test_mask_conversions():
    grey = np.zeros((4, 6), dtype=np.uint8)
    grey[1:3, 2:5] = 255
    expected = torch.from_numpy(grey / 255).float()[None, None]
    rgba = np.dstack([grey] * 3 + [np.full_like(grey, 7)])
    forms = [Image.fromarray(grey), Image.fromarray(grey).convert("1"), Image.fromarray(np.dstack([grey] * 3)),
             Image.fromarray(rgba), Image.fromarray(grey.astype(np.uint16) * 257), grey, grey[..., None],
             np.dstack([grey] * 3), torch.from_numpy(grey), torch.from_numpy(grey > 0),
             torch.from_numpy(grey / 255.0)[None], torch.from_numpy(grey / 255.0)[None, None].expand(1, 3, 4, 6)]
    for form in forms:
        got = inp.mask_to_tensor(form)
        assert got.dtype == torch.float32 and torch.equal(got, expected), type(form)
    batch = inp.mask_to_tensor([Image.fromarray(grey), Image.fromarray(255 - grey)])
    assert batch.shape == (2, 1, 4, 6) and torch.equal(batch[1], 1 - expected[0])


@pytest.mark.parametrize("bad, message", [
    (Image.fromarray(np.dstack([np.zeros((4, 4), np.uint8), np.full((4, 4), 9, np.uint8), np.zeros((4, 4), np.uint8)])),
     "colour channels"),
    (torch.rand(1, 2, 4, 4), "one channel"),
    (torch.rand(1, 3, 4, 4), "differ"),
    (torch.full((4, 4), 255.0), r"\[0, 1\]"),
    (torch.full((4, 4), -0.5), r"\[0, 1\]"),
    (torch.zeros(4, 4, dtype=torch.int64), "dtype"),
    (np.zeros((4, 4), dtype=np.int64), "dtype"),
    (np.zeros((1, 2, 3, 4, 5)), "numpy mask"),
    ("mask.png", "PIL image"),
])
def test_bad_masks(bad, message):
    with pytest.raises(ValueError, match=message):
        inp.mask_to_tensor(bad)


def test_mask_preprocessing_matches_diffusers():
    """Binarise at 0.5 at full size, then nearest-neighbour to latent size (prepare_mask_latents)."""
    rng = np.random.default_rng(0)
    soft = Image.fromarray(rng.integers(0, 256, (16, 24), dtype=np.uint8))
    processor = diffusers.image_processor.VaeImageProcessor(vae_scale_factor=2, do_normalize=False,
                                                            do_binarize=True, do_convert_grayscale=True)
    theirs = processor.preprocess(soft, height=16, width=24)
    ours = inp.binarize_mask(inp.mask_to_tensor(soft))
    assert torch.equal(ours, theirs)
    assert torch.equal(inp.latent_mask(ours, (8, 12)), torch.nn.functional.interpolate(theirs, size=(8, 12)))
    assert torch.equal(inp.binarize_mask(torch.tensor([0.4999, 0.5, 0.9])), torch.tensor([0.0, 1.0, 1.0]))


def test_dilate_and_feather():
    m = torch.zeros(1, 1, 9, 9)
    m[..., 4, 4] = 1
    grown = inp.dilate_mask(m, 2)
    assert grown.sum() == 25 and grown[..., 2:7, 2:7].all()
    assert torch.equal(inp.dilate_mask(m, 0), m) and torch.equal(inp.feather_mask(m, 0), m)
    half = torch.zeros(1, 1, 12, 12)
    half[..., :, 6:] = 1
    soft = inp.feather_mask(half, 1.5)
    assert 0 <= soft.min() and soft.max() <= 1 and torch.allclose(soft[..., :, 5] + soft[..., :, 6], torch.ones(12))
    assert torch.allclose(inp.feather_mask(torch.ones(1, 1, 5, 5), 2.0), torch.ones(1, 1, 5, 5), atol=1e-6)
    assert torch.equal(inp.feather_mask(torch.zeros(1, 1, 5, 5), 2.0), torch.zeros(1, 1, 5, 5))
    binary, soft_out = inp.prepare_mask(half * 0.8, dilate=1, blur=1.0)
    assert binary[0, 0, 0, 5:].tolist() == [1.0] * 7 and binary[0, 0, 0, :5].sum() == 0
    assert 0 < soft_out[..., 0, 3] < soft_out[..., 0, 5] < 1
    assert torch.equal(inp.prepare_mask(half * 0.8)[1], half * 0.8)  # a reader's soft mask stays for paste-back
    for bad in (dict(dilate=-1), dict(dilate=1.5), dict(blur=-1.0), dict(blur=float("inf"))):
        with pytest.raises(ValueError):
            inp.prepare_mask(half, **bad)


@pytest.mark.parametrize("size, box, work, pad", [
    ((40, 28), (20, 6, 27, 11), (16, 16), 3),
    ((40, 28), (0, 0, 5, 28), (32, 16), 0),
    ((64, 32), (50, 2, 63, 30), (16, 32), 4),
    ((30, 50), (3, 40, 29, 50), (48, 16), 10),
    ((33, 33), (10, 10, 11, 11), (16, 16), 0),
])
def test_crop_helpers_match_diffusers(size, box, work, pad):
    processor = diffusers.image_processor.VaeImageProcessor()
    mask, image = box_mask(size, box), picture(size)
    region = inp.crop_region(mask, *work, pad=pad)
    assert region == processor.get_crop_region(mask, *work, pad=pad)
    crop = image.crop(region)
    assert np.array_equal(np.asarray(inp.resize_and_fill(crop, *work)),
                          np.asarray(processor._resize_and_fill(crop, *work)))
    generated = picture(work, seed=8)
    assert np.array_equal(np.asarray(inp.overlay(mask, image, generated, region)),
                          np.asarray(processor.apply_overlay(mask, image, generated, region)))


def test_outpaint_canvas():
    image = picture((16, 16))
    canvas, mask = inp.outpaint_canvas(image, left=4, bottom=8, overlap=2, multiple=16)
    assert canvas.size == mask.size == (32, 32)  # right grown by 12 to reach a multiple of 16
    a, m = np.asarray(canvas), np.asarray(mask)
    assert np.array_equal(a[:16, 4:20], np.asarray(image))
    assert np.array_equal(a[:16, 0], np.asarray(image)[:, 0])  # "edge" repeats the outermost pixels
    assert (m[:14, 6:18] == 0).all() and m[:, :6].all() and m[14:].all() and m[:, 18:].all()
    assert m[0, 6] == 0  # no overlap on a side that was not extended (top)
    colour, _ = inp.outpaint_canvas(image, top=16, fill=(1, 2, 3))
    assert (np.asarray(colour)[:16] == (1, 2, 3)).all() and colour.size == (16, 32)
    mirror, _ = inp.outpaint_canvas(image, right=2, fill="reflect")
    assert np.array_equal(np.asarray(mirror)[:, 16:18], np.asarray(image)[:, 15:13:-1])
    for bad in (dict(), dict(left=-1), dict(left=2, fill="noise"), dict(left=2, overlap=8)):
        with pytest.raises(ValueError):
            inp.outpaint_canvas(image, **bad)


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize("kwargs, message", [
    (dict(mask_image=box_mask((16, 32))), "same size"),
    (dict(mask_image=Image.fromarray(np.dstack([np.asarray(box_mask())] * 2 + [np.zeros((16, 16), np.uint8)]))),
     "colour channels"),
    (dict(mask_image=torch.rand(1, 2, 16, 16)), "one channel"),
    (dict(mask_image=Image.new("L", (16, 16), 0)), "nothing to inpaint"),
    (dict(mask_image=torch.full((16, 16), 255.0)), r"\[0, 1\]"),
    (dict(strength=1.5), "strength"),
    (dict(strength=-0.1), "strength"),
    (dict(strength=float("nan")), "strength"),
    (dict(image=picture((24, 16)), mask_image=box_mask((24, 16))), "multiple of 16"),
    (dict(image=torch.zeros(1, 4, 16, 16)), "3 colour channels"),
    (dict(padding_mask_crop=2, image=torch.zeros(1, 3, 16, 16)), "PIL"),
    (dict(padding_mask_crop=-2), "padding_mask_crop"),
    (dict(padding_mask_crop=2, output_type="latent"), "latent"),
    (dict(paste_back=True, output_type="latent"), "paste_back"),
    (dict(height=32), "height"),
    (dict(output_type="jpeg"), "output_type"),
    (dict(seed=-1), "seed"),
    (dict(mask_blur=-1), "mask_blur"),
    (dict(num_inference_steps=0), "num_inference_steps"),
    (dict(sampler="nonsense"), "sampler"),
    (dict(prompt=None), "prompt"),
    (dict(guidance_scale=-1.0), "guidance_scale"),
])
def test_bad_inpaint_input_is_refused_before_the_network(kwargs, message, pipes, monkeypatch):
    _, ours, _ = pipes[9]
    calls = []
    monkeypatch.setattr(ours.unet, "forward", lambda *a, **k: calls.append(1))
    args = {"prompt": PROMPTS[0], "image": picture(), "mask_image": box_mask(), "num_inference_steps": 2, **kwargs}
    with pytest.raises(ValueError, match=message):
        ours.inpaint(**args)
    assert not calls, "the network ran before the input was checked"


def test_nine_channel_models_refuse_txt2img_and_img2img(pipes):
    _, ours, _ = pipes[9]
    with pytest.raises(ValueError, match="inpaint"):
        ours.txt2img(PROMPTS[0], num_inference_steps=2)
    with pytest.raises(ValueError, match="inpaint"):
        ours.img2img(PROMPTS[0], picture(), num_inference_steps=2)


def test_sixteen_bit_and_grey_pictures_are_converted_not_clipped(pipes):
    _, ours, _ = pipes[4]
    ramp = (np.arange(256, dtype=np.uint16).reshape(16, 16) * 257)
    pixels = inp.picture_tensor(ours, Image.fromarray(ramp))
    assert pixels.shape == (1, 3, 16, 16)
    assert torch.allclose(pixels[0, 1], torch.from_numpy(ramp / 65535 * 2 - 1).float(), atol=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning for a picture that needs none
        assert inp.picture_tensor(ours, picture().convert("L")).shape == (1, 3, 16, 16)
