"""ShapesWorld: the small, fully known picture world every model of the book learns.

Each sample is a 64×64 RGB picture of one (or two) coloured shapes on a plain
background, with a caption written by a small grammar ("a small red circle in
the top left on a blue background") and the attribute record that generated
it. Because the attributes of every picture are known, the book can *measure*
reconstruction quality, prompt adherence and the effect of guidance.

Everything is deterministic: ``ShapesWorld(seed)[i]`` is the same picture and
caption on every machine and every run. Pictures are drawn at 4× the size and
averaged down (supersampling), so edges are anti-aliased like a photograph's.

This module also holds the image helpers every chapter uses (PIL <-> tensors
in [-1, 1], grids) and :func:`default_device`.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

# --------------------------------------------------------------------------- #
# The vocabulary of the world (the one place these values live)
# --------------------------------------------------------------------------- #

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 70),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "purple": (140, 60, 180),
    "orange": (245, 140, 30),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
COLORS: tuple[str, ...] = tuple(PALETTE)

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
# Kept out of the base training set, for the "teach it a new word" chapter (16).
HELD_OUT_SHAPES: tuple[str, ...] = ("star",)
ALL_SHAPES: tuple[str, ...] = SHAPES + HELD_OUT_SHAPES

# Half-extent of a shape as a fraction of the picture side.
SIZES: dict[str, float] = {"small": 0.10, "medium": 0.145, "large": 0.19}

# 3×3 grid: name -> (column, row), each in {0, 1, 2}.
POSITIONS: dict[str, tuple[int, int]] = {
    "top left": (0, 0), "top": (1, 0), "top right": (2, 0),
    "left": (0, 1), "center": (1, 1), "right": (2, 1),
    "bottom left": (0, 2), "bottom": (1, 2), "bottom right": (2, 2),
}
_GRID = (0.21, 0.5, 0.79)  # cell centres as fractions of the side

# Paraphrases: every surface word maps back to one attribute value.
SHAPE_WORDS: dict[str, str] = {
    "circle": "circle", "disc": "circle", "dot": "circle",
    "square": "square", "box": "square",
    "triangle": "triangle",
    "star": "star",
}
SIZE_WORDS: dict[str, str] = {
    "small": "small", "little": "small", "tiny": "small",
    "medium": "medium", "medium-sized": "medium", "mid-sized": "medium",
    "large": "large", "big": "large", "huge": "large",
}
_SHAPE_SYNONYMS = {s: [w for w, v in SHAPE_WORDS.items() if v == s] for s in ALL_SHAPES}
_SIZE_SYNONYMS = {s: [w for w, v in SIZE_WORDS.items() if v == s] for s in SIZES}
# How a position is said, by grammar form.
_POSITION_PHRASES: dict[str, list[str]] = {
    "top left": ["in the top left", "at the top left", "in the top left corner"],
    "top": ["at the top", "in the top"],
    "top right": ["in the top right", "at the top right", "in the top right corner"],
    "left": ["on the left", "at the left"],
    "center": ["in the center", "in the middle"],
    "right": ["on the right", "at the right"],
    "bottom left": ["in the bottom left", "at the bottom left", "in the bottom left corner"],
    "bottom": ["at the bottom", "in the bottom"],
    "bottom right": ["in the bottom right", "at the bottom right", "in the bottom right corner"],
}
# Words that carry no attribute (articles, prepositions, glue of the grammar).
_FILLER = {"a", "an", "the", "in", "at", "on", "of", "with", "against", "and",
           "background", "corner", "that", "is", "shape", "picture", "image",
           "colored", "coloured", "there", "drawn", "over"}

# Caption templates. {obj} is an object phrase, {pos} a position phrase,
# {bg} the background colour. Each has an id so tests can cover every form.
CAPTION_FORMS: dict[str, str] = {
    "full": "{obj} {pos} on a {bg} background",
    "bg_first": "on a {bg} background, {obj} {pos}",
    "with_bg": "{obj} {pos} with a {bg} background",
    "against": "{obj} against a {bg} background, {pos}",
    "no_bg": "{obj} {pos}",
    "no_pos": "{obj} on a {bg} background",
    "bare": "{obj}",
    "that_is": "a {shape} that is {color}, {pos}, {bg} background",
}
# Object phrase forms: which optional attributes are said.
_OBJECT_FORMS = ("size color shape", "color shape", "size color shape")


# --------------------------------------------------------------------------- #
# Geometry and drawing
# --------------------------------------------------------------------------- #

_SUPERSAMPLE = 4


def _shape_polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """Vertices of ``shape`` centred at (cx, cy) with half-extent r (pixels)."""
    if shape == "square":
        h = r * 0.9  # a square of half-side r looks bigger than a circle of radius r
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":
        # equilateral, pointing up, centred on its circumcircle (shifted down a
        # little so its visual centre sits on the grid point)
        cy = cy + 0.15 * r
        return [(cx + r * 1.1 * math.cos(a), cy - r * 1.1 * math.sin(a))
                for a in (math.pi / 2, math.pi / 2 + 2 * math.pi / 3, math.pi / 2 + 4 * math.pi / 3)]
    if shape == "star":
        points = []
        for k in range(10):
            radius = r * 1.15 if k % 2 == 0 else r * 0.5
            a = math.pi / 2 + k * math.pi / 5
            points.append((cx + radius * math.cos(a), cy - radius * math.sin(a)))
        return points
    raise ValueError(f"unknown shape {shape!r}; shapes are {', '.join(ALL_SHAPES)}")


STYLES: tuple[str, ...] = ("filled", "outlined")
OUTLINE_WIDTH = 2 / 64      # the stroke of the "outlined" style, as a fraction of the side (2 pixels at 64)
# The depth of an object (chapter 16), larger = nearer as in MiDaS-style relative depth: its
# half-extent over the largest one the world draws (a large shape at the largest jitter), so a
# large object is nearer than a small one and the background, at 0, is farthest.
NEAREST_EXTENT = SIZES["large"] * 1.08


def _placed_objects(attrs: dict, big: int, jitter):
    """(object, centre x, centre y, half-extent r) in pixels of a ``big``-sided canvas, per object."""
    for k, obj in enumerate(attrs["objects"]):
        dx, dy, scale = jitter[k] if jitter is not None else (0.0, 0.0, 1.0)
        col, row = POSITIONS[obj["position"]]
        yield obj, (_GRID[col] + dx) * big, (_GRID[row] + dy) * big, SIZES[obj["size"]] * scale * big


def _paint(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, **paint) -> None:
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), **paint)
    else:
        draw.polygon(_shape_polygon(shape, cx, cy, r), **paint)


def draw_scene(attrs: dict, size: int = 64, jitter: Sequence[tuple[float, float, float]] | None = None,
               style: str = "filled") -> Image.Image:
    """Render an attribute record to a ``size``×``size`` RGB picture.

    ``jitter`` optionally gives, per object, (dx, dy, scale) offsets as
    fractions of the side, so repeated renders of one caption differ a little.
    ``style``: "filled" (the world's pictures) or "outlined" (only a stroke of
    OUTLINE_WIDTH along each shape's edge: the "style" chapter 16's LoRA and
    hypernetwork learn). Drawn at 4× resolution and box-filtered down (anti-aliasing).
    """
    if style not in STYLES:
        raise ValueError(f"style must be one of {STYLES}, got {style!r}")
    big = size * _SUPERSAMPLE
    img = Image.new("RGB", (big, big), PALETTE[attrs["background"]])
    draw = ImageDraw.Draw(img)
    stroke = max(1, round(OUTLINE_WIDTH * big))
    for obj, cx, cy, r in _placed_objects(attrs, big, jitter):
        color = PALETTE[obj["color"]]
        paint = {"fill": color} if style == "filled" else {"outline": color, "width": stroke}
        _paint(draw, obj["shape"], cx, cy, r, **paint)
    return img.resize((size, size), Image.Resampling.BOX)


def draw_depth(attrs: dict, size: int = 64, jitter: Sequence[tuple[float, float, float]] | None = None
               ) -> np.ndarray:
    """The depth map of the scene :func:`draw_scene` draws: float32 [size, size] in [0, 1].

    ShapesWorld is flat, so its depth is a stage set: the background at 0 (farthest)
    and each object a flat cut-out at depth r / NEAREST_EXTENT (its half-extent r as a
    fraction of the side), larger = nearer, as the relative inverse depth of MiDaS /
    DPT (the estimators SD 2's depth model was trained with) is. Nearer objects are
    painted last, so they cover farther ones; edges are anti-aliased like the picture's.
    """
    big = size * _SUPERSAMPLE
    img = Image.new("F", (big, big), 0.0)
    draw = ImageDraw.Draw(img)
    placed = sorted(_placed_objects(attrs, big, jitter), key=lambda placed: placed[3])   # far to near
    for obj, cx, cy, r in placed:
        _paint(draw, obj["shape"], cx, cy, r, fill=min(1.0, r / big / NEAREST_EXTENT))
    return np.asarray(img.resize((size, size), Image.Resampling.BOX), dtype=np.float32).copy()


# --------------------------------------------------------------------------- #
# Captions: writing them from attributes, and reading them back
# --------------------------------------------------------------------------- #

def _object_phrase(obj: dict, rng: random.Random, with_size: bool, force_size: bool = False) -> str:
    shape = rng.choice(_SHAPE_SYNONYMS[obj["shape"]])
    form = rng.choice(_OBJECT_FORMS) if with_size else "color shape"
    if force_size:
        form = "size color shape"
    size = rng.choice(_SIZE_SYNONYMS[obj["size"]])
    words = {"size": size, "color": obj["color"], "shape": shape}
    phrase = " ".join(words[w] for w in form.split())
    article = "an" if phrase[0] in "aeiou" else "a"
    return f"{article} {phrase}"


# Forms that state every attribute (size, colour, shape, position, background).
COMPLETE_FORMS: tuple[str, ...] = ("full", "bg_first", "with_bg", "against")


def _fix_articles(text: str) -> str:
    return re.sub(r"\ba (?=[aeiou])", "an ", text)


def write_caption(attrs: dict, rng: random.Random, form: str | None = None,
                  complete: bool = False) -> tuple[str, str]:
    """A caption for ``attrs`` drawn from the grammar; returns (caption, form id).

    One-object scenes use every form of :data:`CAPTION_FORMS`; two-object
    scenes say "X and Y" with each object's position, optionally the background.
    ``complete=True`` only uses forms that state every attribute (what a
    text-to-image model needs to learn every word).
    """
    objs = attrs["objects"]
    if len(objs) == 2:
        form = form or ("pair_full" if complete else rng.choice(["pair_full", "pair_no_bg", "pair_bare"]))
        parts = [_object_phrase(o, rng, with_size=complete or rng.random() < 0.5, force_size=complete)
                 for o in objs]
        if form != "pair_bare":
            parts = [f"{p} {rng.choice(_POSITION_PHRASES[o['position']])}" for p, o in zip(parts, objs)]
        text = " and ".join(parts)
        if form == "pair_full":
            text += f" on a {attrs['background']} background"
        return _fix_articles(text), form
    obj = objs[0]
    form = form or rng.choice(COMPLETE_FORMS if complete else list(CAPTION_FORMS))
    if form == "that_is":
        shape = rng.choice(_SHAPE_SYNONYMS[obj["shape"]])
        text = CAPTION_FORMS[form].format(shape=shape, color=obj["color"],
                                          pos=rng.choice(_POSITION_PHRASES[obj["position"]]),
                                          bg=attrs["background"])
        return _fix_articles(text), form
    text = CAPTION_FORMS[form].format(obj=_object_phrase(obj, rng, with_size=True, force_size=complete),
                                      pos=rng.choice(_POSITION_PHRASES[obj["position"]]),
                                      bg=attrs["background"])
    return _fix_articles(text), form


def _allowed_words_message() -> str:
    return (f"colours: {', '.join(COLORS)}; shapes: {', '.join(SHAPE_WORDS)}; "
            f"sizes: {', '.join(SIZE_WORDS)}; positions: {', '.join(POSITIONS)}")


_BACKGROUND_RE = re.compile(r"(?:(?:on|with|against)\s+(?:a|an|the)\s+)?(\S+)\s+background")
_POSITION_RE = re.compile(
    r"\b(?:in|at|on)\s+the\s+(top left|top right|bottom left|bottom right|top|bottom|left|right|center|centre|middle)(?:\s+corner)?\b")


def parse_caption(caption: str) -> dict:
    """Read a caption back into a (partial) attribute record.

    Returns ``{"background": colour or None, "objects": [{"shape", "color",
    "size" or None, "position" or None}, ...]}``: what the caption *says*.
    Raises ``ValueError`` naming the first word outside the grammar.
    """
    if not isinstance(caption, str):
        raise TypeError(f"caption must be a str, got {type(caption).__name__}")
    text = caption.lower().strip()
    text = re.sub(r"[,.;!]", " ", text)
    text = re.sub(r"\s+", " ", text)
    background = None
    m = _BACKGROUND_RE.search(text)
    if m:
        background = m.group(1)
        if background not in PALETTE:
            raise ValueError(f"unknown background colour {background!r} in caption {caption!r}; "
                             f"colours are {', '.join(COLORS)}")
        text = text[:m.start()] + " " + text[m.end():]
    chunks = [c.strip() for c in re.split(r"\band\b", text) if c.strip()]
    if not chunks:
        raise ValueError(f"caption {caption!r} names no shape; {_allowed_words_message()}")
    if len(chunks) > 2:
        raise ValueError(f"caption {caption!r} names {len(chunks)} objects; ShapesWorld draws 1 or 2")
    objects = []
    # a position said once for a one-object scene may sit anywhere in the caption
    for chunk in chunks:
        position = None
        pm = _POSITION_RE.search(chunk)
        if pm:
            word = pm.group(1)
            position = {"middle": "center", "centre": "center"}.get(word, word)
            chunk = chunk[:pm.start()] + " " + chunk[pm.end():]
        obj = {"shape": None, "color": None, "size": None, "position": position}
        for word in chunk.split():
            if word in PALETTE and obj["color"] is None:
                obj["color"] = word
            elif word in SHAPE_WORDS and obj["shape"] is None:
                obj["shape"] = SHAPE_WORDS[word]
            elif word in SIZE_WORDS and obj["size"] is None:
                obj["size"] = SIZE_WORDS[word]
            elif word in _FILLER:
                continue
            else:
                raise ValueError(f"unknown or repeated word {word!r} in caption {caption!r}; "
                                 f"{_allowed_words_message()}")
        if obj["shape"] is None:
            raise ValueError(f"caption {caption!r} has an object without a shape word; "
                             f"shapes are {', '.join(SHAPE_WORDS)}")
        objects.append(obj)
    return {"background": background, "objects": objects}


def caption_matches(caption: str, attrs: dict) -> bool:
    """True if everything ``caption`` says agrees with ``attrs`` (omissions are fine)."""
    said = parse_caption(caption)
    if said["background"] is not None and said["background"] != attrs["background"]:
        return False
    if len(said["objects"]) != len(attrs["objects"]):
        return False
    for s, a in zip(said["objects"], attrs["objects"]):
        for key in ("shape", "color", "size", "position"):
            if s[key] is not None and s[key] != a[key]:
                return False
    return True


# --------------------------------------------------------------------------- #
# The world
# --------------------------------------------------------------------------- #

@dataclass
class ShapesWorld:
    """An endless, deterministic, captioned data set of shape pictures.

    ``world[i]`` -> (PIL image, caption, attributes). ``seed`` picks the world;
    ``i`` any non-negative integer. ``objects`` is 1, 2, or ``(1, 2)`` for a
    mix; ``shapes`` defaults to the base shapes (the held-out star is opt-in);
    ``complete_captions=True`` makes every caption state every attribute.
    """

    seed: int = 0
    size: int = 64
    objects: int | tuple[int, ...] = 1
    shapes: tuple[str, ...] = SHAPES
    length: int = 10_000  # what len() reports; indexing is not limited by it
    complete_captions: bool = False

    def __post_init__(self):
        if not isinstance(self.size, int) or self.size < 16:
            raise ValueError(f"size must be an int >= 16, got {self.size!r}")
        counts = (self.objects,) if isinstance(self.objects, int) else tuple(self.objects)
        if not counts or any(c not in (1, 2) for c in counts):
            raise ValueError(f"objects must be 1, 2 or (1, 2), got {self.objects!r}")
        self._counts = counts
        unknown = [s for s in self.shapes if s not in ALL_SHAPES]
        if unknown or not self.shapes:
            raise ValueError(f"shapes must be drawn from {ALL_SHAPES}, got {self.shapes!r}")

    def __len__(self) -> int:
        return self.length

    def _rng(self, index: int) -> random.Random:
        # String seeds are hashed with SHA-512 by `random`, identical on every platform.
        return random.Random(f"shapesworld:{self.seed}:{index}")

    def attributes(self, index: int) -> tuple[dict, list[tuple[float, float, float]], random.Random]:
        """The attribute record of sample ``index`` (+ its jitter and the rng for its caption)."""
        if not isinstance(index, (int, np.integer)) or index < 0:
            raise IndexError(f"index must be a non-negative int, got {index!r}")
        rng = self._rng(int(index))
        n = rng.choice(self._counts)
        colors = rng.sample(COLORS, n + 1)  # objects and background all differ
        cells = rng.sample(list(POSITIONS), n)
        objs = []
        jitter = []
        for k in range(n):
            size = rng.choice(list(SIZES)) if n == 1 else rng.choice(["small", "medium"])
            objs.append({"shape": rng.choice(self.shapes), "color": colors[k],
                         "size": size, "position": cells[k]})
            jitter.append((rng.uniform(-0.025, 0.025), rng.uniform(-0.025, 0.025), rng.uniform(0.92, 1.08)))
        return {"background": colors[n], "objects": objs}, jitter, rng

    def __getitem__(self, index: int) -> tuple[Image.Image, str, dict]:
        attrs, jitter, rng = self.attributes(index)
        caption, _ = write_caption(attrs, rng, complete=self.complete_captions)
        return draw_scene(attrs, self.size, jitter), caption, attrs

    def depth(self, index: int) -> np.ndarray:
        """The depth map of sample ``index`` (:func:`draw_depth`): float32 [size, size], 1 = nearest."""
        attrs, jitter, _ = self.attributes(index)
        return draw_depth(attrs, self.size, jitter)

    def render(self, caption: str, seed: int = 0) -> tuple[Image.Image, dict]:
        """Draw a caption you wrote into its ground-truth picture.

        Attributes the caption leaves out are filled in from ``seed`` (size,
        position, background). Words outside the grammar raise ``ValueError``.
        """
        said = parse_caption(caption)
        rng = random.Random(f"render:{seed}:{caption}")
        used_colors = [o["color"] for o in said["objects"] if o["color"]]
        objs = []
        for o in said["objects"]:
            color = o["color"] or rng.choice([c for c in COLORS if c not in used_colors
                                              and c != said["background"]])
            used_colors.append(color)
            objs.append({"shape": o["shape"], "color": color,
                         "size": o["size"] or "medium",
                         "position": o["position"]})
        free = [p for p in POSITIONS if p not in {o["position"] for o in objs}]
        for o in objs:
            if o["position"] is None:
                o["position"] = "center" if len(objs) == 1 else free.pop(rng.randrange(len(free)))
        if len(objs) == 2 and objs[0]["position"] == objs[1]["position"]:
            raise ValueError(f"caption {caption!r} puts both objects in the same place")
        background = said["background"]
        if background is None:
            background = rng.choice([c for c in COLORS if c not in used_colors])
        elif background in used_colors:
            raise ValueError(f"caption {caption!r}: background {background!r} must differ "
                             "from every object's colour")
        attrs = {"background": background, "objects": objs}
        return draw_scene(attrs, self.size), attrs


class ShapesDataset(torch.utils.data.Dataset):
    """``n`` samples of a :class:`ShapesWorld` as (tensor [3,H,W] in [-1, 1], caption).

    Sample ``i`` is ``ShapesWorld(seed)[offset + i]``, so disjoint offsets give
    disjoint train / held-out splits.
    """

    def __init__(self, n: int, seed: int = 0, size: int = 64, offset: int = 0,
                 objects: int | tuple[int, ...] = 1, shapes: tuple[str, ...] = SHAPES,
                 complete_captions: bool = False):
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive int, got {n!r}")
        self.world = ShapesWorld(seed=seed, size=size, objects=objects, shapes=shapes, length=n,
                                 complete_captions=complete_captions)
        self.n, self.offset = n, offset

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str]:
        if not 0 <= i < self.n:
            raise IndexError(f"index {i} out of range for {self.n} samples")
        image, caption, _ = self.world[self.offset + i]
        return pil_to_tensor(image), caption

    def attributes(self, i: int) -> dict:
        return self.world.attributes(self.offset + i)[0]


# --------------------------------------------------------------------------- #
# Samples as SDXL is trained on them (chapter 13)
# --------------------------------------------------------------------------- #

# (height, width) of the aspect-ratio buckets: the square picture and a wide and a tall one of
# about the same area (SDXL paper, Podell et al. 2023, sec. 2.3 and appendix I: buckets of ~1024^2
# pixels; ours hold ~64^2 = 4096: 48 x 80 = 3840, both sides multiples of the latent factor 16).
SDXL_BUCKETS: tuple[tuple[int, int], ...] = ((64, 64), (48, 80), (80, 48))


@dataclass(frozen=True)
class SDXLSample:
    """One training picture with the conditions SDXL's U-Net sees beside the text.

    ``original_size`` (h, w): the size of the picture before any resizing (the scene's
    drawing, or the canvas it was widened to; small originals, enlarged, look soft: the
    model learns to tell, sec. 2.2);
    ``crops_coords_top_left`` (top, left): pixels cut from the top and the left of the
    *resized* picture to fit the bucket (as the paper records them); ``target_size``
    (h, w): the bucket, the size of ``image``. ``boxes``: each object's bounding box
    (x0, y0, x1, y1) in ``image``'s pixels, partly or wholly outside it when cropped.
    """

    image: Image.Image
    caption: str
    attrs: dict
    original_size: tuple[int, int]
    crops_coords_top_left: tuple[int, int]
    target_size: tuple[int, int]
    boxes: tuple[tuple[float, float, float, float], ...]

    @property
    def time_ids(self) -> list[int]:
        """The six numbers of SDXL base's added conditioning: original size, crop, target size."""
        return [*self.original_size, *self.crops_coords_top_left, *self.target_size]


def sdxl_sample(world: ShapesWorld, index: int, bucket: tuple[int, int] | None = None,
                original_sides: tuple[int, int] = (32, 128), max_margin: int = 32,
                zero_margin_prob: float = 0.0) -> SDXLSample:
    """Sample ``index`` of ``world`` as SDXL's data pipeline would hand it over (deterministic).

    1. The scene is drawn at a random original side in ``original_sides`` (inclusive).
    2. It is resized (bicubic) so that its short side fits the bucket (``bucket``, or one of
       :data:`SDXL_BUCKETS` drawn at random) and cropped there at a random place, as SDXL
       does (sec. 2.2): a square scene in the 48x80 bucket loses up to 32 rows, in the
       80x48 one up to 32 columns, and the crop's top-left corner is recorded.
    3. A square scene fits the square bucket with nothing to cut, so there the picture is
       first given a wider view: the canvas grows by a random margin of 0 to
       ``max_margin`` bucket pixels at the bottom and at the right (filled with the
       background colour, as though the photograph showed more of the floor), the
       original size records that canvas, and the crop is taken from it. Cropping
       ``c`` pixels from the top then moves every object exactly ``c`` pixels up (and
       cuts what was within ``c`` of the top edge), and a crop of (0, 0) shows the
       whole scene: the two facts crop conditioning should learn. Each axis's margin is 0
       with probability ``zero_margin_prob`` (else drawn as above), so that uncut views,
       rare when both margins are uniform, are common, as in SDXL's own data, where most
       pictures are cropped along one axis at most. At 0 (the default) no extra random
       number is drawn: the samples are those of earlier caches.
    """
    rng = random.Random(f"shapesworld-sdxl:{world.seed}:{index}")
    if bucket is None:
        bucket = rng.choice(SDXL_BUCKETS)
    height, width = bucket
    lo, hi = original_sides
    if not 16 <= lo <= hi:
        raise ValueError(f"original_sides must be (low, high) with 16 <= low <= high, got {original_sides!r}")
    if isinstance(max_margin, bool) or not isinstance(max_margin, int) or max_margin < 0:
        raise ValueError(f"max_margin must be an integer >= 0, got {max_margin!r}")
    if isinstance(zero_margin_prob, bool) or not isinstance(zero_margin_prob, (int, float)) \
            or not 0.0 <= zero_margin_prob <= 1.0:
        raise ValueError(f"zero_margin_prob must be a probability in [0, 1], got {zero_margin_prob!r}")
    attrs, jitter, caption_rng = world.attributes(index)
    caption, _ = write_caption(attrs, caption_rng, complete=world.complete_captions)
    side = rng.randint(lo, hi)
    fit = max(height, width)                    # the square's side once its short side fits
    picture = draw_scene(attrs, side, jitter)
    if height == width:
        margins = [0 if zero_margin_prob > 0 and rng.random() < zero_margin_prob else rng.randint(0, max_margin)
                   for _ in range(2)]
        extra = [round(m * side / fit) for m in margins]   # in original pixels
        canvas = Image.new("RGB", (side + extra[1], side + extra[0]), PALETTE[attrs["background"]])
        canvas.paste(picture, (0, 0))
        picture = canvas
    scale = fit / side
    resized = (max(width, round(picture.width * scale)), max(height, round(picture.height * scale)))
    top, left = rng.randint(0, resized[1] - height), rng.randint(0, resized[0] - width)
    image = picture.resize(resized, Image.Resampling.BICUBIC).crop((left, top, left + width, top + height))
    sx, sy = resized[0] / picture.width, resized[1] / picture.height
    boxes = []
    for k, obj in enumerate(attrs["objects"]):
        dx, dy, size_jitter = jitter[k]
        col, row = POSITIONS[obj["position"]]
        cx, cy = (_GRID[col] + dx) * side * sx - left, (_GRID[row] + dy) * side * sy - top
        r = SIZES[obj["size"]] * size_jitter * side
        boxes.append((cx - r * sx, cy - r * sy, cx + r * sx, cy + r * sy))
    return SDXLSample(image, caption, attrs, (picture.height, picture.width), (top, left), (height, width),
                      tuple(boxes))


# --------------------------------------------------------------------------- #
# Image helpers
# --------------------------------------------------------------------------- #

def pil_to_tensor(image: Image.Image | Sequence[Image.Image]) -> torch.Tensor:
    """PIL RGB image -> float32 tensor [3, H, W] in [-1, 1]; a list -> [B, 3, H, W].

    Grayscale and RGBA pictures are converted to RGB (alpha dropped), as the
    VAE of Stable Diffusion expects three channels.
    """
    if isinstance(image, (list, tuple)):
        return torch.stack([pil_to_tensor(im) for im in image])
    if not isinstance(image, Image.Image):
        raise TypeError(f"image must be a PIL.Image, got {type(image).__name__}")
    array = np.asarray(image.convert("RGB"), dtype=np.float32)
    return torch.from_numpy(array).permute(2, 0, 1) / 127.5 - 1.0


def tensor_to_pil(tensor: torch.Tensor) -> Image.Image | list[Image.Image]:
    """Tensor [3, H, W] in [-1, 1] -> PIL image; [B, 3, H, W] -> list of images."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"tensor must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.ndim == 4:
        return [tensor_to_pil(t) for t in tensor]
    if tensor.ndim != 3 or tensor.shape[0] not in (1, 3):
        raise ValueError(f"tensor must have shape [3, H, W] or [B, 3, H, W], got {tuple(tensor.shape)}")
    array = ((tensor.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    array = array.permute(1, 2, 0).numpy()
    return Image.fromarray(array[..., 0] if array.shape[2] == 1 else array)


def image_grid(images: Sequence[Image.Image], rows: int | None = None, cols: int | None = None,
               pad: int = 2, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Paste equally sized PIL images into a rows × cols grid (row-major)."""
    images = list(images)
    if not images:
        raise ValueError("images must not be empty")
    n = len(images)
    if rows is None and cols is None:
        cols = math.ceil(math.sqrt(n))
    if cols is None:
        cols = math.ceil(n / rows)
    if rows is None:
        rows = math.ceil(n / cols)
    if rows * cols < n:
        raise ValueError(f"a {rows}×{cols} grid cannot hold {n} images")
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w + (cols + 1) * pad, rows * h + (rows + 1) * pad), background)
    for k, im in enumerate(images):
        r, c = divmod(k, cols)
        grid.paste(im.convert("RGB"), (pad + c * (w + pad), pad + r * (h + pad)))
    return grid


