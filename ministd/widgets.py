"""ipywidgets apps for the chapters.

Every app is a thin shell around a plain function (``*_image``) that takes
the slider values and returns a picture: tests call the function directly,
and the rendered book shows its output as a static figure.
"""

from __future__ import annotations

import io
import math
import warnings

import numpy as np
from PIL import Image

from ministd.data import ShapesWorld


def caption_image(caption: str, seed: int = 0, scale: int = 4) -> tuple[Image.Image, dict | str]:
    """The ground-truth picture of ``caption`` (or a grey square and the error message)."""
    try:
        image, attrs = ShapesWorld().render(caption, seed=seed)
    except ValueError as exc:
        return Image.new("RGB", (64 * scale, 64 * scale), (200, 200, 200)), str(exc)
    return image.resize((64 * scale, 64 * scale), Image.Resampling.NEAREST), attrs


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def caption_app(caption: str = "a large yellow triangle at the bottom on a blue background"):
    """A text box and a seed slider; the picture redraws as you type or slide.

    The seed fills in what the caption leaves out (size, position, background).
    """
    import ipywidgets as w

    text = w.Text(value=caption, description="caption", layout=w.Layout(width="520px"),
                  continuous_update=False)
    seed = w.IntSlider(value=0, min=0, max=20, description="seed")
    picture = w.Image(format="png", width=256, height=256)
    info = w.HTML()

    def redraw(_=None):
        image, attrs = caption_image(text.value, seed.value)
        picture.value = _png(image)
        info.value = f"<code>{attrs}</code>"

    text.observe(redraw, names="value")
    seed.observe(redraw, names="value")
    redraw()
    return w.VBox([text, seed, picture, info])


# ---------------------------------------------------------------- text to image

SAMPLER_CHOICES = ("ddim", "euler", "euler_a", "heun", "dpmpp_2m", "dpmpp_2m_karras", "pndm", "ddpm")


