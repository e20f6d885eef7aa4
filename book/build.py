#!/usr/bin/env python
"""Build the HTML book into book/_build/html:  python book/build.py

1. writes book/_toc.yml from the chapter notebooks present in notebooks/ (a new
   ``NN_slug.ipynb`` appears in its part, in order, with no hand editing);
2. executes every chapter top to bottom in a fresh kernel, offline (committed
   notebooks carry no pictures: the figures come from this run), at most
   ``--timeout`` seconds per cell;
3. turns each ipywidgets app's output into static content (the picture and the
   control values it was drawn with), since a web page has no kernel to talk to,
   and folds the cells JupyterLab hides (exercise solutions) behind a toggle;
4. stages the book's pages and the executed chapters in book/_build/src and runs
   ``jupyter-book build`` (1.x) on them, warnings as errors.

The notebooks are never modified, and never copied into the repository.
``--toc`` only rewrites book/_toc.yml; ``--cached`` reuses chapters executed by an
earlier build when neither they nor ministd/ nor data/ changed since.
"""

from __future__ import annotations

import argparse
import base64
import html
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

BOOK = Path(__file__).resolve().parent
sys.path.insert(0, str(BOOK))
from chapters import GLOSSARY_LINK, NOTEBOOKS, ROOT, chapter_notebooks, glossary_terms, toc_yaml  # noqa: E402

BUILD = BOOK / "_build"
SRC = BUILD / "src"
EXECUTED = BUILD / "executed"  # executed chapters, reused by --cached while still fresh
HTML = BUILD / "html"
# the book's own sources (everything else in book/ is tooling)
PAGES = ["_config.yml", "_toc.yml", "intro.md", "course.md", "glossary.md", "references.md",
         "references.bib", "chapters.py", "_ext", "_static"]
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
WIDGET_STATE = "application/vnd.jupyter.widget-state+json"


def write_toc() -> bool:
    """Rewrite book/_toc.yml from the notebooks present; True when it changed."""
    path = BOOK / "_toc.yml"
    text = toc_yaml()
    if path.exists() and path.read_text() == text:
        return False
    path.write_text(text)
    return True


# ------------------------------------------------------------------ widgets -> static outputs

def _model(state: dict, ref: str) -> dict | None:
    return state.get(ref.removeprefix("IPY_MODEL_"))


def _image_bytes(model: dict) -> bytes | None:
    for buf in model.get("buffers", []):
        if buf.get("path") == ["value"]:
            return base64.b64decode(buf["data"])
    value = model["state"].get("value")
    if isinstance(value, str) and value:
        try:
            return base64.b64decode(value)
        except ValueError:
            return None
    return None


def _static(state: dict, ref: str, controls: list[str]) -> list[dict]:
    """Outputs that show what widget ``ref`` displays; control values go to ``controls``."""
    model = _model(state, ref)
    if model is None:
        return []
    name, s = model["model_name"], model["state"]
    if name == "ImageModel":
        data = _image_bytes(model)
        if not data:
            return []
        mime = "image/" + ("jpeg" if s.get("format") in ("jpg", "jpeg") else s.get("format", "png"))
        return [{"output_type": "display_data", "metadata": {},
                 "data": {mime: base64.b64encode(data).decode(), "text/plain": "<image>"}}]
    if name == "OutputModel":
        return list(s.get("outputs", []))
    if name in ("HTMLModel", "HTMLMathModel", "LabelModel"):
        value = s.get("value", "")
        return [{"output_type": "display_data", "metadata": {},
                 "data": {"text/html": value, "text/plain": value}}] if value else []
    if "children" in s:  # VBox, HBox, Box, GridBox, interact's container, ...
        outs = []
        for child in s["children"]:
            outs += _static(state, child, controls)
        return outs
    label = s.get("description") or name.removesuffix("Model")
    if s.get("_options_labels") and isinstance(s.get("index"), int):  # dropdown, radio buttons
        controls.append(f"{label} = {s['_options_labels'][s['index']]!r}")
    elif "value" in s:  # slider, text box, checkbox
        controls.append(f"{label} = {s['value']!r}")
    return []


def staticize_widgets(nb) -> int:
    """Replace every widget view in ``nb`` by the outputs it shows; returns how many."""
    state = nb.metadata.get("widgets", {}).get(WIDGET_STATE, {}).get("state", {})
    count = 0
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        new = []
        for out in cell.get("outputs", []):
            view = out.get("data", {}).get(WIDGET_VIEW)
            if view is None:
                new.append(out)
                continue
            count += 1
            controls: list[str] = []
            shown = _static(state, view["model_id"], controls)
            note = ("<p><em>A live app in JupyterLab; here, what it shows for "
                    + (", ".join(f"<code>{html.escape(c)}</code>" for c in controls) or "its first settings")
                    + ".</em></p>")
            new.append({"output_type": "display_data", "metadata": {},
                        "data": {"text/html": note, "text/plain": "(app)"}})
            new += shown
        cell.outputs = [_as_node(o) for o in new]
    nb.metadata.pop("widgets", None)
    return count


