"""Pipeline parity: ministd's txt2img / img2img against diffusers' StableDiffusionPipeline.

A tiny random model with SD 1.x's structure (4 U-Net levels, cross-attention on
the first three, 2 ResNet blocks per level, a 2-layer CLIP text encoder with
the real 49,408-token vocabulary and tokenizer) is built with diffusers and
transformers, saved as a diffusers folder, and loaded by ministd from that
folder. Same prompt, negative prompt, latents, sampler and guidance must give
the same picture.

Tolerance: |difference| <= 2e-5 on pixel values in [0, 1] (float32): the two
implementations run the same float32 arithmetic in a slightly different order
(fused attention kernels, concatenation order), which leaves differences of a
few 1e-7 per network call that the sampler loop accumulates.
"""

import json

import numpy as np
import pytest
import torch

from ministd.pipelines import StableDiffusionPipeline, load_pipeline
from test_tokenizer import write_hf_tokenizer_files

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

ATOL = 2e-5
PROMPTS = ["a small red circle in the top left", "a big blue box on a yellow background"]
NEGATIVE = ["blurry", ""]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("tiny_sd1")
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(32, 32, 64, 64), norm_num_groups=16, cross_attention_dim=32,
        attention_head_dim=4,  # SD 1.x semantics: the number of heads
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32),
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1, norm_num_groups=16, sample_size=16)
    text_encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
        hidden_act="quick_gelu"))
    for module in (unet, vae, text_encoder):  # random init, then shake every weight off its init value
        with torch.no_grad():
            for p in module.parameters():
                p.add_(torch.randn_like(p) * 0.02)
    tok_dir = write_hf_tokenizer_files(root / "hf_tok")
    tokenizer = transformers.CLIPTokenizer(str(tok_dir / "vocab.json"), str(tok_dir / "merges.txt"),
                                           pad_token="<|endoftext|>", model_max_length=77)
    scheduler = diffusers.PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                        skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False)
    pipe = diffusers.StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                             scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                             requires_safety_checker=False)
    pipe.save_pretrained(root / "pipe", safe_serialization=True)
    return root / "pipe"


@pytest.fixture(scope="module")
def reference(folder):
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None,
                                                             requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def ours(folder):
    pipe = load_pipeline(folder)
    pipe.progress_bar = False
    return pipe


SCHEDULERS = {
    "pndm": ("PNDMScheduler", None),
    "ddim": ("DDIMScheduler", "ddim"),
    "euler": ("EulerDiscreteScheduler", "euler"),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", "dpmpp_2m"),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", "dpmpp_2m_karras"),
    "euler_a": ("EulerAncestralDiscreteScheduler", "euler_a"),
}


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_txt2img_matches_diffusers(name, folder, reference, ours):
    cls_name, ours_name = SCHEDULERS[name]
    base = reference.scheduler.config
    # SD 1.x folders switch DDIM's x0 clipping off (clip_sample: false); so does ministd's loader
    extra = {"clip_sample": False} if name == "ddim" else {}
    if name.endswith("karras"):
        extra["use_karras_sigmas"] = True
    reference.scheduler = getattr(diffusers, cls_name).from_config(base, **extra)
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    kwargs = dict(num_inference_steps=6, guidance_scale=7.5, output_type="np")
    expected = reference(PROMPTS, negative_prompt=NEGATIVE, latents=latents.clone(),
                         generator=torch.Generator().manual_seed(2), **kwargs).images
    got = ours.txt2img(PROMPTS, negative_prompt=NEGATIVE, latents=latents.clone(), sampler=ours_name,
                       generator=torch.Generator().manual_seed(2), **kwargs).images
    got = np.stack(got)
    assert got.shape == expected.shape == (2, 16, 16, 3)
    assert np.abs(got - expected).max() <= ATOL, np.abs(got - expected).max()
    # the check can fail: guidance changes the picture by far more than the tolerance
    other = np.stack(ours.txt2img(PROMPTS, negative_prompt=NEGATIVE, latents=latents.clone(), sampler=ours_name,
                                  generator=torch.Generator().manual_seed(2),
                                  **{**kwargs, "guidance_scale": 3.0}).images)
    assert np.abs(other - expected).max() > 100 * ATOL


def test_seed_means_what_it_means_in_diffusers(reference, ours):
    reference.scheduler = diffusers.DDIMScheduler.from_config(reference.scheduler.config, clip_sample=False)
    expected = reference(PROMPTS[0], num_inference_steps=4, guidance_scale=5.0, output_type="np",
                         generator=torch.Generator("cpu").manual_seed(1234)).images[0]
    got = ours.txt2img(PROMPTS[0], num_inference_steps=4, guidance_scale=5.0, output_type="np",
                       seed=1234, sampler="ddim").images[0]
    assert np.abs(got - expected).max() <= ATOL


