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
