"""The chapter rules, checked on every notebook (their execution is nbval's job).

- named ``NN_slug.ipynb``, numbers unique and in the chapter plan (00-16);
- first cell: a markdown title "# NN · ..." and a "You will learn" list;
- imports only ministd modules owned by the chapter itself or earlier ones
  (``ministd.MODULE_CHAPTER``);
- nothing reaches the network (no URLs, no hub downloads);
- stored outputs are small text (no pictures, nothing over 20 kB);
- chapters after 00 end with exercises whose solutions are checked in a
  hidden cell tagged ``solution``.
"""

import json
import re
from pathlib import Path

import nbformat
import pytest

import ministd
from nbtools import ministd_imports

NOTEBOOKS = sorted((Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))
NAME = re.compile(r"^(\d\d)_[a-z0-9]+(?:_[a-z0-9]+)*\.ipynb$")
NETWORK = re.compile(r"https?://(?!localhost|127\.0\.0\.1)|hf_hub_download|snapshot_download|"
                     r"torch\.hub|urllib\.request|\brequests\.|\burlopen\(|wget |curl ")
# top-level names of ministd that are not modules, and the chapter that brings them
TOP_LEVEL = {"load_pipeline": 10, "load_controlnet": 16, "MODULE_CHAPTER": 0, "chapter_of": 0, "__version__": 0}


def test_there_are_chapters():
    assert NOTEBOOKS, "no notebooks found"
    assert NOTEBOOKS[0].name.startswith("00_"), "chapter 00 must exist"


def _chapter(path: Path) -> int:
    return int(path.name[:2])


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_name_and_number(path):
    assert NAME.match(path.name), f"{path.name}: notebooks are named NN_slug.ipynb (lower case, underscores)"
    assert 0 <= _chapter(path) <= 16
    same = [p.name for p in NOTEBOOKS if _chapter(p) == _chapter(path)]
    assert same == [path.name], f"chapter number used twice: {same}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_title_and_learning_goals(path):
    nb = nbformat.read(path, as_version=4)
    first = nb.cells[0]
    assert first.cell_type == "markdown", f"{path.name}: the first cell must be markdown"
    assert re.match(rf"#\s+{path.name[:2]}\s*·\s*\S", first.source), \
        f"{path.name}: first cell must start with '# {path.name[:2]} · Title'"
    assert re.search(r"you will learn", first.source, re.I), f"{path.name}: first cell needs a 'You will learn' list"
    assert re.search(r"^\s*[-*] ", first.source, re.M), f"{path.name}: 'You will learn' must be a bullet list"


def _owner(module: str) -> int:
    head, _, name = module.partition("ministd.")
    if name in TOP_LEVEL:
        return TOP_LEVEL[name]
    return ministd.chapter_of(module)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_imports_only_earlier_modules(path):
    nb = nbformat.read(path, as_version=4)
    chapter = _chapter(path)
    late = {}
    for cell in nb.cells:
        if cell.cell_type == "code":
            for module in ministd_imports(cell.source):
                if _owner(module) > chapter:
                    late[module] = _owner(module)
    assert not late, f"{path.name} imports modules of later chapters: {late}"


def test_import_checker_sees_every_form():
    # the checker itself must catch each import form, or the rule above could not fail
    src = "import ministd.vae\nfrom ministd.unet import UNet\nfrom ministd import text, load_pipeline\n"
    assert ministd_imports(src) == {"ministd.vae", "ministd.unet", "ministd", "ministd.text",
                                    "ministd.load_pipeline"}
    assert max(_owner(m) for m in ministd_imports(src)) == 10


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_no_network(path):
    nb = nbformat.read(path, as_version=4)
    for k, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            hit = NETWORK.search(cell.source)
            assert not hit, f"{path.name} cell {k} reaches for the network: {hit.group(0)!r}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_outputs_are_small_text(path):
    nb = nbformat.read(path, as_version=4)
    for k, cell in enumerate(nb.cells):
        for out in cell.get("outputs", []):
            data = out.get("data", {})
            assert not any(key.startswith("image/") for key in data), \
                f"{path.name} cell {k} stores a picture; strip it (python tests/nbtools.py strip)"
            size = len(json.dumps(out))
            assert size < 20_000, f"{path.name} cell {k} stores {size} bytes of output"


@pytest.mark.parametrize("path", [p for p in NOTEBOOKS if _chapter(p) > 0], ids=lambda p: p.name)
def test_exercises_have_checked_solutions(path):
    nb = nbformat.read(path, as_version=4)
    solutions = [c for c in nb.cells if c.cell_type == "code" and "solution" in c.metadata.get("tags", [])]
    assert solutions, f"{path.name}: exercises need at least one code cell tagged 'solution'"
    for cell in solutions:
        assert cell.metadata.get("jupyter", {}).get("source_hidden"), \
            f"{path.name}: solution cells are hidden by default (metadata jupyter.source_hidden)"
        assert "assert" in cell.source, f"{path.name}: a solution cell must check the answer with assert"


def test_every_owned_module_exists():
    # MODULE_CHAPTER names only modules that are in the package, and every module has an owner
    package = Path(ministd.__file__).parent
    for name in ministd.MODULE_CHAPTER:
        path = package.joinpath(*name.split("."))
        assert path.with_suffix(".py").exists() or (path / "__init__.py").exists(), \
            f"MODULE_CHAPTER lists {name!r}, which is not a module of ministd"
    modules = {p.relative_to(package).with_suffix("").as_posix().replace("/", ".").removesuffix(".__init__")
               for p in package.rglob("*.py") if p.name != "__main__.py"}
    unowned = sorted(m for m in modules if m != "__init__" and m not in ministd.MODULE_CHAPTER)
    assert not unowned, f"modules without an owning chapter in MODULE_CHAPTER: {unowned}"
