"""The command line: help, the sample grid, caption rendering, generate / info with the
generation parameters in the PNG (the web UIs' layout), and one-line errors for bad input.

Most generate / info checks call ``main`` in this process (one torch import for all);
the bad-input checks that must show there is no traceback run ``python -m ministd``.
"""

import os
import subprocess
import sys

import pytest
from PIL import Image

from ministd.__main__ import main
from ministd.infotext import (SAMPLER_NAMES, format_infotext, parse_infotext, read_png_parameters,
                              sampler_for_infotext, sampler_from_infotext)
from test_sdxl_pipelines import folders  # noqa: F401  (fixture: tiny SDXL base and refiner folders)


pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py


def _run(*args, cwd=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "ministd", *args], capture_output=True, text=True, cwd=cwd,
                          env=env)


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
    _one_line_error(_run("generate", "a red circle", "--model", str(tmp_path / "nowhere")), "no model")


def _main(capsys, *args):
    """main(args) in this process: (exit status, stdout, stderr)."""
    try:
        code = main(list(args))
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


def _main_error(capsys, *args, words=()):
    code, _, err = _main(capsys, *args)
    assert code == 2, (code, err)
    assert len(err.strip().splitlines()) == 1, err
    for word in words:
        assert word in err, err


def test_generate_writes_the_web_ui_parameters_and_info_reads_them_back(tmp_path, capsys):
    png = tmp_path / "p.png"
    prompt, negative = "a (red:1.2) circle, at the bottom", "blue, blurry: lowres"
    code, out, _ = _main(capsys, "generate", prompt, "--negative-prompt", negative, "--sampler", "DPM++ 2M Karras",
                         "--steps", "3", "--seed", "7", "--guidance-scale", "6.5", "--clip-skip", "1",
                         "--emphasis", "--long-prompts", "-o", str(png))
    assert code == 0
    text = read_png_parameters(png)
    assert text == (f"{prompt}\nNegative prompt: {negative}\n"
                    "Steps: 3, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 6.5, Seed: 7, Size: 64x64, "
                    "Model: shapes, Clip skip: 2")
    assert text in out and f"wrote {png}" in out
    code, out, _ = _main(capsys, "info", str(png))
    assert code == 0
    printed = dict(line.split(": ", 1) for line in out.strip().splitlines())
    assert printed == {"Prompt": prompt, "Negative prompt": negative, "Steps": "3", "Sampler": "DPM++ 2M",
                       "Schedule type": "Karras", "CFG scale": "6.5", "Seed": "7", "Size": "64x64",
                       "Model": "shapes", "Clip skip": "2"}
    assert _main(capsys, "info", str(png), "--raw")[1].strip() == text
    # the defaults: the model's own sampler, no negative prompt line, no clip skip; -1 draws a seed
    code, _, _ = _main(capsys, "generate", "a red circle", "--steps", "2", "--seed", "-1", "-o", str(png))
    fields = parse_infotext(read_png_parameters(png))
    assert fields["Negative prompt"] == "" and fields["Sampler"] == "DDIM" and "Clip skip" not in fields
    assert "Emphasis" not in fields
    # brackets read as plain text: the web UIs' "Emphasis: None"
    code, _, _ = _main(capsys, "generate", "a (red) circle", "--steps", "2", "-o", str(png))
    assert parse_infotext(read_png_parameters(png))["Emphasis"] == "None"
    assert fields["CFG scale"] == "7.5" and 0 <= int(fields["Seed"]) < 2**32


def test_infotext_layout_as_the_web_uis_write_and_read_it():
    # the example of A1111's parse_generation_parameters: a prompt, a negative prompt, the pairs
    a1111 = ("girl with an artist's beret, determined, blue eyes, ((eyeshadow)), (coquettish), detailed\n"
             "Negative prompt: ugly, fat, (((deformed))), [blurry], bad anatomy\n"
             "Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 965400086, Size: 512x512, Model hash: 45dee52b")
    assert parse_infotext(a1111) == {
        "Prompt": "girl with an artist's beret, determined, blue eyes, ((eyeshadow)), (coquettish), detailed",
        "Negative prompt": "ugly, fat, (((deformed))), [blurry], bad anatomy", "Steps": "20",
        "Sampler": "Euler a", "CFG scale": "7", "Seed": "965400086", "Size": "512x512", "Model hash": "45dee52b"}
    # values with "," or ":" are quoted; prompts may span lines; no negative prompt, no line for it
    params = {"Steps": 4, "Sampler": "Euler", "CFG scale": 5.0, "Seed": 1, "Size": "16x32",
              "Model": "my model", "Refiner": "ref: v1, fixed", "Refiner switch at": 0.8, "Clip skip": None}
    text = format_infotext("line one\nline two", None, params)
    assert "Negative prompt" not in text and 'Refiner: "ref: v1, fixed"' in text and "Clip skip" not in text
    assert parse_infotext(text) == {"Prompt": "line one\nline two", "Negative prompt": "", "Steps": "4",
                                    "Sampler": "Euler", "CFG scale": "5.0", "Seed": "1", "Size": "16x32",
                                    "Model": "my model", "Refiner": "ref: v1, fixed", "Refiner switch at": "0.8"}
    # a last line with fewer than three pairs is part of the prompt (A1111's rule)
    assert parse_infotext("a cat\nStyle: ink") == {"Prompt": "a cat\nStyle: ink", "Negative prompt": ""}


