"""Tests of the evaluation of the text-to-image model (ministd.train.adherence, issue 15).

The pixel rules are checked on pictures drawn by hand (one object, two, two that
touch, a frame, a smear) and on ground-truth renders of every form, where every
figure must read 100% and no picture broken. A tiny end-to-end run (4 prompts,
2 steps) checks the command writes its JSON; bad options give one-line errors.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image, ImageDraw

from ministd.data import CAPTION_FORMS, COLORS, PALETTE, SHAPES, ShapesWorld, parse_caption
from ministd.train import adherence as A
from ministd.train import unet as T


pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py


def picture(background: str, *boxes: tuple[str, tuple[int, int, int, int]]) -> np.ndarray:
    """A 64x64 picture: a plain background and filled rectangles (colour name or RGB, x0 y0 x1 y1)."""
    image = Image.new("RGB", (64, 64), PALETTE[background])
    draw = ImageDraw.Draw(image)
    for color, box in boxes:
        draw.rectangle(box, fill=PALETTE.get(color, color))
    return np.asarray(image)


def test_reader_forms_are_outside_the_grammar_and_parse():
    assert not set(A.READER_FORMS) & set(CAPTION_FORMS)
    assert not set(A.READER_FORMS.values()) & set(CAPTION_FORMS.values())
    for form in A.READER_FORMS:
        for color in COLORS:
            for shape in SHAPES:
                background = next(c for c in COLORS if c != color)
                text = A.reader_caption({"background": background, "objects": [{"color": color, "shape": shape}]},
                                        form)
                said = parse_caption(text)
                assert said["objects"][0]["color"] == color and said["objects"][0]["shape"] == shape
                assert said["background"] == (background if "{bg}" in A.READER_FORMS[form] else None)
    assert A.reader_caption({"background": "orange", "objects": [{"color": "orange", "shape": "circle"}]},
                            "sentence").startswith("An orange circle")


def test_prompt_set_covers_every_form_and_the_held_out_triples():
    prompts = A.make_prompts()
    forms = [p.form for p in prompts]
    assert set(forms) == set(CAPTION_FORMS) | set(A.READER_FORMS) | {"pair_full", "pair_no_bg", "pair_bare"}
    assert len(set(forms.count(f) for f in set(forms))) == 1                    # balanced
    assert sum(p.objects == 1 for p in prompts) >= 400 and sum(p.objects == 2 for p in prompts) >= 100
    assert len({p.seed for p in prompts}) == len(prompts)                       # a seed of noise each
    asked = set()
    for p in prompts:
        said = parse_caption(p.text)
        assert len(said["objects"]) == p.objects
        if p.held_out_triple:
            asked.add((said["objects"][0]["color"], said["objects"][0]["shape"], said["background"]))
    assert asked == set(T.HELD_OUT_TRIPLES)
    # the pictures behind the prompts are of the held-out world
    attrs = ShapesWorld(seed=T.HELD_OUT_SEED).attributes(0)[0]
    assert parse_caption(prompts[0].text)["objects"][0]["color"] == attrs["objects"][0]["color"]
    assert [p.form for p in A.make_prompts(4, ("bare", "pair_bare"))] == ["bare", "pair_bare"] * 2


def test_label_regions_is_four_connected():
    mask = np.array([[1, 1, 0, 0],
                     [0, 1, 0, 1],
                     [0, 0, 1, 1],
                     [1, 0, 0, 0]], dtype=bool)
    labels, n = A.label_regions(mask)
    assert n == 3
    assert labels[0, 0] == labels[1, 1] and labels[2, 2] == labels[1, 3] and labels[3, 0] not in (0, labels[0, 0])


def test_pixel_rules_on_pictures_drawn_by_hand():
    one = picture("blue", ("red", (20, 20, 35, 35)))
    assert A.count_objects(one) == 1 and not A.is_broken(one) and A.palette_share(one) == 1.0
    assert A.draws_colors(one, ["red"]) and not A.draws_colors(one, ["red", "green"])

    two = picture("blue", ("red", (5, 5, 15, 15)), ("green", (40, 40, 55, 55)))
    assert A.count_objects(two) == 2 and A.draws_colors(two, ["red", "green"])
    touching = picture("blue", ("red", (10, 20, 29, 35)), ("green", (30, 20, 45, 35)))
    assert A.count_objects(touching) == 1 and A.draws_colors(touching, ["green", "red"])
    tiny = picture("blue", ("red", (20, 20, 35, 35)), ("white", (50, 50, 52, 52)))     # 9 pixels: no object
    assert A.count_objects(tiny) == 1 and not A.draws_colors(tiny, ["red", "white"])

    top_frame = picture("blue", ("red", (20, 20, 35, 35)), ("black", (0, 0, 63, 1)))
    full_frame = picture("black", ("blue", (3, 3, 60, 60)), ("red", (20, 20, 35, 35)))
    off_palette = picture("blue", ((130, 60, 110), (0, 0, 63, 63)), ("red", (20, 20, 35, 35)))
    assert A.is_broken(top_frame) and A.is_broken(full_frame) and A.is_broken(off_palette)
    corner = picture("blue", ("red", (0, 0, 11, 11)))          # an object touching the border: 9% of it
    assert not A.is_broken(corner)

    smear = picture("blue", ("red", (20, 20, 35, 35)), ((128, 128, 128), (40, 5, 60, 8)))
    assert A.count_objects(smear) == 2 and A.palette_share(smear) < 0.99 and not A.is_broken(smear)


def test_edge_blends_are_not_a_third_object():
    """Red over blue blends to purple along the edges; solid pixels keep it from counting."""
    image, _ = ShapesWorld().render("a small red triangle on a blue background")
    pixels = np.asarray(image)
    assert A.draws_colors(pixels, ["red"]) and not A.draws_colors(pixels, ["purple"])


def test_every_rule_reads_100_percent_on_ground_truth():
    prompts = A.make_prompts(2 * len(A.FORMS)) + [p for p in A.make_prompts() if p.held_out_triple][:8]
    truth = A.measure(prompts, A.ground_truth(prompts), T.load_judge())
    for row in A.figures(prompts, truth, truth):
        if row["key"] == "broken":
            assert row["truth"] == 0
        elif row["key"] == "palette":
            assert 0.98 < row["truth"] < 1 and row["met"]
        else:
            assert row["truth"] == 1.0, row


@pytest.mark.parametrize("argv, option", [
    (["--steps", "0"], "--steps"), (["--n", "-3"], "--n"), (["--n", "x"], "--n"), (["--threads", "0"], "--threads"),
    (["--forms", "full,nope"], "--forms"), (["--guidance-scale", "nan"], "--guidance-scale"),
    (["--sampler", "bogus"], "--sampler"),
])
def test_bad_options_give_one_line_errors(argv, option, capsys):
    with pytest.raises(SystemExit) as exit:
        T.main(["evaluate", *argv])
    assert exit.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith(f"python -m ministd.train.unet evaluate: error: argument {option}")
    if option == "--forms":
        assert "nope" in error and "allowed: " + ", ".join(A.FORMS) in error


def test_tiny_evaluation_writes_its_table(tmp_path, capsys):
    out = tmp_path / "eval.json"
    with pytest.raises(SystemExit) as exit:
        T.main(["evaluate", "--n", "4", "--steps", "2", "--forms", "full,short,pair_full,comma_bg",
                "--threads", "1", "--out", str(out)])
    result = json.loads(out.read_text())
    assert exit.value.code == (0 if result["targets_met"] else 1)
    assert result["prompts"] == 4 and result["steps"] == 2 and result["sampler"] == "ddim"
    assert {r["key"] for r in result["figures"]} == set(A.TARGETS)
    assert set(result["per_form"]) == {"full", "short", "pair_full", "comma_bg"}
    printed = capsys.readouterr().out
    assert "exactly one object" in printed and "two objects, each in its colour" in printed


def test_each_prompt_gets_the_picture_of_its_own_seed():
    """Batched generation draws prompt k as txt2img(prompt, seed=seed_k) alone would."""
    pipe = A.reader_pipeline()
    prompts = A.make_prompts(2, ("short", "no_article"), seed=11)
    batched = A.generate(pipe, prompts, steps=2, log=lambda *a, **k: None)
    alone = np.asarray(pipe.txt2img(prompts[1].text, num_inference_steps=2, seed=12).images[0])
    assert np.abs(batched[1].astype(int) - alone.astype(int)).max() <= 1
