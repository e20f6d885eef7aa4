"""ipywidgets apps for the chapters.

Every app is a thin shell around a plain function (``*_image``) that takes
the slider values and returns a picture: tests call the function directly,
and the rendered book shows its output as a static figure.
"""

from __future__ import annotations

import io

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


def img2img_app(pipe, image: Image.Image, prompt: str = "a large blue square in the center"):
    """A denoising-strength slider (and CFG, seed) over :func:`img2img_image`."""
    import ipywidgets as w

    pipe.progress_bar = False
    text = w.Text(value=prompt, description="prompt", layout=w.Layout(width="520px"), continuous_update=False)
    strength = w.FloatSlider(value=0.6, min=0.0, max=1.0, step=0.05, description="strength",
                             continuous_update=False)
    cfg = w.FloatSlider(value=7.5, min=0.0, max=20.0, step=0.5, description="CFG scale", continuous_update=False)
    seed = w.IntSlider(value=0, min=0, max=100, description="seed", continuous_update=False)
    picture = w.Image(format="png")

    def redraw(_=None):
        picture.value = _png(img2img_image(pipe, text.value, image, strength.value, cfg.value, seed=seed.value))

    for control in (text, strength, cfg, seed):
        control.observe(redraw, names="value")
    redraw()
    return w.VBox([text, w.HBox([strength, cfg, seed]), picture])