def fold_hidden_sources(nb) -> None:
    """Cells hidden in JupyterLab (exercise solutions) stay folded in the book, behind a toggle."""
    for cell in nb.cells:
        if cell.get("metadata", {}).get("jupyter", {}).get("source_hidden"):
            tags = cell.metadata.setdefault("tags", [])
            if "hide-input" not in tags:
                tags.append("hide-input")


def book_links(nb, terms: dict[str, str] | None = None) -> None:
    """Chapters link the glossary and the other pages as files of the repository
    (``../book/glossary.md#term-seed``), which JupyterLab and GitHub follow. In the staged book
    the pages sit one folder up from the chapters, and Sphinx knows a glossary entry as a term,
    not as an id in a page: ``[seeds](../book/glossary.md#term-seed)`` becomes
    ``{term}`seeds <seed>```, and ``](../book/page.md)`` becomes ``](../page.md)``."""
    terms = glossary_terms() if terms is None else terms

    def term(match):
        words, anchor = match.group(1), match.group(2)
        if anchor not in terms:
            raise ValueError(f"link to an unknown glossary term: {match.group(0)}")
        return f"{{term}}`{words} <{terms[anchor]}>`"

    for cell in nb.cells:
        if cell.cell_type == "markdown":
            cell.source = GLOSSARY_LINK.sub(term, cell.source).replace("](../book/", "](../")


def _as_node(out):
    import nbformat
    return nbformat.from_dict(out) if isinstance(out, dict) else out


# ------------------------------------------------------------------ execution

def execute(path: Path, dest: Path, timeout: int) -> tuple[float, int]:
    """Run ``path`` in a fresh kernel (working directory notebooks/) and write it to ``dest``."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(str(path), as_version=4)
    start = time.perf_counter()
    NotebookClient(nb, timeout=timeout, kernel_name="python3", store_widget_state=True,
                   resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    seconds = time.perf_counter() - start
    widgets = staticize_widgets(nb)
    nbformat.write(nb, str(dest))
    return seconds, widgets


def kernel_environment() -> None:
    """Offline, and matplotlib's inline backend (CI exports MPLBACKEND=Agg, which shows nothing)."""
    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        os.environ[key] = "1"
    os.environ["MPLBACKEND"] = "module://matplotlib_inline.backend_inline"
    os.environ.setdefault("PYDEVD_DISABLE_FILE_VALIDATION", "1")  # quiet debugpy warning on stderr


def _fresh(executed: Path, source: Path) -> bool:
    if not executed.exists():
        return False
    inputs = [source, *(ROOT / "ministd").rglob("*.py"), *(ROOT / "data").glob("*")]
    return executed.stat().st_mtime > max(p.stat().st_mtime for p in inputs)


def stage() -> None:
    if SRC.exists():
        shutil.rmtree(SRC)
    (SRC / "notebooks").mkdir(parents=True)
    for name in PAGES:
        source = BOOK / name
        if source.is_dir():
            shutil.copytree(source, SRC / name, ignore=shutil.ignore_patterns("__pycache__"))
        elif source.exists():
            shutil.copy2(source, SRC / name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--toc", action="store_true", help="only rewrite book/_toc.yml")
    parser.add_argument("--timeout", type=int, default=120, help="seconds per cell (default 120)")
    parser.add_argument("--cached", action="store_true",
                        help="reuse a chapter executed by an earlier build when neither it nor ministd/ "
                             "changed since (default: execute every chapter)")
    parser.add_argument("--quiet", action="store_true", help="only warnings and errors from Sphinx")
    parser.add_argument("--no-warnings-as-errors", dest="strict", action="store_false")
    args = parser.parse_args(argv)

    if write_toc():
        print("book/_toc.yml rewritten from notebooks/")
    if args.toc:
        return 0
    notebooks = chapter_notebooks()
    if not notebooks:
        print("no chapter notebooks in notebooks/", file=sys.stderr)
        return 1
    import nbformat

    start = time.perf_counter()
    kernel_environment()
    EXECUTED.mkdir(parents=True, exist_ok=True)
    for path in notebooks:
        dest = EXECUTED / path.name
        if args.cached and _fresh(dest, path):
            print(f"reused {path.name} (executed after its last change and ministd's)", flush=True)
            continue
        seconds, widgets = execute(path, dest, args.timeout)
        extra = f", {widgets} app(s) made static" if widgets else ""
        print(f"executed {path.name} in {seconds:.1f} s{extra}", flush=True)
    stage()
    for path in notebooks:
        nb = nbformat.read(str(EXECUTED / path.name), as_version=4)
        fold_hidden_sources(nb)
        book_links(nb)
        nbformat.write(nb, str(SRC / "notebooks" / path.name))
    executed = time.perf_counter() - start
    cmd = [sys.executable, "-c", "import sys; from jupyter_book.cli.main import main; sys.exit(main())",
           "build", str(SRC), "--path-output", str(BOOK), "--all"]
    if args.strict:
        cmd += ["-W", "-n", "--keep-going"]
    if args.quiet:
        cmd += ["-q"]
    result = subprocess.run(cmd, cwd=ROOT)
    if result.returncode != 0:
        print("jupyter-book build failed", file=sys.stderr)
        return result.returncode
    total = time.perf_counter() - start
    print(f"book built in {total:.0f} s ({executed:.0f} s executing {len(notebooks)} chapters): "
          f"{(HTML / 'index.html').relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
