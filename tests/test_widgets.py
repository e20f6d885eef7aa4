"""The chapters' apps: each plain function, and the widget that wraps it.

Chapter 00's caption app; chapter 11's sketches and strength slider; chapter 12's masks and
mask picker (the widgets are driven by setting their values, as a reader's clicks do).
"""

import datetime
import io
import warnings

import numpy as np
import pytest
from PIL import Image

from ministd.data import PALETTE, ShapesWorld, parse_caption
from ministd.widgets import (SKETCH_PROMPTS, YOUR_PICTURE, caption_app, caption_image, img2img_image, inpaint_app,
                             inpaint_image, mask_overlay, masks, object_mask, sketches, start_image, strength_app,
                             strength_image, strength_steps, strength_text)


def test_caption_image_and_errors():
    image, attrs = caption_image("a large yellow triangle at the bottom", seed=0)
    assert image.size == (256, 256) and attrs["objects"][0]["shape"] == "triangle"
    grey, message = caption_image("a pink circle")
    assert "pink" in message and grey.getpixel((0, 0)) == (200, 200, 200)


def test_seed_slider_redraws():
    app = caption_app("a small red circle")
    text, seed, picture, info = app.children
    first = picture.value
    changed = False
    for s in range(1, 6):  # the seed picks the background the caption leaves open
        seed.value = s
        changed |= picture.value != first
    assert changed
    text.value = "a big green box in the top right"
    assert "square" in info.value


# ------------------------------------------------ chapter 11: sketches and the strength app

@pytest.fixture(scope="module")
def pipe(one_thread):
    import ministd

    pipe = ministd.load_pipeline("shapes")
    pipe.progress_bar = False
    return pipe


def test_sketches_are_crude_deterministic_pictures():
    drawn = sketches()
    assert len(drawn) >= 3 and set(drawn) == set(SKETCH_PROMPTS)
    again = sketches()
    palette = np.array(list(PALETTE.values()), dtype=float)
    for name, image in drawn.items():
        assert image.mode == "RGB" and image.size == (64, 64), name
        assert image.tobytes() == again[name].tobytes(), f"{name} is not the same every call"
        pixels = np.asarray(image, dtype=float).reshape(-1, 3)
        assert len(np.unique(pixels, axis=0)) > 3, f"{name} is not a drawing"
        # a sketch, not a ShapesWorld render: its background is off the palette
        corner = pixels[0]
        assert np.sqrt(((palette - corner) ** 2).sum(1)).min() > 5, name
        parse_caption(SKETCH_PROMPTS[name])                       # every prompt is in the grammar
    assert sketches(32)["red blob on blue"].size == (32, 32)


def test_start_image_takes_pictures_paths_and_bytes(tmp_path):
    rgba = Image.new("RGBA", (100, 60), (255, 0, 0, 128))
    assert start_image(rgba).size == (64, 64) and start_image(rgba).mode == "RGB"
    path = tmp_path / "mine.png"
    Image.new("L", (30, 30), 200).save(path)
    assert start_image(path, 32).getpixel((5, 5)) == (200, 200, 200)
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(buffer, format="PNG")
    assert start_image(buffer.getvalue()).getpixel((0, 0)) == (1, 2, 3)


def test_strength_steps_follow_the_rule(pipe):
    assert strength_steps(pipe, 0.5, 20) == (451, 10)     # leading spacing, steps_offset 1: 20 - 10 skipped
    assert strength_steps(pipe, 1.0, 20)[1] == 20
    assert strength_steps(pipe, 0.04, 20) == (None, 0)    # int(0.8) = 0 steps
    assert strength_steps(pipe, 0.5, 10, sampler="heun")[1] == 9
    assert "no step" in strength_text(pipe, 0.0) and "10 of the 20 steps" in strength_text(pipe, 0.5)


