"""The book's chapter plan: numbers, planned titles and the parts they belong to.

Used by ``book/build.py`` (to write ``_toc.yml`` from the notebooks present) and
by the ``{chapter}`` role in ``_ext/chapters_role.py`` (to link a chapter that
exists, or name a planned one as plain text). Numbering is stable; a chapter's
title on its page comes from the notebook's own first heading.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
NAME = re.compile(r"^(\d\d)_[a-z0-9_]+\.ipynb$")

PLAN = {
    0: "welcome",
    1: "forward diffusion",
    2: "learning to denoise",
    3: "samplers",
    4: "autoencoders and latents",
    5: "latent diffusion",
    6: "tokenizer",
    7: "text encoder",
    8: "U-Net and attention",
    9: "guidance",
    10: "text to image",
    11: "image to image",
    12: "inpainting",
    13: "SDXL",
    14: "refiner",
    15: "real checkpoints",
    16: "teaching it new things",
}

# (caption, chapter numbers); a part with no chapter present yet is left out of the toc
PARTS = [
    ("Getting started", [0]),
    ("Diffusion from scratch", [1, 2, 3]),
    ("Latents", [4, 5]),
    ("Text", [6, 7]),
    ("The network and guidance", [8, 9]),
    ("Making pictures", [10, 11, 12]),
    ("SDXL", [13, 14]),
    ("Real models and new tricks", [15, 16]),
]

FRONT = ("Using this book", ["course"])
BACK = ("Reference", ["glossary", "references"])


def chapter_notebooks(folder: Path = NOTEBOOKS) -> list[Path]:
    """Every chapter notebook present (``NN_slug.ipynb``), in chapter order."""
    return sorted(p for p in folder.glob("[0-9][0-9]_*.ipynb") if NAME.match(p.name))


def planned_title(number: int) -> str:
    return f"chapter {number:02d} · {PLAN.get(number, 'untitled')} (planned)"


def toc_yaml(notebooks: list[Path] | None = None) -> str:
    """The text of ``_toc.yml`` (Jupyter Book 1.x, ``jb-book`` format) for these notebooks."""
    notebooks = chapter_notebooks() if notebooks is None else notebooks
    by_number = {int(p.name[:2]): p for p in notebooks}
    placed = {n for _, numbers in PARTS for n in numbers}
    parts = [FRONT]
    for caption, numbers in PARTS:
        present = [n for n in numbers if n in by_number]
        if present:
            parts.append((caption, [f"notebooks/{by_number[n].stem}" for n in present]))
    extra = sorted(n for n in by_number if n not in placed)
    if extra:
        parts.append(("More chapters", [f"notebooks/{by_number[n].stem}" for n in extra]))
    parts.append(BACK)
    lines = [
        "# Written by book/build.py from the notebooks present in notebooks/: do not edit by hand",
        "# (run `python book/build.py --toc` after adding a chapter; the build rewrites it too).",
        "format: jb-book",
        "root: intro",
        "parts:",
    ]
    for caption, files in parts:
        lines.append(f"  - caption: {caption}")
        lines.append("    chapters:")
        lines += [f"      - file: {f}" for f in files]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------ glossary anchors

GLOSSARY = Path(__file__).resolve().parent / "glossary.md"
# a chapter links a glossary term as [words](../book/glossary.md#term-ANCHOR): a real link in
# JupyterLab and on GitHub; book/build.py turns it into a {term} reference for Sphinx
GLOSSARY_LINK = re.compile(r"\[([^\]]+)\]\(\.\./book/glossary\.md#(term-[A-Za-z0-9._-]+)\)")


def glossary_anchor(term: str) -> str:
    """The HTML id Sphinx gives a glossary term (``sphinx.util.nodes.make_id`` with prefix 'term'):
    non-ASCII letters dropped, runs of other characters turned into one hyphen, case kept.
    "alpha-bar (ᾱ)" -> "term-alpha-bar", "CFG scale" -> "term-CFG-scale"."""
    import unicodedata

    text = unicodedata.normalize("NFKD", f"term-{term}").encode("ascii", "ignore").decode("ascii")
    text = re.sub(r"[^a-zA-Z0-9._]+", "-", " ".join(text.split()))
    return re.sub(r"^[-0-9._]+|-+$", "", text)


def glossary_terms(path: Path = GLOSSARY) -> dict[str, str]:
    """{anchor: term} for every term of the glossary's ``{glossary}`` block."""
    terms, inside = {}, False
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("```{glossary}"):
            inside = True
        elif inside and line.startswith("```"):
            inside = False
        elif inside and line.strip() and not line[0].isspace():
            terms[glossary_anchor(line.strip())] = line.strip()
    return terms
