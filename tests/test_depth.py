"""Depth-to-image (ministd.depth, chapter 16) and ShapesWorld's depth maps.

- ShapesWorld's depth (ministd.data.draw_depth): background 0, objects where the
  picture's objects are (every object pixel has a depth; every pixel an object
  covers wholly has exactly that object's depth r / NEAREST_EXTENT and is an
  object pixel; 64 scenes), larger = nearer.
- estimate_depth reads that depth off the picture: mask IoU >= 0.95 and each
  object's depth within 0.1 of the truth (the bounding box of a triangle or star
  is not exactly 2r), on 64 scenes.
- prepare_depth_map equals diffusers' ``StableDiffusionDepth2ImgPipeline.prepare_depth_map``
  (float32, atol 1e-6), and the whole depth2img equals diffusers' pipeline on a tiny
  random 5-channel model loaded from a diffusers folder (pixels in [0, 1], atol 2e-5,
  the tolerance of tests/test_pipelines.py's img2img parity).
- depth_unet's zero-initialised channel: the new U-Net computes exactly what the old
  one does whatever the depth says.
- Bad input is refused before any network runs.
"""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch

from ministd.data import ALL_SHAPES, NEAREST_EXTENT, SIZES, ShapesWorld, draw_depth, draw_scene
from ministd.depth import depth_unet, estimate_depth, is_depth_unet, prepare_depth_map
from ministd.train.adherence import label_regions, object_mask
from ministd.unet import UNet, shapes_tiny

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

PARITY_ATOL = 2e-5
PROMPTS = ["a small red circle in the top left", "a big blue box on a yellow background"]


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


# --------------------------------------------------------------------- the world's depth
def test_depth_map_puts_objects_where_the_picture_has_them():
    world = ShapesWorld(seed=5, objects=(1, 2), shapes=ALL_SHAPES)
    for i in range(64):
        attrs, jitter, _ = world.attributes(i)
        depth = draw_depth(attrs, 64, jitter)
        assert depth.shape == (64, 64) and depth.dtype == np.float32
        assert depth.min() == 0.0 and depth.max() <= 1.0
        mask = object_mask(np.asarray(draw_scene(attrs, 64, jitter)))
        assert not (mask & (depth == 0)).any(), i             # every object pixel has a depth
        for obj, (_, _, scale) in zip(attrs["objects"], jitter):
            value = np.float32(SIZES[obj["size"]] * scale / NEAREST_EXTENT)
            inside = np.isclose(depth, value, rtol=0, atol=1e-6)   # pixels the object covers wholly
            assert inside.sum() > 20 and mask[inside].all(), i
        assert np.array_equal(world.depth(i), depth)


def test_larger_objects_are_nearer():
    attrs = {"background": "blue", "objects": [
        {"shape": "circle", "color": "red", "size": "small", "position": "top left"},
        {"shape": "square", "color": "green", "size": "large", "position": "bottom right"}]}
    depth = draw_depth(attrs)
    small, large = depth[:24, :24].max(), depth[40:, 40:].max()
    assert 0 < small < large <= 1
    assert small == pytest.approx(0.10 / (0.19 * 1.08), abs=1e-3)   # r / NEAREST_EXTENT, no jitter
    assert depth[0, 63] == 0 and depth[63, 0] == 0


def test_estimated_depth_agrees_with_the_true_depth():
    world = ShapesWorld(seed=11, objects=(1, 2), shapes=ALL_SHAPES)
    ious = []
    for i in range(64):
        picture, _, attrs = world[i]
        truth, guess = world.depth(i), estimate_depth(picture)
        assert not ((guess > 0) & (truth == 0)).any(), i      # no depth where the truth has none
        ious.append(_iou(guess > 0, truth > 0))
        for obj, (_, _, scale) in zip(attrs["objects"], world.attributes(i)[1]):
            value = np.float32(SIZES[obj["size"]] * scale / NEAREST_EXTENT)
            inside = np.isclose(truth, value, rtol=0, atol=1e-6)
            # a bounding box is 1.8r (square) to 2.2r (star) wide, not 2r: up to ~0.11 off
            assert np.abs(guess[inside] - value).max() <= 0.12, (i, obj)
    # object_mask drops faint anti-aliased edge pixels (more of them on low-contrast colours)
    assert min(ious) >= 0.7 and np.mean(ious) >= 0.85, (min(ious), np.mean(ious))