def edge_map(picture: Image.Image | np.ndarray, threshold: float = 64.0) -> Image.Image:
    """The edges of a picture, white on black: the control image of chapter 16's ControlNet.

    picture: PIL RGB or uint8 array [H, W, 3]. Each colour channel is filtered
    with the 3x3 Sobel kernels (Sobel & Feldman 1968), the gradient magnitude
    sqrt(gx^2 + gy^2) is taken per channel and the largest over channels kept
    (two colours of equal brightness still have an edge between them); pixels
    above ``threshold`` (in 0-255 units of the magnitude) are edges. Returns a
    PIL RGB picture of the same size, 255 on edges, 0 elsewhere, as Canny
    control images are (Canny adds thinning and two thresholds: a ShapesWorld
    edge is clean enough without them).
    """
    if isinstance(picture, Image.Image):
        picture = np.asarray(picture.convert("RGB"))
    picture = np.asarray(picture)
    if picture.ndim != 3 or picture.shape[2] != 3:
        raise ValueError(f"picture must be an RGB image [H, W, 3], got shape {picture.shape}")
    if not threshold > 0:
        raise ValueError(f"threshold must be > 0, got {threshold!r}")
    x = np.pad(picture.astype(np.float64), ((1, 1), (1, 1), (0, 0)), mode="edge")
    h, w = picture.shape[:2]

    def window(dy: int, dx: int) -> np.ndarray:
        return x[1 + dy:1 + dy + h, 1 + dx:1 + dx + w]

    gx = (window(-1, 1) + 2 * window(0, 1) + window(1, 1)) - (window(-1, -1) + 2 * window(0, -1) + window(1, -1))
    gy = (window(1, -1) + 2 * window(1, 0) + window(1, 1)) - (window(-1, -1) + 2 * window(-1, 0) + window(-1, 1))
    edges = np.sqrt(gx ** 2 + gy ** 2).max(-1) > threshold
    return Image.fromarray(np.repeat((edges * 255).astype(np.uint8)[..., None], 3, axis=-1))


def default_device() -> torch.device:
    """The best available device: CUDA, then Apple's MPS, then the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")
