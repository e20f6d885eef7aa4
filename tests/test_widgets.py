"""Chapter 00's caption app: the plain function and the widget that wraps it."""

from ministd.widgets import caption_app, caption_image


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
