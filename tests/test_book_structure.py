"""The chapters read as one book: every chapter opens, closes and leads on, and every
exercise leaves the reader room before its solution.

For every chapter notebook ``notebooks/NN_slug.ipynb``:

- **title**: the first cell is markdown starting ``# NN · Title``;
- **you will learn**: that first cell has a "You will learn" bullet list;
- **closing**: the last cell is markdown starting ``## What you have now``, and it
  - links the *next chapter present* in notebooks/ with a markdown link to its file,
    ``[...](NN_slug.ipynb)`` (so 10 links 11_image_to_image.ipynb; a chapter whose
    successor is not written yet links the next one that is, and must link the new one
    once it exists); the last chapter present links the glossary
    (``](../book/glossary.md)``) and the references (``](../book/references.md)``) instead;
  - links at least one glossary term (the terms the chapter introduced), either as
    ``[words](../book/glossary.md#term-ANCHOR)`` with an anchor the glossary defines
    (``book/chapters.py: glossary_anchor``) or as a MyST ``{term}`name``` reference to a
    term the glossary defines;
- **exercises**: every code cell tagged ``solution`` (hidden, see test_notebooks.py) comes
  right after a visible *reader cell*: a code cell, not a solution, whose text says
  where the reader's work goes ("your code here", "your answer", ``...  # your ...``),
  and it runs as shipped (nbval executes it); before that reader cell, after the
  previous solution, a markdown cell states the exercise (it says "Exercise").

Every link to another chapter or to a page of the book, anywhere in a chapter, must
point at a file that exists (markdown links ``](NN_slug.ipynb)``, ``](../book/page.md)``).
"""

import re
import sys
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "book"))
from chapters import GLOSSARY, chapter_notebooks, glossary_terms  # noqa: E402

NOTEBOOKS = chapter_notebooks(ROOT / "notebooks")
TERMS = glossary_terms(GLOSSARY)
CHAPTER_LINK = re.compile(r"\]\((\d\d_[a-z0-9_]+\.ipynb)(?:#[^)]*)?\)")
PAGE_LINK = re.compile(r"\]\(\.\./book/([a-z_]+\.md)(#[^)]*)?\)")
GLOSSARY_TERM_LINK = re.compile(r"\]\(\.\./book/glossary\.md#(term-[A-Za-z0-9._-]+)\)")
TERM_ROLE = re.compile(r"\{term\}`([^`]+)`")
READER = re.compile(r"#.*\byour\b", re.I)


def _read(path):
    return nbformat.read(path, as_version=4)


def _is_solution(cell):
    return cell.cell_type == "code" and "solution" in cell.metadata.get("tags", [])


def _next_present(path):
    later = [p for p in NOTEBOOKS if p.name[:2] > path.name[:2]]
    return later[0] if later else None


def test_chapters_found():
    assert len(NOTEBOOKS) >= 11, [p.name for p in NOTEBOOKS]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_title_and_you_will_learn(path):
    first = _read(path).cells[0]
    assert first.cell_type == "markdown", f"{path.name}: the first cell must be markdown"
    assert re.match(rf"#\s+{path.name[:2]}\s*·\s*\S", first.source), f"{path.name}: no '# NN · Title'"
    assert re.search(r"you will learn", first.source, re.I), f"{path.name}: no 'You will learn'"
    assert re.search(r"^\s*[-*] ", first.source, re.M), f"{path.name}: 'You will learn' needs a bullet list"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_closing_summary_leads_on(path):
    last = _read(path).cells[-1]
    assert last.cell_type == "markdown" and re.match(r"##\s+What you have now", last.source), \
        f"{path.name}: the last cell must be a markdown '## What you have now' summary"
    following = _next_present(path)
    linked = set(CHAPTER_LINK.findall(last.source))
    if following is not None:
        assert following.name in linked, \
            f"{path.name}: the summary must link the next chapter, [...]({following.name})"
    else:
        pages = {m[0] for m in PAGE_LINK.findall(last.source)}
        assert {"glossary.md", "references.md"} <= pages, \
            f"{path.name} is the last chapter: its summary must link ../book/glossary.md and ../book/references.md"
    anchors = GLOSSARY_TERM_LINK.findall(last.source)
    roles = [r.split("<")[-1].rstrip(">").strip() for r in TERM_ROLE.findall(last.source)]
    assert anchors or roles, \
        f"{path.name}: the summary must link the glossary terms the chapter introduced, " \
        "[words](../book/glossary.md#term-ANCHOR)"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_links_resolve(path):
    for k, cell in enumerate(_read(path).cells):
        if cell.cell_type != "markdown":
            continue
        for name in CHAPTER_LINK.findall(cell.source):
            assert (ROOT / "notebooks" / name).exists(), f"{path.name} cell {k}: link to missing chapter {name}"
        for page, _ in PAGE_LINK.findall(cell.source):
            assert (ROOT / "book" / page).exists(), f"{path.name} cell {k}: link to missing page {page}"
        for anchor in GLOSSARY_TERM_LINK.findall(cell.source):
            assert anchor in TERMS, f"{path.name} cell {k}: the glossary has no term with anchor #{anchor}"
        for role in TERM_ROLE.findall(cell.source):
            term = role.split("<")[-1].rstrip(">").strip() if "<" in role else role.strip()
            assert term.lower() in {t.lower() for t in TERMS.values()}, \
                f"{path.name} cell {k}: {{term}}`{role}`: no such glossary term"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_every_solution_has_a_reader_cell(path):
    cells = _read(path).cells
    previous_solution = -1
    for k, cell in enumerate(cells):
        if not _is_solution(cell):
            continue
        reader = cells[k - 1] if k > 0 else None
        assert reader is not None and reader.cell_type == "code" and not _is_solution(reader) \
            and not reader.metadata.get("jupyter", {}).get("source_hidden"), \
            f"{path.name} cell {k}: a solution needs a visible reader cell right before it"
        assert READER.search(reader.source), \
            f"{path.name} cell {k - 1}: the reader cell must say where the reader's work goes ('# your code here')"
        question = [c for c in cells[previous_solution + 1:k - 1] if c.cell_type == "markdown"]
        assert any(re.search(r"exercise", c.source, re.I) for c in question), \
            f"{path.name} cell {k}: no markdown cell states the exercise before its reader cell"
        previous_solution = k


def test_chapter_00_gives_the_readmes_test_command():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("Set up and run the whole test suite"):]
    command = re.search(r"```bash\n(.+?)\n```", section, re.S).group(1).strip()
    welcome = "\n".join(c.source for c in _read(NOTEBOOKS[0]).cells if c.cell_type == "markdown")
    assert command in welcome, f"chapter 00 must show the README's test command: {command}"
