"""Notebook housekeeping for authors: run a chapter, strip its outputs, check its rules.

    python tests/nbtools.py run notebooks/03_samplers.ipynb     # execute in place, print the time
    python tests/nbtools.py strip notebooks/03_samplers.ipynb   # keep only NBVAL_CHECK_OUTPUT text

Stored outputs are stripped except the text outputs of cells marked
``# NBVAL_CHECK_OUTPUT``, which nbval compares on every run: pictures in
outputs make diffs unreadable and the repository heavy, and the rendered book
executes the chapters itself.
"""

from __future__ import annotations

import ast
import sys
import time
from pathlib import Path

import nbformat

CHECK_MARK = "# NBVAL_CHECK_OUTPUT"


def is_checked(cell) -> bool:
    return cell.cell_type == "code" and cell.source.lstrip().startswith(CHECK_MARK)


def strip(path: str | Path) -> None:
    """Remove outputs (keeping text outputs of checked cells) and execution counts."""
    nb = nbformat.read(str(path), as_version=4)
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        cell.metadata.pop("execution", None)
        if is_checked(cell):
            # nbval treats a cell with outputs but no execution count as "unrun"
            cell.execution_count = cell.execution_count or 1
            kept = []
            for out in cell.outputs:
                if out.output_type == "stream" and out.name == "stdout":
                    kept.append(out)
                elif out.output_type == "execute_result" and "text/plain" in out.get("data", {}):
                    out.data = {"text/plain": out.data["text/plain"]}
                    out.execution_count = cell.execution_count
                    out.metadata = {}
                    kept.append(out)
            cell.outputs = kept
        else:
            cell.execution_count = None
            cell.outputs = []
    nb.metadata.pop("widgets", None)
    nbformat.write(nb, str(path))


def run(path: str | Path, timeout: int = 600) -> float:
    """Execute the notebook in place in a fresh kernel; returns the seconds it took."""
    from nbclient import NotebookClient

    nb = nbformat.read(str(path), as_version=4)
    start = time.perf_counter()
    NotebookClient(nb, timeout=timeout, kernel_name="python3",
                   resources={"metadata": {"path": str(Path(path).parent)}}).execute()
    seconds = time.perf_counter() - start
    nbformat.write(nb, str(path))
    return seconds


def ministd_imports(source: str) -> set[str]:
    """Every ``ministd...`` module a cell imports (``import`` and ``from`` forms)."""
    lines = [ln for ln in source.splitlines() if not ln.lstrip().startswith(("%", "!"))]
    try:
        tree = ast.parse("\n".join(lines))
    except SyntaxError:
        return set()
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "ministd"}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "ministd":
            found.add(node.module)
            if node.module == "ministd":  # "from ministd import vae" imports a module
                found |= {f"ministd.{a.name}" for a in node.names}
    return found


if __name__ == "__main__":
    if len(sys.argv) < 3 or sys.argv[1] not in ("run", "strip"):
        sys.exit("usage: python tests/nbtools.py {run,strip} NOTEBOOK...")
    for name in sys.argv[2:]:
        if sys.argv[1] == "run":
            print(f"{name}: {run(name):.1f} s")
        else:
            strip(name)
            print(f"{name}: stripped")
