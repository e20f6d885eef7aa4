"""SDXL base and refiner pipelines against diffusers' StableDiffusionXL(Img2Img)Pipeline.

Tiny random models with SDXL's structure (a U-Net with the text_time added
embedding, 6 time ids for the base and 5 for the refiner; two CLIP text
encoders of different widths, the second with a projection and a tokenizer
that pads with "!"; the refiner with the second encoder only) are built with
diffusers and transformers, saved as diffusers folders, and loaded by
``ministd.load_pipeline``. Same prompts, latents and sampler must give the
same pictures: txt2img with and without a negative prompt (the base zeroes the
unconditional branch when there is none: ``force_zeros_for_empty_prompt``),
with size and crop conditions, the base -> refiner hand-off at 0.8, and img2img
from a picture.

Tolerance: |difference| <= 2e-5 on pixel values in [0, 1] (float32), as in
tests/test_pipelines.py; each test also checks that a changed condition moves
the picture by far more than that, so it can fail.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import diffusers
import transformers

import ministd
from ministd.pipelines import StableDiffusionPipeline, StableDiffusionXLPipeline
from test_tokenizer import write_hf_tokenizer_files

ATOL = 2e-5
PROMPTS = ["a small red circle in the top left", "a big blue box on a yellow background"]
TIME_DIM = 8          # Fourier features per time id (SDXL: 256)
POOLED = 16           # projection width of the second encoder (SDXL: 1280)


pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py


def _shake(*modules):
    with torch.no_grad():
        for module in modules:
            for p in module.parameters():
                p.add_(torch.randn_like(p) * 0.02)


def _text_encoder(hidden: int, projection: bool, layers: int = 2):
    cfg = transformers.CLIPTextConfig(
        vocab_size=49408, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=hidden // 16, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
        pad_token_id=1, hidden_act="gelu", projection_dim=POOLED)
    cls = transformers.CLIPTextModelWithProjection if projection else transformers.CLIPTextModel
    return cls(cfg)


def _unet(context: int, time_ids: int):
    return diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        norm_num_groups=16, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=[2, 4],
        transformer_layers_per_block=[1, 2], cross_attention_dim=context, use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=TIME_DIM,
        projection_class_embeddings_input_dim=POOLED + time_ids * TIME_DIM)


def _vae():
    return diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32),
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1, norm_num_groups=16, sample_size=16, scaling_factor=0.13025, force_upcast=True)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_sdxl")
    torch.manual_seed(0)
    tok1 = write_hf_tokenizer_files(root / "tok1")
    tok2 = write_hf_tokenizer_files(root / "tok2", pad_token="!")
    tokenizer = transformers.CLIPTokenizer(str(tok1 / "vocab.json"), str(tok1 / "merges.txt"),
                                           pad_token="<|endoftext|>", model_max_length=77)
    tokenizer_2 = transformers.CLIPTokenizer(str(tok2 / "vocab.json"), str(tok2 / "merges.txt"),
                                             pad_token="!", model_max_length=77)
    text_encoder, text_encoder_2 = _text_encoder(32, False), _text_encoder(48, True)
    base_unet, vae = _unet(32 + 48, 6), _vae()
    refiner_unet, refiner_vae = _unet(48, 5), _vae()
    refiner_vae.load_state_dict(vae.state_dict())      # the refiner ships the same VAE
    _shake(text_encoder, text_encoder_2, base_unet, vae, refiner_unet)
    refiner_vae.load_state_dict(vae.state_dict())
    scheduler = diffusers.EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                                 timestep_spacing="leading", steps_offset=1)
    base = diffusers.StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer_2, unet=base_unet, scheduler=scheduler, force_zeros_for_empty_prompt=True)
    refiner = diffusers.StableDiffusionXLImg2ImgPipeline(
        vae=refiner_vae, text_encoder=None, text_encoder_2=text_encoder_2, tokenizer=None, tokenizer_2=tokenizer_2,
        unet=refiner_unet, scheduler=scheduler, requires_aesthetics_score=True, force_zeros_for_empty_prompt=False)
    base.save_pretrained(root / "base", safe_serialization=True)
    refiner.save_pretrained(root / "refiner", safe_serialization=True)
    return root / "base", root / "refiner"


@pytest.fixture(scope="module")
def pipes(folders):
    base_dir, refiner_dir = folders
    ref_base = diffusers.StableDiffusionXLPipeline.from_pretrained(base_dir)
    ref_refiner = diffusers.StableDiffusionXLImg2ImgPipeline.from_pretrained(refiner_dir)
    ours_base, ours_refiner = ministd.load_pipeline(base_dir), ministd.load_pipeline(refiner_dir)
    for p in (ref_base, ref_refiner):
        p.set_progress_bar_config(disable=True)
    for p in (ours_base, ours_refiner):
        p.progress_bar = False
    return ref_base, ref_refiner, ours_base, ours_refiner


def latents(seed: int = 1, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 4, 8, 8, generator=torch.Generator().manual_seed(seed))


def gap(a, b) -> float:
    return float(np.abs(np.stack(a) - np.stack(b)).max())


def test_folders_load_as_the_right_pipelines(pipes):
    _, _, base, refiner = pipes
    assert type(base) is StableDiffusionXLPipeline and not base.is_refiner
    assert base.force_zeros_for_empty_prompt and base.tokenizer_2.pad_token == "!"
    assert type(refiner) is StableDiffusionXLPipeline and refiner.is_refiner
    assert refiner.text_encoder is None and refiner.tokenizer is None and not refiner.force_zeros_for_empty_prompt


@pytest.mark.parametrize("negative", [None, ["blurry", ""]], ids=["zeroed-negative", "negative-prompt"])
def test_base_txt2img_matches_diffusers(pipes, negative):
    ref, _, ours, _ = pipes
    kwargs = dict(num_inference_steps=5, guidance_scale=6.0, output_type="np")
    expected = ref(PROMPTS, negative_prompt=negative, latents=latents(), **kwargs).images
    got = ours.txt2img(PROMPTS, negative_prompt=negative, latents=latents(), **kwargs).images
    assert np.stack(got).shape == (2, 16, 16, 3)
    assert gap(got, expected) <= ATOL, gap(got, expected)
    other = ours.txt2img(PROMPTS, negative_prompt=["a green triangle"] * 2, latents=latents(), **kwargs).images
    assert gap(other, expected) > 100 * ATOL


def test_size_and_crop_conditions_match_diffusers(pipes):
    """One prompt: with several, diffusers 0.42 stacks [negative; positive] time ids and then
    repeats that pair per picture, so in a batch of 2 the second unconditional row gets the
    positive ids and the first conditional row the negative ones. ministd gives every
    unconditional row the negative ids; for one prompt the two agree."""
    ref, _, ours, _ = pipes
    conditions = dict(original_size=(32, 48), crops_coords_top_left=(4, 8), target_size=(16, 16),
                      negative_original_size=(8, 8), negative_crops_coords_top_left=(0, 2),
                      negative_target_size=(24, 24))
    kwargs = dict(num_inference_steps=4, guidance_scale=5.0, output_type="np", negative_prompt="dark")
    expected = ref(PROMPTS[0], latents=latents(2, 1), **kwargs, **conditions).images
    got = ours.txt2img(PROMPTS[0], latents=latents(2, 1), **kwargs, **conditions).images
    assert gap(got, expected) <= ATOL, gap(got, expected)
    plain = ours.txt2img(PROMPTS[0], latents=latents(2, 1), **kwargs).images
    assert gap(plain, expected) > 100 * ATOL
    # without negative sizes, or with one alone (ignored, as in the reference, with a warning),
    # the negative branch repeats the positive conditions: then batches agree too
    del conditions["negative_target_size"]
    expected = ref(PROMPTS, latents=latents(2), **{**kwargs, "negative_prompt": ["", "dark"]}, **conditions).images
    with pytest.warns(UserWarning, match="used only together"):
        got = ours.txt2img(PROMPTS, latents=latents(2), **{**kwargs, "negative_prompt": ["", "dark"]},
                           **conditions).images
    assert gap(got, expected) <= ATOL, gap(got, expected)


@pytest.mark.parametrize("sampler", ["euler", "heun"])
def test_base_to_refiner_hand_off_matches_diffusers(pipes, sampler):
    ref_base, ref_refiner, base, refiner = pipes
    if sampler == "heun":
        for p in (ref_base, ref_refiner):
            p.scheduler = diffusers.HeunDiscreteScheduler.from_config(p.scheduler.config)
    try:
        common = dict(num_inference_steps=6, guidance_scale=5.0)
        ref_latents = ref_base(PROMPTS, latents=latents(3), denoising_end=0.8, output_type="latent", **common).images
        our_latents = base.txt2img(PROMPTS, latents=latents(3), denoising_end=0.8, output_type="latent",
                                   sampler=sampler, **common).latents
        torch.testing.assert_close(our_latents, ref_latents, atol=2e-5, rtol=1e-4)
        expected = ref_refiner(PROMPTS, image=ref_latents, denoising_start=0.8, output_type="np",
                               aesthetic_score=7.0, negative_aesthetic_score=2.0, **common).images
        got = refiner.img2img(PROMPTS, our_latents, denoising_start=0.8, output_type="np", sampler=sampler,
                              aesthetic_score=7.0, negative_aesthetic_score=2.0, **common).images
        assert gap(got, expected) <= ATOL, gap(got, expected)
        other = refiner.img2img(PROMPTS, our_latents, denoising_start=0.8, output_type="np", sampler=sampler,
                                aesthetic_score=1.0, negative_aesthetic_score=9.0, **common).images
        assert gap(other, expected) > 10 * ATOL       # the scores reach the U-Net (a small effect here)
    finally:
        for p in (ref_base, ref_refiner):
            p.scheduler = diffusers.EulerDiscreteScheduler.from_config(p.scheduler.config)


def test_refiner_img2img_from_a_picture_matches_diffusers(pipes):
    _, ref, _, ours = pipes
    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(4)) * 2 - 1
    kwargs = dict(strength=0.6, num_inference_steps=5, guidance_scale=4.0, output_type="np")
    expected = ref(PROMPTS[:1], image=(image + 1) / 2, generator=torch.Generator().manual_seed(5), **kwargs).images
    got = ours.img2img(PROMPTS[:1], image, generator=torch.Generator().manual_seed(5), **kwargs).images
    assert gap(got, expected) <= ATOL, gap(got, expected)


def test_wrong_family_arguments_are_refused(pipes, folders):
    _, _, base, refiner = pipes
    with pytest.raises(ValueError, match="use img2img"):
        refiner.txt2img("a red circle")
    with pytest.raises(ValueError, match="denoising_end must be a number strictly between 0 and 1"):
        base.txt2img("a red circle", denoising_end=1.5)
    with pytest.raises(ValueError, match="original_size must be a pair"):
        base.txt2img("a red circle", original_size=(16,))
    with pytest.raises(ValueError, match="aesthetic_score must be a finite number"):
        refiner.img2img("a red circle", latents(batch=1), aesthetic_score=float("nan"))
    with pytest.raises(ValueError, match="is an SDXL pipeline"):
        StableDiffusionPipeline.from_folder(folders[0])
    sd1 = ministd.load_pipeline("shapes")
    with pytest.raises(TypeError, match="original_size"):
        sd1.txt2img("a red circle", original_size=(64, 64))


def test_long_prompts_and_emphasis_on_both_encoders(pipes):
    """ministd.prompts with SDXL: the same windows for both encoders, the pooled vector of the
    first window, emphasis weighting each encoder's states (not the pooled vector)."""
    ref, _, base, refiner = pipes
    long = ", ".join([PROMPTS[0]] * 12)
    with pytest.warns(UserWarning, match="long_prompts=True"):
        plain, pooled = base.encode_prompt([long])
    expected, _, expected_pooled, _ = ref.encode_prompt(long, device="cpu", do_classifier_free_guidance=False)
    torch.testing.assert_close(plain, expected, atol=1e-6, rtol=0)        # truncated as the reference
    torch.testing.assert_close(pooled, expected_pooled, atol=1e-6, rtol=0)
    states, long_pooled = base.encode_prompt([long], long_prompts=True)
    assert states.shape == (1, 2 * 77, 32 + 48)
    assert torch.equal(states[:, :77], plain)
    torch.testing.assert_close(long_pooled, pooled, atol=1e-6, rtol=0)   # the projection sees a batch of 2
    assert refiner.encode_prompt([long], long_prompts=True)[0].shape == (1, 2 * 77, 48)
    cond, uncond, _, _ = base._conditions([long], None, 1, 5.0, long_prompts=True)   # zeroed negative
    assert uncond.shape == cond.shape == (1, 154, 80) and not uncond.any()
    cond, uncond, _, _ = base._conditions([long], ["dark"], 1, 5.0, long_prompts=True)
    assert uncond.shape == cond.shape == (1, 154, 80)

    a, a_pooled = base.encode_prompt(["a (small:1.0) red circle"], emphasis=True)
    b, b_pooled = base.encode_prompt(["a small red circle"])
    assert torch.equal(a, b) and torch.equal(a_pooled, b_pooled)
    c, c_pooled = base.encode_prompt(["a (small:1.4) red circle"], emphasis=True)
    assert (c - b).abs().max() > 1e-3 and torch.equal(c_pooled, b_pooled)
    for part in (slice(0, 32), slice(32, 80)):                      # each encoder's mean restored on its own
        torch.testing.assert_close(c[..., part].mean(), b[..., part].mean())

    kwargs = dict(negative_prompt="dark", long_prompts=True, emphasis=True, num_inference_steps=3, seed=0)
    handed = base.txt2img(long, denoising_end=0.8, output_type="latent", **kwargs).latents
    assert refiner.img2img(long, handed, denoising_start=0.8, **kwargs).images[0].size == (16, 16)
    # SDXL already reads the penultimate layer: these 2-layer encoders leave nothing more to skip
    with pytest.raises(ValueError, match=r"clip_skip must be an integer in \[0, 0\]"):
        base.txt2img("a red circle", clip_skip=1)
    with pytest.raises(ValueError, match="emphasis must be True or False"):
        refiner.img2img("a red circle", handed, denoising_start=0.8, emphasis=1)