def test_strength_image_moves_with_strength(pipe):
    sketch = sketches()["yellow triangle on purple"]
    prompt = SKETCH_PROMPTS["yellow triangle on purple"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")                       # strength 0 is quiet in the app
        low = strength_image(pipe, prompt, sketch, strength=0.0, num_inference_steps=4, scale=1)
    high = strength_image(pipe, prompt, sketch, strength=1.0, num_inference_steps=4, scale=1)
    assert low.size == high.size == (2 * 64 + 8, 64)
    left, right = (np.asarray(low.crop((0, 0, 64, 64)), dtype=float), np.asarray(low.crop((72, 0, 136, 64)),
                   dtype=float))
    far = np.asarray(high.crop((72, 0, 136, 64)), dtype=float)
    # strength 0 gives the VAE's round trip, much closer to the sketch than strength 1's new picture
    assert np.abs(right - left).mean() < 0.5 * np.abs(far - left).mean()
    # the reader's own picture of any size is fitted first
    odd = strength_image(pipe, prompt, Image.new("RGB", (90, 50), (10, 200, 10)), strength=0.3,
                         num_inference_steps=4, scale=2)
    assert odd.size == (2 * 128 + 8, 128)
    assert img2img_image(pipe, prompt, sketch, strength=0.5, num_inference_steps=4, scale=1).size == (136, 64)


def test_strength_app_redraws(pipe):
    app = strength_app(pipe)
    (picker, upload), text, (strength, cfg), (steps, seed), picture, info = (
        app.children[0].children, app.children[1], app.children[2].children, app.children[3].children,
        app.children[4], app.children[5])
    steps.value = 4
    first = picture.value
    strength.value = 1.0
    assert picture.value != first and "4 of the 4 steps" in info.value
    strength.value = 0.0
    assert "no step" in info.value
    strength.value = 0.5
    other = next(n for n in picker.options if n != picker.value)
    before = picture.value
    picker.value = other
    assert text.value == SKETCH_PROMPTS[other] and picture.value != before
    # an uploaded file becomes the starting picture
    buffer = io.BytesIO()
    Image.new("RGB", (50, 50), (240, 240, 240)).save(buffer, format="PNG")
    before = picture.value
    upload.value = ({"name": "mine.png", "type": "image/png", "size": len(buffer.getvalue()),
                     "content": memoryview(buffer.getvalue()),
                     "last_modified": datetime.datetime(2024, 1, 1, tzinfo=datetime.timezone.utc)},)
    assert picker.value == YOUR_PICTURE and picture.value != before
    text.value = "a pink circle"                          # the pipeline accepts any text; nothing breaks
    assert picture.value


def test_strength_app_starts_from_the_readers_picture(pipe):
    mine = ShapesWorld(seed=5)[0][0]
    app = strength_app(pipe, image=mine, prompt="a red square")
    picker, text = app.children[0].children[0], app.children[1]
    assert picker.value == YOUR_PICTURE and picker.options[0] == YOUR_PICTURE and text.value == "a red square"


# ------------------------------------------------ chapter 12: masks and the mask picker

def test_masks_are_binary_and_where_they_say():
    chosen = masks()
    assert {"centre box", "left half", "blob", "border"} <= set(chosen)
    for name, mask in chosen.items():
        values = np.asarray(mask)
        assert mask.mode == "L" and mask.size == (64, 64), name
        assert set(np.unique(values)) == {0, 255}, f"{name} is not binary"
    box = np.asarray(chosen["centre box"]) > 0
    assert box.sum() == 32 * 32 and box[32, 32] and not box[0, 0]
    half = np.asarray(chosen["left half"]) > 0
    assert half[:, :32].all() and not half[:, 32:].any()
    border = np.asarray(chosen["border"]) > 0
    assert border[0].all() and not border[32, 32]
    assert masks(32)["centre box"].size == (32, 32)


def test_object_masks_cover_the_scene_object():
    world = ShapesWorld(seed=3)
    image, _, attrs = world[4]
    _, jitter, _ = world.attributes(4)
    exact = np.asarray(object_mask(attrs, jitter)) > 0
    pixels = np.asarray(image, dtype=float)
    background = np.array(PALETTE[attrs["background"]], dtype=float)
    solid = np.sqrt(((pixels - background) ** 2).sum(-1)) > 100     # clearly object pixels
    assert solid.sum() > 20 and exact[solid].mean() > 0.99
    grown = np.asarray(object_mask(attrs, jitter, grow=2)) > 0
    assert grown[exact].all() and grown.sum() > exact.sum()
    chosen = masks(64, attrs, jitter)
    obj, box = np.asarray(chosen["object"]) > 0, np.asarray(chosen["box around object"]) > 0
    assert box[exact].all() and obj[exact].all() and box.sum() >= obj.sum() - 1


def test_mask_overlay_tints_only_the_mask():
    image = Image.new("RGB", (64, 64), (0, 100, 0))
    shown = np.asarray(mask_overlay(image, masks()["left half"]))
    assert (shown[:, 40] == (0, 100, 0)).all() and shown[10, 10, 0] > 100


def test_inpaint_image_keeps_the_outside_with_paste_back(pipe):
    world = ShapesWorld(seed=3)
    image, _, attrs = world[4]
    _, jitter, _ = world.attributes(4)
    mask = masks(64, attrs, jitter)["box around object"]
    strip = inpaint_image(pipe, "a white circle", image, mask, num_inference_steps=3, paste_back=True, scale=1)
    assert strip.size == (3 * 64 + 16, 64)
    result = np.asarray(strip.crop((144, 0, 208, 64)), dtype=int)
    keep = np.asarray(mask) == 0
    assert (np.abs(result[keep] - np.asarray(image, dtype=int)[keep]) <= 1).all()
    assert np.asarray(strip.crop((0, 0, 64, 64))).tobytes() == np.asarray(image).tobytes()
    named = inpaint_image(pipe, "a white circle", image, "centre box", num_inference_steps=2, scale=1)
    assert named.size == strip.size
    with pytest.raises(ValueError, match="unknown mask"):
        inpaint_image(pipe, "a white circle", image, "a mask that does not exist")


def test_inpaint_app_picks_masks(pipe):
    app = inpaint_app(pipe)
    (mask, paste), text, (strength, cfg), (seed, blur), picture, status = (
        app.children[0].children, app.children[1], app.children[2].children, app.children[3].children,
        app.children[4], app.children[5])
    assert mask.value == "object" and "box around object" in mask.options
    first = picture.value
    mask.value = "left half"
    assert picture.value != first
    before = picture.value
    blur.value = 2.0
    assert picture.value != before
    paste.value = True
    assert picture.value and "result" in status.value
    own = inpaint_app(pipe, Image.new("RGB", (64, 64), (40, 80, 220)), choices={"only": masks()["blob"]})
    assert own.children[0].children[0].options == ("only",)


def test_figure_titles_keep_their_line_breaks():
    from ministd.viz import _wrap

    assert _wrap("strength 0.6\n12 steps", 30) == "strength 0.6\n12 steps"
    assert _wrap("a small red circle in the top left", 12) == "a small red\ncircle in\nthe top left"


# ------------------------------------------------ chapter 16: the adapter scale slider

def test_adapter_scale_image_sets_the_scale_first(pipe):
    from ministd.widgets import adapter_scale_image

    seen = []
    image = adapter_scale_image(pipe, "a red circle", seen.append, 0.5, num_inference_steps=2, size=2)
    assert seen == [0.5] and image.size == (128, 128)
    with pytest.raises(ValueError, match="scale must be a number"):
        adapter_scale_image(pipe, "a red circle", seen.append, "high")


def test_adapter_scale_app_redraws_with_the_lora_scale(pipe):
    import torch

    from ministd.adapters import add_lora, new_lora
    from ministd.widgets import adapter_scale_app

    lora = new_lora(pipe, rank=2, name="test-scale")
    for layer in lora.layers.values():                    # a LoRA that changes something
        layer.up.data.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
    add_lora(pipe, lora)
    try:
        app = adapter_scale_app(pipe, lambda v: pipe.set_lora_scale("test-scale", v))
        text, (scale, seed), picture, status = app.children[0], app.children[1].children, app.children[2], \
            app.children[3]
        first = picture.value
        scale.value = 0.0
        assert picture.value != first and lora.scale == 0.0 and status.value == ""
    finally:
        pipe.unload_lora("test-scale")


def test_depth2img_image_and_app_redraw():
    import ministd
    from ministd.depth import estimate_depth
    from ministd.widgets import depth2img_app, depth2img_image, depth_picture

    depth_pipe = ministd.load_pipeline("shapes-depth")
    picture = ShapesWorld(seed=4)[0][0]
    row = depth2img_image(depth_pipe, "a red circle", picture, 0.8, num_inference_steps=3, scale=1)
    assert row.size == (3 * 64 + 16, 64)
    shown_depth = np.asarray(row.crop((72, 0, 136, 64)))[..., 0]
    assert np.array_equal(shown_depth, np.asarray(depth_picture(estimate_depth(picture)))[..., 0])
    app = depth2img_app(depth_pipe, picture, prompt="a blue square")
    text, (strength, cfg, seed), image, status = app.children[0], app.children[1].children, app.children[2], \
        app.children[3]
    first = image.value
    strength.value = 1.0
    assert image.value != first and status.value == ""
    strength.value = 0.0                     # no step to run: the picture's VAE round trip, no error
    assert image.value != first and status.value == ""