def txt2img_image(pipe, prompt: str, guidance_scale: float = 7.5, num_inference_steps: int = 20,
                  seed: int = 0, sampler: str = "ddim", negative_prompt: str | None = None,
                  previews: bool = False, scale: int = 4) -> Image.Image:
    """One picture from ``pipe.txt2img`` (upscaled for the screen); with ``previews``,
    a strip of the decoded x0 prediction after every step, then the picture."""
    frames = []

    def keep(step, t, latents, x0_pred):
        frames.append(x0_pred[:1].clone())

    out = pipe.txt2img(prompt, negative_prompt=negative_prompt or None, guidance_scale=guidance_scale,
                       num_inference_steps=num_inference_steps, seed=seed, sampler=sampler,
                       callback=keep if previews else None)
    image = out.images[0]
    side = image.size[0] * scale
    image = image.resize((side, side), Image.Resampling.NEAREST)
    if not previews:
        return image
    shown = [pipe.decode(f, "pil")[0].resize((side // 2, side // 2), Image.Resampling.NEAREST) for f in frames]
    strip = Image.new("RGB", (side // 2 * len(shown) + side, side), "white")
    for k, frame in enumerate(shown):
        strip.paste(frame, (k * (side // 2), side // 4))
    strip.paste(image, (side // 2 * len(shown), 0))
    return strip


def txt2img_app(pipe, prompt: str = "a small red circle in the top left on a blue background"):
    """Sliders for guidance scale, steps and seed, a sampler menu, a prompt box and an
    optional per-step preview strip; every change redraws with :func:`txt2img_image`."""
    import ipywidgets as w

    pipe.progress_bar = False
    text = w.Text(value=prompt, description="prompt", layout=w.Layout(width="520px"), continuous_update=False)
    negative = w.Text(value="", description="negative", layout=w.Layout(width="520px"), continuous_update=False)
    cfg = w.FloatSlider(value=7.5, min=0.0, max=20.0, step=0.5, description="CFG scale", continuous_update=False)
    steps = w.IntSlider(value=20, min=1, max=50, description="steps", continuous_update=False)
    seed = w.IntSlider(value=0, min=0, max=100, description="seed", continuous_update=False)
    sampler = w.Dropdown(options=SAMPLER_CHOICES, value="ddim", description="sampler")
    previews = w.Checkbox(value=False, description="per-step previews")
    picture = w.Image(format="png")
    status = w.HTML()

    def redraw(_=None):
        try:
            image = txt2img_image(pipe, text.value, cfg.value, steps.value, seed.value, sampler.value,
                                  negative.value, previews.value)
            picture.value = _png(image)
            status.value = ""
        except ValueError as exc:
            status.value = f"<b>{exc}</b>"

    for control in (text, negative, cfg, steps, seed, sampler, previews):
        control.observe(redraw, names="value")
    redraw()
    return w.VBox([text, negative, w.HBox([cfg, steps]), w.HBox([seed, sampler, previews]), picture, status])


def img2img_image(pipe, prompt: str, image: Image.Image, strength: float = 0.6,
                  guidance_scale: float = 7.5, num_inference_steps: int = 20, seed: int = 0,
                  sampler: str = "ddim", scale: int = 4) -> Image.Image:
    """The input picture and ``pipe.img2img``'s result side by side."""
    out = pipe.img2img(prompt, image, strength=strength, guidance_scale=guidance_scale,
                       num_inference_steps=num_inference_steps, seed=seed, sampler=sampler).images[0]
    side = out.size[0] * scale
    pair = Image.new("RGB", (2 * side + 8, side), "white")
    pair.paste(image.resize((side, side), Image.Resampling.NEAREST), (0, 0))
    pair.paste(out.resize((side, side), Image.Resampling.NEAREST), (side + 8, 0))
    return pair


def _strength_controls(prompt: str, strength: float):
    """The widgets of a picture-to-picture app: prompt box, strength, CFG and seed sliders, picture."""
    import ipywidgets as w

    text = w.Text(value=prompt, description="prompt", layout=w.Layout(width="520px"), continuous_update=False)
    slider = w.FloatSlider(value=strength, min=0.0, max=1.0, step=0.05, description="strength",
                           continuous_update=False)
    cfg = w.FloatSlider(value=7.5, min=0.0, max=20.0, step=0.5, description="CFG scale", continuous_update=False)
    seed = w.IntSlider(value=0, min=0, max=100, description="seed", continuous_update=False)
    return text, slider, cfg, seed, w.Image(format="png")


def img2img_app(pipe, image: Image.Image, prompt: str = "a large blue square in the center"):
    """A denoising-strength slider (and CFG, seed) over :func:`img2img_image`."""
    import ipywidgets as w

    pipe.progress_bar = False
    text, strength, cfg, seed, picture = _strength_controls(prompt, 0.6)

    def redraw(_=None):
        picture.value = _png(img2img_image(pipe, text.value, image, strength.value, cfg.value, seed=seed.value))

    for control in (text, strength, cfg, seed):
        control.observe(redraw, names="value")
    redraw()
    return w.VBox([text, w.HBox([strength, cfg, seed]), picture])


# ------------------------------------------------------------ image to image (chapter 11)

def _wobbly(rng, cx: float, cy: float, rx: float, ry: float, points: int = 14, wobble: float = 0.18):
    """A closed hand-drawn loop around (cx, cy): an ellipse whose radius wanders."""
    out = []
    for k in range(points):
        a = 2 * math.pi * k / points
        r = 1 + rng.uniform(-wobble, wobble)
        out.append((cx + rx * r * math.cos(a), cy + ry * r * math.sin(a)))
    return out


def _shaky(rng, corners, jitter: float):
    """A polygon's corners, each moved by up to ``jitter`` pixels (a hand's imprecision)."""
    return [(x + rng.uniform(-jitter, jitter), y + rng.uniform(-jitter, jitter)) for x, y in corners]


def _red_blob(draw, rng, s):
    draw.polygon(_wobbly(rng, 0.5 * s, 0.52 * s, 0.25 * s, 0.21 * s), fill=(205, 60, 45))
    for _ in range(4):                                   # strokes that leave the outline
        x, y = rng.uniform(0.3, 0.7) * s, rng.uniform(0.35, 0.7) * s
        draw.line([(x, y), (x + rng.uniform(-0.12, 0.12) * s, y + rng.uniform(-0.12, 0.12) * s)],
                  fill=(230, 90, 60), width=max(1, s // 32))


def _yellow_triangle(draw, rng, s):
    corners = _shaky(rng, [(0.5 * s, 0.2 * s), (0.82 * s, 0.78 * s), (0.2 * s, 0.74 * s)], 0.04 * s)
    draw.polygon(corners, fill=(235, 200, 70))
    draw.line(corners + corners[:1], fill=(190, 150, 30), width=max(1, s // 21), joint="curve")


def _green_box(draw, rng, s):
    corners = _shaky(rng, [(0.25 * s, 0.28 * s), (0.74 * s, 0.25 * s), (0.77 * s, 0.73 * s), (0.27 * s, 0.76 * s)],
                     0.03 * s)
    draw.polygon(corners, fill=(120, 190, 110))
    for k in range(6):                                   # hatching, as with a felt pen
        y = (0.32 + 0.08 * k) * s
        draw.line([(0.28 * s, y + rng.uniform(-1, 1)), (0.72 * s, y + 0.03 * s)], fill=(40, 150, 60),
                  width=max(1, s // 32))
    draw.line(corners + corners[:1], fill=(30, 110, 50), width=max(1, s // 32))


def _blue_doodle(draw, rng, s):
    for turn in range(3):                                # three loops of a scribbled circle, not filled
        loop = _wobbly(rng, (0.5 + 0.02 * turn) * s, (0.5 - 0.015 * turn) * s, (0.22 - 0.05 * turn) * s,
                       (0.23 - 0.05 * turn) * s, points=11, wobble=0.12)
        draw.line(loop + loop[:1], fill=(45, 85, 205), width=max(1, s // 26), joint="curve")


# name -> (background colour, drawing, the prompt the sketch stands for)
SKETCHES = {
    "red blob on blue": ((55, 95, 200), _red_blob, "a red circle on a blue background"),
    "yellow triangle on purple": ((150, 75, 175), _yellow_triangle, "a yellow triangle on a purple background"),
    "green box on white": ((235, 232, 225), _green_box, "a green square on a white background"),
    "blue doodle on yellow": ((238, 212, 85), _blue_doodle, "a blue circle on a yellow background"),
}


def sketches(size: int = 64) -> dict[str, Image.Image]:
    """A few crude pictures drawn with PIL, as a reader might with a mouse: name -> RGB picture.

    Off-palette colours, wobbly outlines, hatching and a scribble that is only a
    line; the same every call. :data:`SKETCH_PROMPTS` holds the prompt each one
    stands for.
    """
    import random

    from PIL import ImageDraw

    out = {}
    for name, (background, drawing, _) in SKETCHES.items():
        big = size * 4                                   # drawn at 4x, then box-filtered down
        image = Image.new("RGB", (big, big), background)
        drawing(ImageDraw.Draw(image), random.Random(f"sketch:{name}"), big)
        out[name] = image.resize((size, size), Image.Resampling.BOX)
    return out


SKETCH_PROMPTS: dict[str, str] = {name: prompt for name, (_, _, prompt) in SKETCHES.items()}


def start_image(image, size: int = 64) -> Image.Image:
    """A reader's picture as a starting point: a PIL image, a file path or the bytes of an
    image file -> RGB, centre-cropped to a square and resized to ``size``×``size``."""
    from PIL import ImageOps

    if isinstance(image, (bytes, bytearray, memoryview)):
        image = Image.open(io.BytesIO(bytes(image)))
    elif not isinstance(image, Image.Image):
        image = Image.open(image)
    return ImageOps.fit(image.convert("RGB"), (size, size), Image.Resampling.LANCZOS)


def strength_steps(pipe, strength: float, num_inference_steps: int = 20,
                   sampler: str | None = None) -> tuple[int | None, int]:
    """(first timestep, model calls) that img2img runs for ``strength`` with ``pipe``'s schedule and
    its own sampler (or the one named); (None, 0) when no step runs."""
    from ministd.samplers import make_sampler

    sampler = make_sampler(sampler or pipe.scheduler.name, config=pipe.scheduler.config)
    sampler.set_timesteps(num_inference_steps, strength=strength)
    if len(sampler.timesteps) == 0 or int(num_inference_steps * strength) == 0:
        return None, 0
    return int(sampler.timesteps[0]), len(sampler.timesteps)


def strength_text(pipe, strength: float, num_inference_steps: int = 20, sampler=None) -> str:
    """One line saying where img2img starts and how much of the schedule it runs."""
    first, calls = strength_steps(pipe, strength, num_inference_steps, sampler)
    if first is None:
        return (f"strength {strength:g} × {num_inference_steps} steps leaves no step to run: "
                "the picture only makes the round trip through the VAE")
    return (f"strength {strength:g}: noised to timestep {first} of {pipe.scheduler.config.num_train_timesteps}, "
            f"then {calls} of the {num_inference_steps} steps run")


def strength_image(pipe, prompt: str, image: Image.Image, strength: float = 0.6, guidance_scale: float = 7.5,
                   num_inference_steps: int = 20, seed: int = 0, sampler: str | None = None,
                   scale: int = 4) -> Image.Image:
    """What the strength app draws: the start picture and ``pipe.img2img``'s result side by side
    (no warning when the strength runs no step: the result is then the VAE's round trip)."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*leaves no denoising step.*")
        return img2img_image(pipe, prompt, start_image(image, pipe.default_size), strength, guidance_scale,
                             num_inference_steps, seed, sampler, scale)


YOUR_PICTURE = "your picture"


def _uploaded_bytes(value) -> bytes | None:
    """The file content of a FileUpload value (ipywidgets 8: tuple of dicts; 7: dict of dicts)."""
    files = list(value.values()) if isinstance(value, dict) else list(value or ())
    return bytes(files[-1]["content"]) if files else None


def strength_app(pipe, image: Image.Image | None = None, prompt: str | None = None):
    """Image to image with a denoising-strength slider (chapter 11).

    Pick a starting picture (one of :func:`sketches`, ``image`` when given, or a
    file you upload), a prompt, the strength, guidance scale, steps and seed;
    every change redraws with :func:`strength_image`, and a line under the
    picture says where the chain starts (:func:`strength_text`).
    """
    import ipywidgets as w

    pipe.progress_bar = False
    pictures = sketches(pipe.default_size)
    if image is not None:
        pictures = {YOUR_PICTURE: start_image(image, pipe.default_size), **pictures}
    first = next(iter(pictures))
    start = w.Dropdown(options=list(pictures), value=first, description="start from")
    upload = w.FileUpload(accept="image/*", multiple=False, description="upload")
    text = w.Text(value=prompt or SKETCH_PROMPTS.get(first, "a red circle on a blue background"),
                  description="prompt", layout=w.Layout(width="520px"), continuous_update=False)
    strength = w.FloatSlider(value=0.6, min=0.0, max=1.0, step=0.05, description="strength",
                             continuous_update=False)
    cfg = w.FloatSlider(value=7.5, min=0.0, max=20.0, step=0.5, description="CFG scale", continuous_update=False)
    steps = w.IntSlider(value=20, min=1, max=50, description="steps", continuous_update=False)
    seed = w.IntSlider(value=0, min=0, max=100, description="seed", continuous_update=False)
    picture = w.Image(format="png")
    info = w.HTML()

    def redraw(_=None):
        try:
            picture.value = _png(strength_image(pipe, text.value, pictures[start.value], strength.value, cfg.value,
                                                steps.value, seed.value))
            info.value = strength_text(pipe, strength.value, steps.value)
        except ValueError as exc:
            info.value = f"<b>{exc}</b>"

    def pick(change):
        wanted = SKETCH_PROMPTS.get(change["new"])
        if wanted is not None and wanted != text.value:
            text.value = wanted                          # the prompt box's observer redraws
        else:
            redraw()

    def uploaded(change):
        content = _uploaded_bytes(change["new"])
        if content is None:
            return
        try:
            pictures[YOUR_PICTURE] = start_image(content, pipe.default_size)
        except Exception as exc:  # not a picture PIL can read
            info.value = f"<b>could not read the upload: {exc}</b>"
            return
        if YOUR_PICTURE not in start.options:
            start.options = [YOUR_PICTURE, *[o for o in start.options if o != YOUR_PICTURE]]
        if start.value == YOUR_PICTURE:
            redraw()
        else:
            start.value = YOUR_PICTURE

    start.observe(pick, names="value")
    upload.observe(uploaded, names="value")
    for control in (text, strength, cfg, steps, seed):
        control.observe(redraw, names="value")
    redraw()
    return w.VBox([w.HBox([start, upload]), text, w.HBox([strength, cfg]), w.HBox([steps, seed]), picture, info])


# ------------------------------------------------------------------ inpainting (chapter 12)

def object_mask(attrs: dict, jitter=None, size: int = 64, grow: int = 0) -> Image.Image:
    """The mask of a ShapesWorld scene's objects ("L", 255 on them), from its attributes: the
    scene drawn again with white objects on black (same jitter), binarised, grown by ``grow``
    pixels in every direction."""
    from ministd.data import draw_scene

    white = {"background": "black", "objects": [dict(o, color="white") for o in attrs["objects"]]}
    mask = np.asarray(draw_scene(white, size, jitter).convert("L")) >= 128
    if grow:
        padded = np.pad(mask, grow)
        mask = np.zeros_like(mask)
        for dy in range(2 * grow + 1):
            for dx in range(2 * grow + 1):
                mask |= padded[dy:dy + size, dx:dx + size]
    return Image.fromarray(mask.astype(np.uint8) * 255)


def masks(size: int = 64, attrs: dict | None = None, jitter=None) -> dict[str, Image.Image]:
    """A few masks to inpaint with (white = repaint): name -> "L" picture ``size``×``size``.

    "centre box" (the middle half of each side), "left half", "blob" (a wobbly
    round patch right of centre), "border" (a frame a sixth of the side wide, all
    round), and, given a scene's ``attrs`` (and ``jitter``), "object" (its
    objects, grown by a sixteenth of the side) and "box around object".
    """
    import random

    from PIL import ImageDraw

    out = {}
    square = Image.new("L", (size, size), 0)
    ImageDraw.Draw(square).rectangle((size // 4, size // 4, 3 * size // 4 - 1, 3 * size // 4 - 1), fill=255)
    out["centre box"] = square
    half = Image.new("L", (size, size), 0)
    ImageDraw.Draw(half).rectangle((0, 0, size // 2 - 1, size - 1), fill=255)
    out["left half"] = half
    big = 4 * size
    blob = Image.new("L", (big, big), 0)
    ImageDraw.Draw(blob).polygon(_wobbly(random.Random("mask:blob"), 0.6 * big, 0.55 * big, 0.24 * big, 0.2 * big),
                                 fill=255)
    out["blob"] = blob.resize((size, size), Image.Resampling.BOX).point(lambda v: 255 if v >= 128 else 0)
    frame = Image.new("L", (size, size), 255)
    ImageDraw.Draw(frame).rectangle((size // 6, size // 6, size - size // 6 - 1, size - size // 6 - 1), fill=0)
    out["border"] = frame
    if attrs is not None:
        out["object"] = object_mask(attrs, jitter, size, grow=max(1, size // 16))
        m = np.asarray(object_mask(attrs, jitter, size)) > 0
        ys, xs = np.nonzero(m)
        pad = max(1, size // 16)
        box = np.zeros_like(m)
        box[max(ys.min() - pad, 0):ys.max() + 1 + pad, max(xs.min() - pad, 0):xs.max() + 1 + pad] = True
        out["box around object"] = Image.fromarray(box.astype(np.uint8) * 255)
    return out


def mask_overlay(image: Image.Image, mask: Image.Image, color=(255, 0, 255), alpha: float = 0.55) -> Image.Image:
    """``image`` with the masked (white) region tinted by ``color``: what will be repainted."""
    tint = Image.new("RGB", image.size, color)
    weight = Image.fromarray((np.asarray(mask.convert("L"), dtype=np.float32) * alpha).astype(np.uint8))
    return Image.composite(tint, image.convert("RGB"), weight)


def inpaint_image(pipe, prompt: str, image: Image.Image, mask, strength: float = 1.0, guidance_scale: float = 7.5,
                  seed: int = 0, num_inference_steps: int = 20, mask_blur: float = 0.0, paste_back: bool = False,
                  sampler: str | None = None, scale: int = 4) -> Image.Image:
    """What the mask picker draws: the picture, the mask over it (tinted) and ``pipe.inpaint``'s
    result, side by side. ``mask``: a PIL mask of the picture's size, or a name of :func:`masks`."""
    image = image.convert("RGB")
    if isinstance(mask, str):
        choices = masks(image.width)
        if mask not in choices:
            raise ValueError(f"unknown mask {mask!r}; the named masks are {', '.join(choices)}")
        mask = choices[mask]
    out = pipe.inpaint(prompt, image, mask, strength=strength, guidance_scale=guidance_scale, seed=seed,
                       num_inference_steps=num_inference_steps, mask_blur=mask_blur, paste_back=paste_back,
                       sampler=sampler).images[0]
    side = out.size[0] * scale
    panels = [image, mask_overlay(image, mask), out]
    strip = Image.new("RGB", (3 * side + 16, side), "white")
    for k, panel in enumerate(panels):
        strip.paste(panel.resize((side, side), Image.Resampling.NEAREST), (k * (side + 8), 0))
    return strip


def inpaint_app(pipe, image: Image.Image | None = None, prompt: str = "a large yellow triangle",
                choices: dict[str, Image.Image] | None = None):
    """Inpainting with a mask picker (chapter 12): choose a mask, write what goes in it.

    ``image`` defaults to a ShapesWorld picture, whose object's own mask is then
    among the choices; ``choices`` (name -> mask) replaces :func:`masks`. Sliders
    for strength, guidance scale, seed and feathering (``mask_blur``), and a
    paste-back switch; every change redraws with :func:`inpaint_image`.
    """
    import ipywidgets as w

    pipe.progress_bar = False
    if image is None:
        world = ShapesWorld(seed=1)
        attrs, jitter, _ = world.attributes(4)                # a white triangle on the right, on red
        image = world[4][0]
        choices = choices or masks(image.width, attrs, jitter)
    image = image.convert("RGB")
    choices = dict(choices or masks(image.width))
    first = "object" if "object" in choices else next(iter(choices))
    mask = w.Dropdown(options=list(choices), value=first, description="mask")
    text = w.Text(value=prompt, description="prompt", layout=w.Layout(width="520px"), continuous_update=False)
    strength = w.FloatSlider(value=1.0, min=0.05, max=1.0, step=0.05, description="strength",
                             continuous_update=False)
    cfg = w.FloatSlider(value=7.5, min=0.0, max=20.0, step=0.5, description="CFG scale", continuous_update=False)
    seed = w.IntSlider(value=0, min=0, max=100, description="seed", continuous_update=False)
    blur = w.FloatSlider(value=0.0, min=0.0, max=4.0, step=0.5, description="feather", continuous_update=False)
    paste = w.Checkbox(value=False, description="paste back")
    picture = w.Image(format="png")
    status = w.HTML()

    def redraw(_=None):
        try:
            picture.value = _png(inpaint_image(pipe, text.value, image, choices[mask.value], strength.value,
                                               cfg.value, seed.value, mask_blur=blur.value, paste_back=paste.value))
            status.value = "left: the picture; middle: what the mask repaints; right: the result"
        except ValueError as exc:
            status.value = f"<b>{exc}</b>"

    for control in (mask, text, strength, cfg, seed, blur, paste):
        control.observe(redraw, names="value")
    redraw()
    return w.VBox([w.HBox([mask, paste]), text, w.HBox([strength, cfg]), w.HBox([seed, blur]), picture, status])


# ---------------------------------------------------------------- adapters (chapter 16)

def adapter_scale_image(pipe, prompt: str, set_scale, scale: float = 1.0, guidance_scale: float = 7.5,
                        num_inference_steps: int = 20, seed: int = 0, size: int = 4) -> Image.Image:
    """One picture with an adapter at ``scale``: ``set_scale(scale)`` is called first (e.g.
    ``lambda s: pipe.set_lora_scale("shapes-outline", s)``, or a hypernetwork's strength)."""
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise ValueError(f"scale must be a number, got {scale!r}")
    set_scale(float(scale))
    image = pipe.txt2img(prompt, guidance_scale=guidance_scale, num_inference_steps=num_inference_steps,
                         seed=seed).images[0]
    side = image.size[0] * size
    return image.resize((side, side), Image.Resampling.NEAREST)


def adapter_scale_app(pipe, set_scale, prompt: str = "a large red circle on a blue background",
                      label: str = "LoRA scale"):
    """A scale slider (0 to 1.5) for an adapter, a prompt box and a seed slider; every change
    redraws with :func:`adapter_scale_image`."""
    import ipywidgets as w

    pipe.progress_bar = False
    text = w.Text(value=prompt, description="prompt", layout=w.Layout(width="520px"), continuous_update=False)
    scale = w.FloatSlider(value=1.0, min=0.0, max=1.5, step=0.05, description=label, continuous_update=False)
    seed = w.IntSlider(value=0, min=0, max=100, description="seed", continuous_update=False)
    picture = w.Image(format="png")
    status = w.HTML()

    def redraw(_=None):
        try:
            picture.value = _png(adapter_scale_image(pipe, text.value, set_scale, scale.value, seed=seed.value))
            status.value = ""
        except ValueError as exc:
            status.value = f"<b>{exc}</b>"

    for control in (text, scale, seed):
        control.observe(redraw, names="value")
    redraw()
    return w.VBox([text, w.HBox([scale, seed]), picture, status])


# ------------------------------------------------------------ depth-to-image (chapter 16)

def depth_picture(depth, size: int = 64) -> Image.Image:
    """A depth map [H, W] in [0, 1] (larger = nearer) as a grey RGB picture of ``size`` pixels."""
    values = np.clip(np.asarray(depth, dtype=np.float64), 0.0, 1.0)
    grey = Image.fromarray((values * 255).round().astype(np.uint8))
    return grey.resize((size, size), Image.Resampling.NEAREST).convert("RGB")


def depth2img_image(pipe, prompt: str, image: Image.Image, strength: float = 0.8, depth_map=None,
                    guidance_scale: float = 7.5, num_inference_steps: int = 20, seed: int = 0,
                    scale: int = 4) -> Image.Image:
    """The picture, the depth the U-Net reads (``depth_map``, or the one read off the picture by
    :func:`ministd.depth.estimate_depth`) and ``pipe.depth2img``'s result, side by side."""
    from ministd.depth import estimate_depth

    depth = estimate_depth(image) if depth_map is None else np.asarray(depth_map, dtype=np.float32)
    out = pipe.depth2img(prompt, image, depth_map=depth, strength=strength, guidance_scale=guidance_scale,
                         num_inference_steps=num_inference_steps, seed=seed).images[0]
    side = out.size[0] * scale
    row = Image.new("RGB", (3 * side + 16, side), "white")
    for k, picture in enumerate((image.convert("RGB"), depth_picture(depth, out.size[0]), out)):
        row.paste(picture.resize((side, side), Image.Resampling.NEAREST), (k * (side + 8), 0))
    return row


def depth2img_app(pipe, image: Image.Image, prompt: str = "a large green triangle on a purple background",
                  depth_map=None):
    """A strength slider (and CFG, seed, prompt) over :func:`depth2img_image`."""
    import ipywidgets as w

    pipe.progress_bar = False
    text, strength, cfg, seed, picture = _strength_controls(prompt, 0.8)
    status = w.HTML()

    def redraw(_=None):
        try:
            with warnings.catch_warnings():      # strength 0 runs no step: the VAE round trip is the answer
                warnings.simplefilter("ignore")
                picture.value = _png(depth2img_image(pipe, text.value, image, strength.value, depth_map,
                                                     cfg.value, seed=seed.value))
            status.value = ""
        except ValueError as exc:
            status.value = f"<b>{exc}</b>"

    for control in (text, strength, cfg, seed):
        control.observe(redraw, names="value")
    redraw()
    return w.VBox([text, w.HBox([strength, cfg, seed]), picture, status])


# ------------------------------------------------------------ SDXL in miniature (chapters 13-14)

def _live(picture, status, draw, controls) -> None:
    """Redraw ``picture`` with ``draw()`` now and whenever a control changes; a ValueError
    (a bad prompt or setting) is shown in ``status`` instead of the picture."""
    def redraw(_=None):
        try:
            picture.value = _png(draw())
            status.value = ""
        except ValueError as exc:
            status.value = f"<b>{exc}</b>"

    for control in controls:
        control.observe(redraw, names="value")
    redraw()


def crop_image(pipe, prompt: str, top: int = 0, left: int = 0, original_side: int | None = None,
               seed: int = 0, num_inference_steps: int = 20, height: int = 64, width: int = 64,
               scale: int = 4) -> Image.Image:
    """An SDXL-type picture with ``crops_coords_top_left=(top, left)`` and, when given,
    ``original_size=(original_side, original_side)``, enlarged ``scale`` times (NEAREST)."""
    sizes = {} if original_side is None else {"original_size": (original_side, original_side)}
    image = pipe.txt2img(prompt, num_inference_steps=num_inference_steps, height=height, width=width, seed=seed,
                         crops_coords_top_left=(top, left), **sizes).images[0]
    return image.resize((width * scale, height * scale), Image.Resampling.NEAREST)


def crop_app(pipe, prompt: str = "a large red circle in the center on a blue background"):
    """Sliders for the crop offset (top, left) and the original size the SDXL-type base is told."""
    import ipywidgets as w

    pipe.progress_bar = False
    text = w.Text(value=prompt, description="prompt", layout=w.Layout(width="520px"), continuous_update=False)
    top = w.IntSlider(value=0, min=0, max=32, step=2, description="crop top", continuous_update=False)
    left = w.IntSlider(value=0, min=0, max=32, step=2, description="crop left", continuous_update=False)
    side = w.IntSlider(value=64, min=32, max=128, step=8, description="original", continuous_update=False)
    seed = w.IntSlider(value=0, min=0, max=100, description="seed", continuous_update=False)
    picture, status = w.Image(format="png"), w.HTML()
    _live(picture, status, lambda: crop_image(pipe, text.value, top.value, left.value, side.value, seed=seed.value),
          (text, top, left, side, seed))
    return w.VBox([text, w.HBox([top, left]), w.HBox([side, seed]), picture, status])


def handoff_image(base, refiner, prompt: str, handoff: float = 0.8, aesthetic_score: float = 6.0,
                  seed: int = 0, num_inference_steps: int = 20, scale: int = 4) -> Image.Image:
    """Base for the steps above ``handoff`` of the noise schedule, the refiner for the rest
    (``denoising_end`` = ``denoising_start`` = handoff); ``handoff`` 1.0 is the base alone."""
    if handoff >= 1.0:
        image = base.txt2img(prompt, num_inference_steps=num_inference_steps, seed=seed).images[0]
    else:
        latents = base.txt2img(prompt, num_inference_steps=num_inference_steps, seed=seed,
                               denoising_end=handoff, output_type="latent").latents
        image = refiner.img2img(prompt, latents, denoising_start=handoff, num_inference_steps=num_inference_steps,
                                aesthetic_score=aesthetic_score, seed=seed).images[0]
    return image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)


def handoff_app(base, refiner, prompt: str = "a small yellow triangle at the top right on a purple background"):
    """Sliders for where the refiner takes over (1.0: never) and the quality score it is asked for."""
    import ipywidgets as w

    base.progress_bar = refiner.progress_bar = False
    text = w.Text(value=prompt, description="prompt", layout=w.Layout(width="520px"), continuous_update=False)
    handoff = w.FloatSlider(value=0.8, min=0.5, max=1.0, step=0.05, description="hand-off", continuous_update=False)
    score = w.FloatSlider(value=6.0, min=0.0, max=6.0, step=0.5, description="quality", continuous_update=False)
    seed = w.IntSlider(value=0, min=0, max=100, description="seed", continuous_update=False)
    picture, status = w.Image(format="png"), w.HTML()
    _live(picture, status, lambda: handoff_image(base, refiner, text.value, handoff.value, score.value, seed=seed.value),
          (text, handoff, score, seed))
    return w.VBox([text, w.HBox([handoff, score, seed]), picture, status])