def test_touching_objects_keep_their_own_depths():
    attrs = {"background": "yellow", "objects": [
        {"shape": "square", "color": "black", "size": "medium", "position": "top right"},
        {"shape": "triangle", "color": "blue", "size": "small", "position": "top"}]}
    jitter = [(-0.05, 0.0, 1.08), (0.05, 0.0, 1.08)]          # pushed together until they touch
    picture = draw_scene(attrs, 64, jitter)
    labels, n = label_regions(object_mask(np.asarray(picture)))
    assert n == 1                                             # one blob of object pixels ...
    guess = estimate_depth(picture)
    square, triangle = guess[4:20, 44:60], guess[8:20, 28:36]
    assert np.median(square[square > 0]) > np.median(triangle[triangle > 0]) + 0.15   # ... two depths


# --------------------------------------------------------------------- the U-Net
def test_zero_initialised_depth_channel_changes_nothing():
    torch.manual_seed(0)
    base = UNet(shapes_tiny(cross_attention_dim=16)).eval()
    with torch.no_grad():
        for p in base.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    deep = depth_unet(base).eval()
    assert is_depth_unet(deep) and not is_depth_unet(base)
    assert deep.config.in_channels == 5 and deep.conv_in.weight[:, 4].abs().max() == 0
    x, ctx = torch.randn(2, 4, 16, 16), torch.randn(2, 7, 16)
    t = torch.tensor([10, 700])
    with torch.no_grad():
        want = base(x, t, ctx)
        for depth in (torch.zeros(2, 1, 16, 16), torch.randn(2, 1, 16, 16)):
            assert torch.equal(deep(torch.cat([x, depth], 1), t, ctx), want)
        deep.conv_in.weight[:, 4] += 0.1           # once the channel learns, the depth matters
        assert (deep(torch.cat([x, torch.randn(2, 1, 16, 16)], 1), t, ctx) - want).abs().max() > 1e-3


