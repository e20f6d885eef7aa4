"""The command line: help, the sample grid, caption rendering, and one-line errors for bad input."""

import subprocess
import sys

from PIL import Image


def _run(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "ministd", *args], capture_output=True, text=True, cwd=cwd)


def test_help():
    out = _run("--help")
    assert out.returncode == 0 and "shapes" in out.stdout and "generate" in out.stdout


def test_shapes_grid(tmp_path):
    out = _run("shapes", "--n", "6", "-o", str(tmp_path / "grid.png"))
    assert out.returncode == 0, out.stderr
    image = Image.open(tmp_path / "grid.png")
    assert image.size[0] > 4 * 64 and image.size[1] > 2 * 64


def test_render(tmp_path):
    out = _run("render", "a large yellow triangle at the bottom", "-o", str(tmp_path / "r.png"))
    assert out.returncode == 0, out.stderr
    assert Image.open(tmp_path / "r.png").size == (64, 64)


def _one_line_error(out, *words):
    assert out.returncode == 2, (out.returncode, out.stderr)
    assert "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    for word in words:
        assert word in out.stderr


def test_bad_count_is_one_line_error():
    _one_line_error(_run("shapes", "--n", "-1"), "--n", "1 to 1024")
    _one_line_error(_run("shapes", "--n", "many"), "--n")


def test_unknown_colour_is_one_line_error(tmp_path):
    _one_line_error(_run("render", "a pink circle", "-o", str(tmp_path / "x.png")), "pink", "red")
    assert not (tmp_path / "x.png").exists()


def test_bad_output_suffix():
    _one_line_error(_run("shapes", "-o", "grid.txt"), ".png")


def test_generate_with_the_shipped_model_and_no_other_arguments(tmp_path):
    """The README's command: the shipped ShapesWorld model, defaults for everything else."""
    out = _run("generate", "a red circle", "-o", str(tmp_path / "out.png"))
    assert out.returncode == 0, out.stderr
    image = Image.open(tmp_path / "out.png")
    assert image.size == (64, 64)
    # a red circle: the object's pixels are mostly red (the background may be any colour)
    import numpy as np
    pixels = np.asarray(image.convert("RGB")).reshape(-1, 3).astype(int)
    red = (pixels[:, 0] > 170) & (pixels[:, 1] < 90) & (pixels[:, 2] < 90)
    assert red.sum() > 30, f"only {red.sum()} red pixels"


def test_generate_from_a_missing_path_is_one_line_error(tmp_path):
    out = _run("generate", "a red circle", "--model", str(tmp_path / "nowhere"))
    assert out.returncode == 1 and "no model" in out.stderr and "Traceback" not in out.stderr
