"""How well the text-to-image model obeys its prompts, measured as a reader meets it (chapter 08).

    python -m ministd.train.unet evaluate                       # the shipped model, 560 prompts
    python -m ministd.train.unet evaluate --checkpoint /work/runs/unet/last.pt --n 80

The definitions are issue 15's ("evaluation first"):

Prompts. Pictures of the held-out world ``ShapesWorld(seed=HELD_OUT_SEED)``
(seeds no model trained on), each captioned in one *form*: every form of the
grammar (:data:`ministd.data.CAPTION_FORMS`, and the two-object forms
``pair_full``, ``pair_no_bg``, ``pair_bare``), and the short forms readers
type that the grammar never writes but :func:`ministd.data.parse_caption`
accepts (:data:`READER_FORMS`: "a blue square", "red circle, blue background").
Prompt i takes form i mod (number of forms), so every form gets the same
share. In one round of prompts out of four, the one-object forms that say
the background ask for a colour, shape and background from
``HELD_OUT_TRIPLES`` (combinations that training never showed). Prompt i's
initial noise is drawn from seed ``seed + i``, so any picture can be redrawn
alone: ``python -m ministd generate "<prompt>" --seed <seed>``.

Pictures. ``ministd.load_pipeline("shapes")`` as a reader gets it: its own
sampler (DDIM), 20 steps, classifier-free guidance 7.5, pictures as PIL
images. The *ground truth* of a prompt is ``ShapesWorld.render(prompt, seed)``:
the picture the prompt describes, drawn by the renderer. Every figure is
computed on both, and the ground truth's column checks the rules themselves
(it must read 100% and 0 broken).

Figures, on 64x64 RGB pictures (distances are Euclidean, in RGB units 0-255):

- **colour, shape** (and size, position, background where the prompt says
  them): the shipped judge (:func:`ministd.train.unet.load_judge`, a classifier
  trained on ground-truth renders) reads the one-object pictures; a figure is
  the share of pictures where it reads what the prompt asked.
- **exactly one object**: the background colour is the per-channel median of
  the 1-pixel border; object pixels differ from it by more than 70; objects are
  their 4-connected regions of more than 10 pixels. One-object prompts should
  give exactly one.
- **palette cleanliness**: the share of pixels within 60 of a palette colour
  (:data:`ministd.data.PALETTE`). Anti-aliased edges blend two colours, so the
  ground truth scores a little under 1; the model should be within 1 point of it.
- **broken pictures**: the background is not a plain palette colour filling
  the picture. The border is not one plain colour (more than 10% of its pixels
  farther than 60 from its median: training pictures, whose objects are
  jittered, reach 9.5% where a large object touches a corner), or its median
  is farther than 60 from every palette colour, or fewer than half of all
  pixels lie within 60 of it (which catches a frame drawn all round).
- **two objects, each in its colour**: for each asked colour, a 4-connected
  region of more than 10 *solid* pixels of that colour: object pixels whose
  nearest palette colour is the asked one, as is that of their 4 neighbours.
  (Solid, because the blend along an edge can be nearest a third colour: red
  over blue looks purple for a pixel or two.) Region by colour, not by object
  mask, because two objects in neighbouring cells can touch.

Targets (issue 15): colour >= 0.97, shape >= 0.97, exactly one object >= 0.98,
palette cleanliness within 0.01 of the ground truth's, no broken picture, two
objects each in its colour >= 0.85. A figure no prompt measures (``--forms``
left its forms out) is reported as n/a and not counted.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ministd import speed
from ministd.data import CAPTION_FORMS, COLORS, PALETTE, ShapesWorld, parse_caption, pil_to_tensor, write_caption
from ministd.train.unet import HELD_OUT_SEED, HELD_OUT_TRIPLES, load_checkpoint, load_judge
from ministd.train.unet import _positive_int as positive_int

# --------------------------------------------------------------------------- #
# The prompts
# --------------------------------------------------------------------------- #

# Short forms readers type, outside the grammar's CAPTION_FORMS, that
# parse_caption reads (tests/test_adherence.py checks it for each).
READER_FORMS: dict[str, str] = {
    "short": "a {color} {shape}",
    "no_article": "{color} {shape}",
    "comma_bg": "{color} {shape}, {bg} background",
    "sentence": "A {color} {shape} on {bg} background.",
    "picture_of": "a picture of a {color} {shape}",
}
PAIR_FORMS: tuple[str, ...] = ("pair_full", "pair_no_bg", "pair_bare")
ONE_OBJECT_FORMS: tuple[str, ...] = (*CAPTION_FORMS, *READER_FORMS)
FORMS: tuple[str, ...] = (*ONE_OBJECT_FORMS, *PAIR_FORMS)
# one-object forms that say the background, so a held-out (colour, shape, background) can be asked
BACKGROUND_FORMS: tuple[str, ...] = tuple(f for f, t in {**CAPTION_FORMS, **READER_FORMS}.items() if "{bg}" in t)
HELD_OUT_ROUND_EVERY = 4            # one round of prompts in four asks for held-out triples
DEFAULT_N = 35 * len(FORMS)         # 560: 455 one-object and 105 two-object prompts


@dataclass(frozen=True)
class Prompt:
    """One prompt of the evaluation: its text, its form id, the seed of its noise."""

    text: str
    form: str
    seed: int
    held_out_triple: bool = False

    @property
    def objects(self) -> int:
        return 2 if self.form in PAIR_FORMS else 1


def _articles(text: str) -> str:
    """ "a orange" -> "an orange", "A orange" -> "An orange"."""
    return re.sub(r"\b([aA]) (?=[aeiou])", r"\1n ", text)


def reader_caption(attrs: dict, form: str) -> str:
    """A one-object scene in one of :data:`READER_FORMS` (the shape's plain name)."""
    obj = attrs["objects"][0]
    return _articles(READER_FORMS[form].format(color=obj["color"], shape=obj["shape"], bg=attrs["background"]))


def with_triple(attrs: dict, triple: tuple[str, str, str]) -> dict:
    """A one-object scene whose (colour, shape, background) is ``triple``; size and position kept."""
    color, shape, background = triple
    return {"background": background, "objects": [{**attrs["objects"][0], "color": color, "shape": shape}]}


def make_prompts(n: int = DEFAULT_N, forms: tuple[str, ...] = FORMS, seed: int = 0) -> list[Prompt]:
    """``n`` prompts, prompt i in form ``forms[i % len(forms)]``, about picture i of the held-out
    world (one- or two-object, by form), with noise seed ``seed + i``. In one round out of
    :data:`HELD_OUT_ROUND_EVERY` the forms that say the background ask for held-out triples, in turn."""
    worlds = {1: ShapesWorld(seed=HELD_OUT_SEED, objects=1), 2: ShapesWorld(seed=HELD_OUT_SEED, objects=2)}
    prompts, triples_used = [], 0
    for i in range(n):
        form = forms[i % len(forms)]
        objects = 2 if form in PAIR_FORMS else 1
        attrs, _, rng = worlds[objects].attributes(i)
        held_out = form in BACKGROUND_FORMS and (i // len(forms)) % HELD_OUT_ROUND_EVERY == HELD_OUT_ROUND_EVERY - 1
        if held_out:
            attrs = with_triple(attrs, HELD_OUT_TRIPLES[triples_used % len(HELD_OUT_TRIPLES)])
            triples_used += 1
        text = reader_caption(attrs, form) if form in READER_FORMS else write_caption(attrs, rng, form=form)[0]
        prompts.append(Prompt(text, form, seed + i, held_out))
    return prompts


# --------------------------------------------------------------------------- #
# Pixel rules, on pictures as uint8 arrays [H, W, 3]
# --------------------------------------------------------------------------- #

OBJECT_DISTANCE = 70       # farther than this from the background: an object pixel
MIN_REGION = 10            # a region counts as an object with more pixels than this
PALETTE_DISTANCE = 60      # within this of a palette colour: a clean pixel
BORDER_DISTANCE = 60       # within this of the border's median: plain border
BROKEN_BORDER_SHARE = 0.10     # training pictures reach 9.5% (a large object jittered into a corner)
MIN_BACKGROUND_SHARE = 0.5
_PALETTE = np.array([PALETTE[c] for c in COLORS], dtype=np.float64)     # [8, 3]


def distance(pixels: np.ndarray, color) -> np.ndarray:
    """RGB distance of each pixel [..., 3] to one colour [3]."""
    return np.sqrt(((pixels.astype(np.float64) - np.asarray(color, dtype=np.float64)) ** 2).sum(-1))


def palette_distances(pixels: np.ndarray) -> np.ndarray:
    """[..., 3] -> [..., 8]: the distance of each pixel to each palette colour (order of COLORS)."""
    return np.sqrt(((pixels[..., None, :].astype(np.float64) - _PALETTE) ** 2).sum(-1))


def border_pixels(picture: np.ndarray) -> np.ndarray:
    """The 1-pixel border of a picture [H, W, 3] as [2H + 2W - 4, 3]."""
    return np.concatenate([picture[0], picture[-1], picture[1:-1, 0], picture[1:-1, -1]])


def background_color(picture: np.ndarray) -> np.ndarray:
    """The per-channel median of the border [3]."""
    return np.median(border_pixels(picture).astype(np.float64), axis=0)


def label_regions(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """4-connected regions of a boolean mask [H, W], by breadth-first search:
    labels [H, W] (0 outside the mask, 1..n inside) and n. (scipy.ndimage.label's
    default, written out: scipy is not a dependency.)"""
    labels = np.zeros(mask.shape, dtype=np.int32)
    h, w = mask.shape
    n = 0
    for y, x in zip(*np.nonzero(mask)):
        if labels[y, x]:
            continue
        n += 1
        labels[y, x] = n
        queue = deque([(y, x)])
        while queue:
            cy, cx = queue.popleft()
            for ny, nx in ((cy - 1, cx), (cy + 1, cx), (cy, cx - 1), (cy, cx + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not labels[ny, nx]:
                    labels[ny, nx] = n
                    queue.append((ny, nx))
    return labels, n


def region_sizes(mask: np.ndarray) -> list[int]:
    """Pixel counts of the regions of ``mask`` that count (more than MIN_REGION pixels)."""
    labels, n = label_regions(mask)
    sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    return [int(s) for s in sizes if s > MIN_REGION]


def object_mask(picture: np.ndarray) -> np.ndarray:
    """Pixels farther than OBJECT_DISTANCE from the background colour."""
    return distance(picture, background_color(picture)) > OBJECT_DISTANCE


def count_objects(picture: np.ndarray) -> int:
    """Regions of object pixels of more than MIN_REGION pixels."""
    return len(region_sizes(object_mask(picture)))


def palette_share(picture: np.ndarray) -> float:
    """Share of pixels within PALETTE_DISTANCE of some palette colour."""
    return float((palette_distances(picture).min(-1) <= PALETTE_DISTANCE).mean())


def is_broken(picture: np.ndarray) -> bool:
    """The background is not a plain palette colour filling the picture: more than 10% of
    the border farther than 60 from the border's median, or that median farther than 60
    from every palette colour, or under half of all pixels within 60 of it."""
    background = background_color(picture)
    off_border = (distance(border_pixels(picture), background) > BORDER_DISTANCE).mean()
    off_palette = palette_distances(background).min() > PALETTE_DISTANCE
    filled = (distance(picture, background) <= BORDER_DISTANCE).mean()
    return bool(off_border > BROKEN_BORDER_SHARE or off_palette or filled < MIN_BACKGROUND_SHARE)


def solid_pixels(picture: np.ndarray, color: str) -> np.ndarray:
    """Object pixels nearest palette colour ``color`` whose 4 neighbours are so too."""
    mask = object_mask(picture) & (palette_distances(picture).argmin(-1) == COLORS.index(color))
    solid = mask.copy()
    solid[1:] &= mask[:-1]
    solid[:-1] &= mask[1:]
    solid[:, 1:] &= mask[:, :-1]
    solid[:, :-1] &= mask[:, 1:]
    return solid


def draws_colors(picture: np.ndarray, colors: list[str]) -> bool:
    """Each colour has a region of more than MIN_REGION solid pixels of its own."""
    return all(region_sizes(solid_pixels(picture, c)) for c in colors)


# --------------------------------------------------------------------------- #
# Measuring a set of pictures
# --------------------------------------------------------------------------- #

JUDGED = ("color", "shape", "size", "position", "background")


def stated(prompt: Prompt) -> dict[str, str]:
    """What a one-object prompt asks for: attribute -> value, for the attributes it says."""
    said = parse_caption(prompt.text)
    record = {**said["objects"][0], "background": said["background"]}
    return {k: record[k] for k in JUDGED if record[k] is not None}


def judge_pictures(judge, pictures: list[np.ndarray], batch_size: int = 100) -> list[dict[str, str]]:
    """The judge's reading (colour, shape, size, position, background) of each picture."""
    readings = []
    for start in range(0, len(pictures), batch_size):
        batch = [Image.fromarray(p) for p in pictures[start:start + batch_size]]
        readings += judge.predict(pil_to_tensor(batch))
    return readings


def measure(prompts: list[Prompt], pictures: list[np.ndarray], judge) -> list[dict]:
    """One record per picture: the pixel rules, and (one-object prompts) which stated
    attributes the judge reads as asked."""
    one = [k for k, p in enumerate(prompts) if p.objects == 1]
    readings = dict(zip(one, judge_pictures(judge, [pictures[k] for k in one]))) if one else {}
    records = []
    for k, (prompt, picture) in enumerate(zip(prompts, pictures)):
        record = {"objects": count_objects(picture), "palette": palette_share(picture), "broken": is_broken(picture)}
        if prompt.objects == 1:
            record["judged"] = {a: readings[k][a] == v for a, v in stated(prompt).items()}
        else:
            record["colors_drawn"] = draws_colors(picture, [o["color"] for o in parse_caption(prompt.text)["objects"]])
        records.append(record)
    return records


def _share(values: list[bool]) -> float | None:
    return sum(values) / len(values) if values else None


def judged_share(prompts, records, attribute: str, held_out_only: bool = False) -> tuple[float | None, int]:
    """Share of one-object pictures where the judge reads ``attribute`` as asked (where stated)."""
    hits = [r["judged"][attribute] for p, r in zip(prompts, records)
            if p.objects == 1 and attribute in r["judged"] and (p.held_out_triple or not held_out_only)]
    return _share(hits), len(hits)


# figure key -> (label, target as words, test of (model, truth))
TARGETS = {
    "color": ("colour of the object", ">= 0.97", lambda m, t: m >= 0.97),
    "shape": ("shape of the object", ">= 0.97", lambda m, t: m >= 0.97),
    "size": ("size, where stated", "-", None),
    "position": ("position, where stated", "-", None),
    "background": ("background, where stated", "-", None),
    "held_out_color": ("colour, held-out triples", "-", None),
    "held_out_shape": ("shape, held-out triples", "-", None),
    "one_object": ("exactly one object", ">= 0.98", lambda m, t: m >= 0.98),
    "palette": ("palette cleanliness", "truth +- 0.01", lambda m, t: abs(m - t) <= 0.01 + 1e-12),
    "broken": ("broken pictures (count)", "0", lambda m, t: m == 0),
    "two_objects": ("two objects, each in its colour", ">= 0.85", lambda m, t: m >= 0.85),
}


def figure_values(prompts: list[Prompt], records: list[dict]) -> dict[str, tuple[float | None, int]]:
    """Figure key -> (value or None when no prompt measures it, number of pictures it is over)."""
    one = [r for p, r in zip(prompts, records) if p.objects == 1]
    two = [r for p, r in zip(prompts, records) if p.objects == 2]
    values = {a: judged_share(prompts, records, a) for a in JUDGED}
    values["held_out_color"] = judged_share(prompts, records, "color", held_out_only=True)
    values["held_out_shape"] = judged_share(prompts, records, "shape", held_out_only=True)
    values["one_object"] = (_share([r["objects"] == 1 for r in one]), len(one))
    values["palette"] = (float(np.mean([r["palette"] for r in records])), len(records))
    values["broken"] = (sum(r["broken"] for r in records), len(records))
    values["two_objects"] = (_share([r["colors_drawn"] for r in two]), len(two))
    return values


def figures(prompts: list[Prompt], model: list[dict], truth: list[dict]) -> list[dict]:
    """The table: one row per figure with the model's value, the ground truth's, the target, met."""
    ours, true = figure_values(prompts, model), figure_values(prompts, truth)
    rows = []
    for key, (label, target, test) in TARGETS.items():
        (m, n), (t, _) = ours[key], true[key]
        met = None if test is None or m is None else bool(test(m, t))
        rows.append({"key": key, "figure": label, "n": n, "model": m, "truth": t, "target": target, "met": met})
    return rows


def per_form(prompts: list[Prompt], model: list[dict], truth: list[dict]) -> dict[str, dict]:
    """Colour and shape (one-object forms) or two objects in their colours (pair forms), by form."""
    table = {}
    for form in dict.fromkeys(p.form for p in prompts):
        picks = [k for k, p in enumerate(prompts) if p.form == form]
        row = {"n": len(picks)}
        for suffix, records in (("", model), ("_truth", truth)):
            if form in PAIR_FORMS:
                row["two_objects" + suffix] = _share([records[k]["colors_drawn"] for k in picks])
            else:
                for a in ("color", "shape"):
                    row[a + suffix] = _share([records[k]["judged"][a] for k in picks])
        table[form] = row
    return table


def failures(prompts: list[Prompt], model: list[dict], limit: int = 8) -> dict[str, list[dict]]:
    """A few prompts (text and seed, to redraw) that missed each targeted figure."""
    misses = {
        "color": lambda p, r: p.objects == 1 and not r["judged"]["color"],
        "shape": lambda p, r: p.objects == 1 and not r["judged"]["shape"],
        "one_object": lambda p, r: p.objects == 1 and r["objects"] != 1,
        "broken": lambda p, r: r["broken"],
        "two_objects": lambda p, r: p.objects == 2 and not r["colors_drawn"],
    }
    return {key: [{"prompt": p.text, "seed": p.seed} for p, r in zip(prompts, model) if missed(p, r)][:limit]
            for key, missed in misses.items()}


# --------------------------------------------------------------------------- #
# Pictures: the model's, and the ground truth
# --------------------------------------------------------------------------- #

def ground_truth(prompts: list[Prompt]) -> list[np.ndarray]:
    """What each prompt describes, drawn by the renderer (free attributes from its seed)."""
    world = ShapesWorld()
    return [np.asarray(world.render(p.text, seed=p.seed)[0]) for p in prompts]


def reader_pipeline(weights: str | None = None, checkpoint: str | None = None):
    """``ministd.load_pipeline("shapes")``, its U-Net swapped for ``weights`` (.safetensors
    with its .json) or a training ``checkpoint`` (EMA weights) when given."""
    import ministd
    from ministd.unet import UNet

    pipe = ministd.load_pipeline("shapes")
    if weights or checkpoint:
        pipe.unet = speed.optimize(load_checkpoint(checkpoint) if checkpoint else UNet.load(weights).eval())
    pipe.progress_bar = False
    return pipe


def initial_noise(pipe, seeds: list[int]) -> torch.Tensor:
    """Latents [B, C, h, w], row k drawn as txt2img draws them for ``seed=seeds[k]`` alone."""
    size = pipe.unet.config.sample_size
    shape = (1, pipe.unet.config.in_channels, size, size)
    return torch.cat([torch.randn(shape, generator=torch.Generator("cpu").manual_seed(s)) for s in seeds])


def generate(pipe, prompts: list[Prompt], steps: int = 20, guidance_scale: float = 7.5,
             sampler: str | None = None, batch_size: int = 40, log=print) -> list[np.ndarray]:
    """The model's picture for each prompt (uint8 [64, 64, 3]), in batches, each from its own seed."""
    pictures, t0 = [], time.time()
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start:start + batch_size]
        out = pipe.txt2img([p.text for p in batch], num_inference_steps=steps, guidance_scale=guidance_scale,
                           sampler=sampler, latents=initial_noise(pipe, [p.seed for p in batch]),
                           generator=torch.Generator("cpu").manual_seed(batch[0].seed))
        pictures += [np.asarray(im) for im in out.images]
        log(f"  {len(pictures)}/{len(prompts)} pictures, {time.time() - t0:.0f} s", flush=True)
    return pictures


# --------------------------------------------------------------------------- #
# The evaluation, and its table
# --------------------------------------------------------------------------- #

def _cell(value, key: str) -> str:
    if value is None:
        return "n/a"
    return f"{value:d}" if key == "broken" else f"{value:.3f}"


def format_table(result: dict) -> str:
    """The figures (figure | model | ground truth | target), then colour and shape by form."""
    lines = [f"{'figure':<34} {'n':>4} {'model':>7} {'truth':>7}  target", "-" * 72]
    for row in result["figures"]:
        verdict = "" if row["met"] is None else ("  met" if row["met"] else "  NOT met")
        lines.append(f"{row['figure']:<34} {row['n']:>4} {_cell(row['model'], row['key']):>7} "
                     f"{_cell(row['truth'], row['key']):>7}  {row['target']}{verdict}")
    lines += ["", f"{'form':<12} {'n':>4} {'colour':>7} {'shape':>7} {'(truth)':>15}", "-" * 50]
    for form, row in result["per_form"].items():
        if form in PAIR_FORMS:
            lines.append(f"{form:<12} {row['n']:>4} {'two objects':>15} {_cell(row['two_objects'], ''):>7}"
                         f" ({_cell(row['two_objects_truth'], '')})")
        else:
            lines.append(f"{form:<12} {row['n']:>4} {_cell(row['color'], ''):>7} {_cell(row['shape'], ''):>7}"
                         f"   ({_cell(row['color_truth'], '')}, {_cell(row['shape_truth'], '')})")
    return "\n".join(lines)


def evaluate(args, log=print) -> bool:
    """Generate, measure, print the table and write it as JSON to ``args.out``; True if every
    target that the prompts measure is met."""
    t0 = time.time()
    prompts = make_prompts(args.n, args.forms, args.seed)
    log(f"{len(prompts)} prompts ({sum(p.objects == 1 for p in prompts)} one-object, "
        f"{sum(p.held_out_triple for p in prompts)} of them held-out triples), {len(set(args.forms))} forms")
    pipe = reader_pipeline(args.weights, args.checkpoint)
    sampler = args.sampler or pipe.scheduler.name
    log(f"generating: {sampler}, {args.steps} steps, guidance {args.guidance_scale}", flush=True)
    pictures = generate(pipe, prompts, args.steps, args.guidance_scale, args.sampler, log=log)
    judge = load_judge(args.judge)
    model, truth = measure(prompts, pictures, judge), measure(prompts, ground_truth(prompts), judge)
    rows = figures(prompts, model, truth)
    met = all(r["met"] for r in rows if r["met"] is not None)
    result = {"model": args.checkpoint or args.weights or "shapes (shipped)", "sampler": sampler,
              "steps": args.steps, "guidance_scale": args.guidance_scale, "prompts": len(prompts),
              "forms": list(args.forms), "seed": args.seed, "judge": str(args.judge),
              "seconds": round(time.time() - t0), "date": time.strftime("%Y-%m-%d"), "targets_met": met,
              "figures": rows, "per_form": per_form(prompts, model, truth), "failures": failures(prompts, model)}
    log(format_table(result))
    log(f"targets {'met' if met else 'NOT met'} ({result['seconds']} s)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    log(f"wrote {args.out}")
    return met


# --------------------------------------------------------------------------- #
# Command-line options of ``evaluate`` (argparse types: bad values give one-line errors)
# --------------------------------------------------------------------------- #

def form_ids(text: str) -> tuple[str, ...]:
    """``--forms``: comma-separated form ids, each one of :data:`FORMS`."""
    forms = tuple(f.strip() for f in text.split(",") if f.strip())
    unknown = [f for f in forms if f not in FORMS]
    if unknown or not forms:
        raise argparse.ArgumentTypeError(f"--forms: unknown form id(s) {', '.join(unknown) or repr(text)}; "
                                         f"allowed: {', '.join(FORMS)}")
    return forms


def guidance_scale(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}")
    return value


def sampler_name(text: str) -> str:
    from ministd.samplers import make_sampler

    try:
        make_sampler(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text