def test_sampler_display_names_round_trip():
    for ours, theirs in SAMPLER_NAMES.items():
        assert sampler_for_infotext(ours) == {"Sampler": theirs}
        assert sampler_from_infotext(theirs) == ours
    assert sampler_for_infotext("dpmpp_2m", karras=True) == {"Sampler": "DPM++ 2M", "Schedule type": "Karras"}
    assert sampler_from_infotext("DPM++ 2M", "Karras") == "dpmpp_2m_karras"
    assert sampler_from_infotext("DPM++ 2M Karras") == "dpmpp_2m_karras"       # before A1111 1.9
    with pytest.raises(ValueError, match="no ministd counterpart"):
        sampler_from_infotext("DPM++ SDE")


def test_generate_with_sdxl_base_and_refiner(folders, tmp_path, capsys):  # noqa: F811
    base, refiner = folders
    png = tmp_path / "xl.png"
    code, _, err = _main(capsys, "generate", "a red circle", "--model", str(base), "--width", "32", "--height", "16",
                         "--steps", "3", "--sampler", "euler_a", "-o", str(png))
    assert code == 0, err
    assert "sampling" in err                                          # the progress bar
    assert Image.open(png).size == (32, 16)
    fields = parse_infotext(read_png_parameters(png))
    assert (fields["Size"], fields["Sampler"], fields["CFG scale"], fields["Model"]) == ("32x16", "Euler a", "5.0",
                                                                                         "base")
    code, _, err = _main(capsys, "generate", "a red circle", "--model", str(base), "--refiner", str(refiner),
                         "--refiner-start", "0.7", "--steps", "4", "--negative-prompt", "dark", "-o", str(png))
    assert code == 0, err
    fields = parse_infotext(read_png_parameters(png))
    assert (fields["Refiner"], fields["Refiner switch at"], fields["Negative prompt"]) == ("refiner", "0.7", "dark")
    assert Image.open(png).size == (16, 16)
    _main_error(capsys, "generate", "x", "--model", str(refiner), words=("is an SDXL refiner", "--refiner"))
    _main_error(capsys, "generate", "x", "--model", str(base), "--refiner", str(base),
                words=("is not an SDXL refiner",))


@pytest.mark.parametrize("args, words", [
    (["--refiner-start", "0.5"], ["--refiner-start needs --refiner"]),
    (["--refiner-start", "1.5", "--refiner", "x"], ["strictly between 0 and 1"]),
    (["--sampler", "DPM++ SDE"], ["unknown sampler name", "euler_a"]),
    (["--width", "60"], ["width must be a positive multiple of 16"]),
    (["--seed", "-2"], ["--seed", "2**63-1"]),
    (["--guidance-scale", "nan"], ["finite number"]),
    (["--clip-skip", "7"], ["clip_skip must be an integer in [0, 3]", "N - 1"]),
    (["--model", "shapes", "--refiner", "shapes"], ["--refiner continues an SDXL base"]),
])
def test_generate_bad_input_is_one_line_error(args, words, capsys, tmp_path):
    _main_error(capsys, "generate", "a red circle", "-o", str(tmp_path / "x.png"), *args, words=words)
    assert not (tmp_path / "x.png").exists()


def test_info_bad_input_is_one_line_error(tmp_path, capsys):
    plain = tmp_path / "plain.png"
    Image.new("RGB", (4, 4)).save(plain)
    (tmp_path / "text.png").write_text("not a picture")
    _main_error(capsys, "info", str(tmp_path / "text.png"), words=("not a readable PNG",))
    Image.new("RGB", (4, 4)).save(tmp_path / "photo.jpg")
    _main_error(capsys, "info", str(tmp_path / "photo.jpg"), words=("JPEG", "PNG text chunks only"))
    _one_line_error(_run("info", str(plain)), "no 'parameters' text chunk")
    _one_line_error(_run("info", str(tmp_path / "missing.png")))
    _one_line_error(_run("generate", "a red circle", "--refiner", "shapes", "-o", str(tmp_path / "x.png")),
                    "--refiner continues an SDXL base")