def test_img2img_matches_diffusers(folder, ours):
    ref = diffusers.StableDiffusionImg2ImgPipeline.from_pretrained(folder, safety_checker=None,
                                                                  requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    ref.scheduler = diffusers.DDIMScheduler.from_config(ref.scheduler.config, clip_sample=False)
    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(3)) * 2 - 1
    expected = ref(PROMPTS[0], image=(image + 1) / 2, strength=0.6, num_inference_steps=10, guidance_scale=6.0,
                   output_type="np", generator=torch.Generator().manual_seed(4)).images[0]
    got = ours.img2img(PROMPTS[0], image, strength=0.6, num_inference_steps=10, guidance_scale=6.0,
                       output_type="np", sampler="ddim", generator=torch.Generator().manual_seed(4)).images[0]
    assert np.abs(got - expected).max() <= ATOL


def test_callback_output_types_and_previews(ours):
    seen = []
    out = ours.txt2img("a red circle", num_inference_steps=5, seed=0, sampler="ddim", output_type="pt",
                       callback=lambda i, t, lat, x0: seen.append((i, int(t), lat.shape, x0.shape)))
    assert [s[0] for s in seen] == list(range(5)) and seen[0][3] == (1, 4, 8, 8)
    assert out.images[0].shape == (3, 16, 16) and 0 <= out.images[0].min() and out.images[0].max() <= 1
    assert out.latents.shape == (1, 4, 8, 8)
    pil = ours.txt2img("a red circle", num_inference_steps=2, seed=0).images[0]
    assert pil.size == (16, 16)
    latent = ours.txt2img("a red circle", num_inference_steps=2, seed=0, output_type="latent")
    assert torch.equal(latent.images[0], latent.latents[0])


@pytest.mark.parametrize("kwargs, message", [
    (dict(prompt=["a", "b"], negative_prompt=["c"]), "negative_prompt"),
    (dict(guidance_scale=-1.0), "guidance_scale"),
    (dict(guidance_scale=float("nan")), "guidance_scale"),
    (dict(height=20), "height"),
    (dict(width=17), "width"),
    (dict(seed=-5), "seed"),
    (dict(seed=2**64), "seed"),
    (dict(latents=torch.zeros(1, 4, 4, 4)), "latents"),
    (dict(latents=torch.zeros(1, 4, 8, 8, dtype=torch.long)), "latents"),
    (dict(output_type="jpeg"), "output_type"),
    (dict(num_inference_steps=0), "num_inference_steps"),
    (dict(sampler="nonsense"), "sampler"),
    (dict(prompt=None), "prompt"),
])
def test_bad_input_is_refused_before_the_network(kwargs, message, ours, monkeypatch):
    calls = []
    monkeypatch.setattr(ours.unet, "forward", lambda *a, **k: calls.append(1))
    args = {"prompt": "a red circle", **kwargs}
    with pytest.raises(ValueError, match=message):
        ours.txt2img(**args)
    assert not calls, "the network ran before the input was checked"


def test_img2img_strength_checked(ours):
    with pytest.raises(ValueError, match="strength"):
        ours.img2img("a red circle", torch.zeros(1, 3, 16, 16), strength=1.5)


def test_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        StableDiffusionPipeline.from_folder(tmp_path)
    with pytest.raises(FileNotFoundError, match="no model"):
        load_pipeline(tmp_path / "absent")
    (tmp_path / "model_index.json").write_text(json.dumps({}))
    with pytest.raises(FileNotFoundError, match="component"):
        StableDiffusionPipeline.from_folder(tmp_path)


def test_widget_functions_and_sliders(ours):
    from ministd.widgets import img2img_app, img2img_image, txt2img_app, txt2img_image

    a = txt2img_image(ours, "a red circle", guidance_scale=7.5, num_inference_steps=3, seed=0)
    b = txt2img_image(ours, "a red circle", guidance_scale=1.0, num_inference_steps=3, seed=0)
    assert a.size == (64, 64) and a.tobytes() != b.tobytes()
    strip = txt2img_image(ours, "a red circle", num_inference_steps=3, seed=0, previews=True)
    assert strip.size == (32 * 3 + 64, 64)
    app = txt2img_app(ours, "a red circle")
    picture = app.children[4]
    cfg = app.children[2].children[0]
    steps = app.children[2].children[1]
    steps.value = 2
    before = picture.value
    cfg.value = 12.0  # moving the slider redraws the picture
    assert picture.value != before
    image = ours.txt2img("a red circle", num_inference_steps=2, seed=0).images[0]
    pair = img2img_image(ours, "a blue box", image, strength=0.5, num_inference_steps=4)
    assert pair.size == (2 * 64 + 8, 64)
    assert img2img_app(ours, image).children[2].value


