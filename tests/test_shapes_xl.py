"""The shipped SDXL-type models (chapters 13-14): "shapes-xl" and "shapes-xl-refiner".

``python -m ministd.train.sdxl effects`` measures their effects on 64 held-out prompts
(data/shapes_xl_effects.json); these tests re-measure small samples so that a broken
file, loader or pipeline fails loudly, and check the errors readers meet.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import ministd
import ministd.train.sdxl as X
from ministd.pipelines import StableDiffusionPipeline, StableDiffusionXLPipeline


@pytest.fixture(scope="module")
def base():
    pipe = ministd.load_pipeline("shapes-xl")
    pipe.progress_bar = False
    return pipe


@pytest.fixture(scope="module")
def refiner():
    pipe = ministd.load_pipeline("shapes-xl-refiner")
    pipe.progress_bar = False
    return pipe


def test_the_pipelines_are_sdxl_type(base, refiner):
    assert isinstance(base, StableDiffusionXLPipeline) and not base.is_refiner
    assert isinstance(refiner, StableDiffusionXLPipeline) and refiner.is_refiner and refiner.text_encoder is None
    assert base.unet.config.cross_attention_dim == 320 and refiner.unet.config.cross_attention_dim == 192
    assert base.text_encoder.config.hidden_size == 128 and base.text_encoder_2.config.hidden_size == 192
    assert base.force_zeros_for_empty_prompt and refiner.force_zeros_for_empty_prompt
    states, pooled = base.encode_prompt(["a red circle"])
    assert states.shape == (1, 77, 320) and pooled.shape == (1, 192)
    assert refiner.encode_prompt(["a red circle"])[0].shape == (1, 77, 192)
    # the refiner's text encoder is the base's second one: the same states
    torch.testing.assert_close(refiner.encode_prompt(["a red circle"])[0], states[..., 128:], atol=0, rtol=0)


@pytest.mark.parametrize("height, width", [(48, 80), (80, 48), (64, 64)])
def test_buckets_come_out_at_their_size(base, height, width):
    out = base.txt2img("a blue square on a yellow background", num_inference_steps=4, height=height, width=width,
                       seed=0)
    assert out.images[0].size == (width, height) and out.latents.shape == (1, 4, height // 4, width // 4)


def test_base_hands_off_to_the_refiner(base, refiner):
    """denoising_end=0.8 then denoising_start=0.8: 20 steps split 16 / 4 on one timestep list."""
    seen = []
    latents = base.txt2img("a red circle", num_inference_steps=20, seed=1, denoising_end=0.8, output_type="latent",
                           callback=lambda i, t, x, x0: seen.append(int(t))).latents
    refined = refiner.img2img("a red circle", latents, denoising_start=0.8, num_inference_steps=20, seed=1,
                              callback=lambda i, t, x, x0: seen.append(int(t)))
    sampler = base._sampler(None)
    sampler.set_timesteps(20)
    assert seen == [int(t) for t in sampler.timesteps] and sum(t < 200 for t in seen) == 4
    assert refined.images[0].size == (64, 64)


def test_bad_input_is_refused_clearly(base, refiner):
    with pytest.raises(ValueError, match="use img2img"):
        refiner.txt2img("a red circle")
    for value in (0.0, 1.0, 1.5, -0.2):
        with pytest.raises(ValueError, match="denoising_end must be a number strictly between 0 and 1"):
            base.txt2img("a red circle", denoising_end=value)
        with pytest.raises(ValueError, match="denoising_start must be a number strictly between 0 and 1"):
            refiner.img2img("a red circle", torch.zeros(1, 4, 16, 16), denoising_start=value)
    with pytest.raises(ValueError, match="crops_coords_top_left must be a pair of non-negative integers"):
        base.txt2img("a red circle", crops_coords_top_left=(-16, 0))
    with pytest.raises(ValueError, match="original_size must be a pair of non-negative integers"):
        base.txt2img("a red circle", original_size=(64, -1))
    with pytest.raises(ValueError, match="target_size must be a pair"):
        base.txt2img("a red circle", target_size=(64,))
    with pytest.raises(ValueError, match="height must be a positive multiple of 16"):
        refiner.img2img("a red circle", torch.zeros(1, 3, 50, 64), denoising_start=0.8)
    with pytest.raises(ValueError, match="aesthetic_score must be a finite number"):
        refiner.img2img("a red circle", torch.zeros(1, 4, 16, 16), denoising_start=0.8, aesthetic_score="high")
    with pytest.raises(ValueError, match="apply to single checkpoint files only"):
        ministd.load_pipeline("shapes-xl", vae="data/shapes_vae.safetensors")
    # SD-only uses of the SDXL-type pipelines
    with pytest.raises(NotImplementedError, match="inpainting with SDXL pipelines is not built yet"):
        base.inpaint("a red circle", torch.zeros(1, 3, 64, 64), torch.zeros(1, 1, 64, 64))
    with pytest.raises(ValueError, match="depth2img needs a depth U-Net"):
        base.depth2img("a red circle", torch.zeros(1, 3, 64, 64))
    with pytest.raises(TypeError, match="controlnet"):
        refiner.img2img("a red circle", torch.zeros(1, 4, 16, 16), denoising_start=0.8, controlnet=object())
    sd = ministd.load_pipeline("shapes")
    assert type(sd) is StableDiffusionPipeline
    for argument in (dict(original_size=(64, 64)), dict(crops_coords_top_left=(8, 8)), dict(denoising_end=0.8)):
        with pytest.raises(TypeError, match=next(iter(argument))):
            sd.txt2img("a red circle", num_inference_steps=1, **argument)
    with pytest.raises(TypeError, match="aesthetic_score"):
        sd.img2img("a red circle", torch.zeros(1, 3, 64, 64), num_inference_steps=1, aesthetic_score=6.0)


def test_crop_conditioning_moves_objects_up_and_left(base):
    """On 8 held-out prompts: a (16, 16) crop puts the object's centre up and left of where
    (0, 0) puts it, by more than 4 pixels on average each way (the script measures 64)."""
    from ministd.train.adherence import ONE_OBJECT_FORMS, make_prompts

    prompts = [p.text for p in make_prompts(8, forms=ONE_OBJECT_FORMS, seed=100)]
    kwargs = dict(num_inference_steps=20, seed=3)
    plain = base.txt2img(prompts, **kwargs).images
    cropped = base.txt2img(prompts, crops_coords_top_left=(16, 16), **kwargs).images
    shifts = [np.subtract(b, a) for a, b in zip(map(X.object_centroid, plain), map(X.object_centroid, cropped))
              if a is not None and b is not None]
    assert len(shifts) >= 6
    dx, dy = np.mean(shifts, axis=0)
    assert dx < -4 and dy < -4, (dx, dy)