# --------------------------------------------------------------------- parity
def test_prepare_depth_map_matches_diffusers():
    from diffusers import StableDiffusionDepth2ImgPipeline as Ref

    depth = torch.rand(2, 40, 24, generator=torch.Generator().manual_seed(0)) * 3
    image = [torch.zeros(3, 64, 32)] * 2                 # only its size is read: 64 x 32 pixels
    fake = types.SimpleNamespace(vae_scale_factor=8)
    want = Ref.prepare_depth_map(fake, image, depth, 2, False, torch.float32, torch.device("cpu"))
    got = prepare_depth_map(depth, (8, 4))
    assert got.shape == want.shape == (2, 1, 8, 4)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    assert got.amin() == -1 and got.amax() == 1
    # forms: [H, W], [B, 1, H, W], numpy; a flat map is all background (-1), where the reference gives NaN
    torch.testing.assert_close(prepare_depth_map(depth[0].numpy(), (8, 4)), got[:1])
    torch.testing.assert_close(prepare_depth_map(depth[:, None], (8, 4)), got)
    assert torch.equal(prepare_depth_map(torch.ones(5, 5), (2, 2)), torch.full((1, 1, 2, 2), -1.0))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random SD 2-depth-type model: diffusers' pipeline and ministd's, from one folder."""
    from test_tokenizer import write_hf_tokenizer_files

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("tiny_depth")
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=5, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        norm_num_groups=16, cross_attention_dim=32, attention_head_dim=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    vae = diffusers.AutoencoderKL(
        latent_channels=4, block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=16, sample_size=16)
    text_encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407))
    for module in (unet, vae, text_encoder):
        with torch.no_grad():
            for p in module.parameters():
                p.add_(torch.randn_like(p) * 0.02)
    tok = write_hf_tokenizer_files(root / "tok")
    tokenizer = transformers.CLIPTokenizer(str(tok / "vocab.json"), str(tok / "merges.txt"),
                                           pad_token="<|endoftext|>", model_max_length=77)
    scheduler = diffusers.DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                        clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    diffusers.StableDiffusionPipeline(vae=vae, text_encoder=text_encoder.eval(), tokenizer=tokenizer, unet=unet,
                                      scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                      requires_safety_checker=False).save_pretrained(root / "pipe")
    ref = diffusers.StableDiffusionDepth2ImgPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                                    unet=unet, scheduler=scheduler, depth_estimator=None,
                                                    feature_extractor=None)
    ref.set_progress_bar_config(disable=True)
    from ministd.pipelines import load_pipeline

    ours = load_pipeline(root / "pipe")
    ours.progress_bar = False
    return ref, ours


@pytest.mark.parametrize("strength", [0.6, 0.9])
def test_depth2img_matches_diffusers(tiny, strength):
    ref, ours = tiny
    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(3)) * 2 - 1
    depth = torch.rand(1, 16, 16, generator=torch.Generator().manual_seed(5))
    kwargs = dict(strength=strength, num_inference_steps=10, guidance_scale=6.0, output_type="np")
    want = ref(PROMPTS, image=(image + 1) / 2, depth_map=depth, negative_prompt=["blurry", ""],
               generator=torch.Generator().manual_seed(4), **kwargs).images
    got = np.stack(ours.depth2img(PROMPTS, image, depth_map=depth, negative_prompt=["blurry", ""],
                                  generator=torch.Generator().manual_seed(4), **kwargs).images)
    assert got.shape == want.shape == (2, 16, 16, 3)
    assert np.abs(got - want).max() <= PARITY_ATOL, np.abs(got - want).max()
    other = np.stack(ours.depth2img(PROMPTS, image, depth_map=1 - depth, negative_prompt=["blurry", ""],
                                    generator=torch.Generator().manual_seed(4), **kwargs).images)
    assert np.abs(other - want).max() > 100 * PARITY_ATOL        # the depth does reach the U-Net


def test_depth2img_reads_the_depth_off_the_picture_when_none_is_given(tiny):
    _, ours = tiny
    world = ShapesWorld(seed=2, size=16)
    picture = world[0][0]
    run = dict(num_inference_steps=4, seed=1, output_type="latent")
    guessed = ours.depth2img("a red circle", picture, **run).latents
    given = ours.depth2img("a red circle", picture, depth_map=estimate_depth(picture), **run).latents
    assert torch.equal(guessed, given)


# --------------------------------------------------------------------- bad input
@pytest.mark.parametrize("kwargs, message", [
    (dict(strength=1.5), "strength"),
    (dict(strength=float("nan")), "strength"),
    (dict(output_type="jpeg"), "output_type"),
    (dict(seed=-1), "seed"),
    (dict(depth_map=torch.rand(2, 3, 16, 16)), r"depth_map must be .*\[B, 1, H, W\]"),
    (dict(depth_map=torch.full((16, 16), float("nan"))), "NaN"),
    (dict(depth_map=torch.rand(3, 16, 16)), r"depth_map holds 3 pictures for 2 prompts"),
    (dict(depth_map="near"), "depth_map must be"),
    (dict(depth_map=torch.rand(1, 16)), r"depth_map must be at least 2x2"),
    (dict(image=torch.rand(3, 3, 16, 16)), r"image holds 3 pictures for 2 prompts"),
    (dict(image=torch.rand(1, 3, 15, 16)), "height"),
])
def test_bad_input_is_refused_before_the_network(tiny, monkeypatch, kwargs, message):
    _, ours = tiny
    calls = []
    monkeypatch.setattr(ours.unet, "forward", lambda *a, **k: calls.append(1))
    args = {"prompt": PROMPTS, "image": torch.zeros(1, 3, 16, 16), **kwargs}
    with pytest.raises(ValueError, match=message):
        ours.depth2img(**args)
    assert not calls


def test_each_pipeline_kind_refuses_the_other_methods(tiny):
    _, ours = tiny
    with pytest.raises(ValueError, match=r"depth U-Net .* use pipe.depth2img"):
        ours.txt2img("a red circle")
    with pytest.raises(ValueError, match=r"depth U-Net .* use pipe.depth2img"):
        ours.img2img("a red circle", torch.zeros(1, 3, 16, 16))
    plain = types.SimpleNamespace(unet=types.SimpleNamespace(config=types.SimpleNamespace(in_channels=4,
                                                                                          out_channels=4)))
    from ministd.depth import depth2img

    with pytest.raises(ValueError, match=r"depth2img needs a depth U-Net .* this one takes 4"):
        depth2img(plain, "a red circle", torch.zeros(1, 3, 16, 16))