def test_no_seed_draws_fresh_noise_without_touching_global_rng(ours):
    state = torch.get_rng_state()
    a = ours.txt2img("a red circle", num_inference_steps=2, output_type="latent").latents
    b = ours.txt2img("a red circle", num_inference_steps=2, output_type="latent").latents
    assert not torch.equal(a, b)
    assert torch.equal(torch.get_rng_state(), state)


# ------------------------------------------------- prompts as readers write them (ministd.prompts)
LONG = ", ".join(["a small red circle in the top left corner of a picture"] * 9)   # ~110 tokens


def test_clip_skip_per_call_is_diffusers_clip_skip(reference, ours):
    """ministd clip_skip=1 = diffusers clip_skip=1 (= the web UIs' "clip skip 2").

    diffusers' rule (StableDiffusionPipeline.encode_prompt): hidden_states[-(clip_skip + 1)],
    then the final LayerNorm. Its own clip_skip path reads ``text_encoder.text_model``, which
    transformers 5's CLIPTextModel no longer has, so the rule is applied here to its encoder.
    """
    expected, _ = reference.encode_prompt(PROMPTS, "cpu", 1, False)
    torch.testing.assert_close(ours.encode_prompt(PROMPTS, clip_skip=None), expected, atol=1e-6, rtol=0)
    ids = reference.tokenizer(PROMPTS, padding="max_length", max_length=77, truncation=True,
                              return_tensors="pt").input_ids
    encoder = reference.text_encoder
    with torch.no_grad():
        hidden = encoder(ids, output_hidden_states=True).hidden_states
        final_norm = getattr(encoder, "text_model", encoder).final_layer_norm
        expected = final_norm(hidden[-(1 + 1)])
    torch.testing.assert_close(ours.encode_prompt(PROMPTS, clip_skip=1), expected, atol=1e-6, rtol=0)
    assert not torch.allclose(ours.encode_prompt(PROMPTS, clip_skip=1), ours.encode_prompt(PROMPTS))
    # None means the pipeline's attribute; txt2img passes the call's value through
    kwargs = dict(num_inference_steps=2, seed=0, sampler="ddim", output_type="latent")
    ours.clip_skip = 1
    try:
        by_attribute = ours.txt2img(PROMPTS[0], **kwargs).latents
    finally:
        ours.clip_skip = 0
    assert torch.equal(ours.txt2img(PROMPTS[0], clip_skip=1, **kwargs).latents, by_attribute)
    assert not torch.equal(ours.txt2img(PROMPTS[0], **kwargs).latents, by_attribute)
    with pytest.raises(ValueError, match=r"clip_skip must be an integer in \[0, 1\].*N - 1"):
        ours.txt2img(PROMPTS[0], clip_skip=2, **kwargs)
    with pytest.raises(ValueError, match="long_prompts"):
        ours.txt2img(PROMPTS[0], long_prompts="yes", **kwargs)


def test_long_prompt_is_truncated_as_the_reference_with_a_warning(reference, ours):
    assert len(ours.tokenizer.encode(LONG)) - 2 > 75
    with pytest.warns(UserWarning, match=r"longer than CLIP's 75 tokens.*long_prompts=True"):
        got = ours.encode_prompt([LONG])
    expected, _ = reference.encode_prompt(LONG, "cpu", 1, False)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


def test_long_prompts_in_75_token_windows(ours, recwarn):
    states = ours.encode_prompt([LONG, PROMPTS[0]], long_prompts=True)
    assert states.shape == (2, 2 * 77, 32)
    assert not [w for w in recwarn if "75 tokens" in str(w.message)], "nothing is cut: no warning"
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = ours.encode_prompt([LONG, PROMPTS[0]])
    assert torch.equal(states[:, :77], plain)                       # the first window is the plain encoding
    second = ours.tokenizer([LONG], chunked=True).input_ids[:, 1]     # the second: its own window, encoded alone
    torch.testing.assert_close(states[:1, 77:], ours.text_encoder(second).last_hidden_state)
    # classifier-free guidance: the short negative is padded with empty windows to the prompt's count
    cond, uncond = ours._conditions([LONG], ["blurry"], 1, 7.5, long_prompts=True)
    assert cond.shape == uncond.shape == (1, 154, 32)
    torch.testing.assert_close(uncond[:, 77:], ours.encode_prompt([""]))
    cond, uncond = ours._conditions(["a cat"], [LONG], 1, 7.5, long_prompts=True)   # and the reverse
    assert cond.shape == uncond.shape == (1, 154, 32)
    image = torch.zeros(1, 3, 16, 16)
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., 4:12, 4:12] = 1
    for out in (ours.txt2img(LONG, negative_prompt="blurry", long_prompts=True, num_inference_steps=2, seed=0),
                ours.img2img(LONG, image, long_prompts=True, num_inference_steps=2, seed=0),
                ours.inpaint(LONG, image, mask, long_prompts=True, num_inference_steps=2, seed=0)):
        assert out.images[0].size == (16, 16)


def test_emphasis_weight_one_is_the_plain_encoding(ours):
    plain = ours.encode_prompt(["a red circle in the top left"])
    assert torch.equal(ours.encode_prompt(["a (red:1.0) circle in the top left"], emphasis=True), plain)
    assert torch.equal(ours.encode_prompt(["a red circle in the top left"], emphasis=True), plain)
    stressed = ours.encode_prompt(["a (red:1.5) circle in the top left"], emphasis=True)
    assert (stressed - plain).abs().max() > 1e-3
    torch.testing.assert_close(stressed.mean(), plain.mean())       # the window's mean is restored
    # without emphasis=True the brackets are ordinary characters, as in the reference
    assert not torch.equal(ours.encode_prompt(["a (red:1.0) circle in the top left"]), plain)
    # the options reach every pipeline call
    latents = dict(num_inference_steps=2, seed=0, sampler="ddim", output_type="latent")
    a = ours.txt2img("a (red:1.5) circle", emphasis=True, **latents).latents
    b = ours.txt2img("a (red:1.5) circle", **latents).latents
    assert not torch.equal(a, b)
    image = torch.zeros(1, 3, 16, 16)
    a = ours.img2img("a (red:1.5) circle", image, emphasis=True, **latents).latents
    b = ours.img2img("a (red:1.5) circle", image, **latents).latents
    assert not torch.equal(a, b)
    mask = torch.ones(1, 1, 16, 16)
    a = ours.inpaint("a (red:1.5) circle", image, mask, emphasis=True, clip_skip=1, **latents).latents
    b = ours.inpaint("a (red:1.5) circle", image, mask, **latents).latents
    assert not torch.equal(a, b)


@pytest.mark.parametrize("kwargs", [dict(prediction_type="v_prediction"), dict(vae="other.safetensors"),
                                    dict(config={}), dict(use_ema=True), dict(allow_pickle=True)])
def test_file_only_options_are_refused_for_folders_and_the_shipped_model(folder, kwargs):
    """Options that only a single file needs are an error for a folder or "shapes", not ignored."""
    name = next(iter(kwargs))
    for where in (folder, "shapes"):
        with pytest.raises(ValueError, match=f"{name} apply to single checkpoint files only"):
            load_pipeline(where, **kwargs)


def test_vae_tiling_and_attention_chunking_equal_diffusers_tiling(folder, ours):
    """Large pictures on small machines: ``enable_vae_tiling`` (tiles of the VAE's sample_size,
    16 px here) and ``enable_attention_chunking`` give diffusers' img2img with its
    ``vae.enable_tiling()`` on a 32x32 picture (2x2 overlapping tiles in the encoder and the
    decoder), to the pipeline tolerance; chunked attention itself changes nothing but
    the order of float32 sums (checked in test_unet.py)."""
    ref = diffusers.StableDiffusionImg2ImgPipeline.from_pretrained(folder, safety_checker=None,
                                                                  requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    ref.scheduler = diffusers.DDIMScheduler.from_config(ref.scheduler.config, clip_sample=False)
    ref.vae.enable_tiling()
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(5)) * 2 - 1
    kwargs = dict(strength=0.7, num_inference_steps=6, guidance_scale=5.0, output_type="np")
    expected = ref(PROMPTS[1], image=(image + 1) / 2, generator=torch.Generator().manual_seed(6), **kwargs).images[0]
    untiled = ours.img2img(PROMPTS[1], image, sampler="ddim", generator=torch.Generator().manual_seed(6),
                           **kwargs).images[0]
    try:
        ours.enable_vae_tiling()
        ours.enable_attention_chunking(7)     # 16 latent tokens per picture at the top level: chunks 7, 7, 2
        got = ours.img2img(PROMPTS[1], image, sampler="ddim", generator=torch.Generator().manual_seed(6),
                           **kwargs).images[0]
    finally:
        ours.disable_vae_tiling()
        ours.disable_attention_chunking()
    assert np.abs(got - expected).max() <= ATOL
    assert np.abs(untiled - expected).max() > 1e-3        # the seams' blending is really in play
    with pytest.raises(ValueError, match="tile_size must be a positive multiple of the VAE's factor 2"):
        ours.enable_vae_tiling(15)
    with pytest.raises(ValueError, match="query_chunk must be a positive int"):
        ours.enable_attention_chunking(0)
