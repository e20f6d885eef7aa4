"""notebooks/conftest.py: chapters the book build executed are judged from its copies, as nbval judges a live run.

Each case runs pytest (with nbval, as pyproject.toml configures it) in a fresh
folder holding one small notebook, a copy of notebooks/conftest.py and, for the
replay cases, an "executed" copy written the way nbclient writes it. The notebook's
last cell raises when it is run, so a replayed chapter that passes proves no
kernel ran it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_notebook, new_output

ROOT = Path(__file__).resolve().parent.parent
CHECKED = "# NBVAL_CHECK_OUTPUT\nprint(6 * 7)"
UNCHECKED = "print('anything')"
RAISES = "raise RuntimeError('this cell must never run in a replay')"


def _stamps(seconds: float) -> dict:
    """nbclient's timing metadata for a cell the kernel was busy with for ``seconds``."""
    end = f"2026-12-02T10:00:{seconds:09.6f}Z"
    return {"iopub.status.busy": "2026-12-02T10:00:00.000000Z", "iopub.execute_input": "2026-12-02T10:00:00.001000Z",
            "shell.execute_reply": end, "iopub.status.idle": end}


def _write(folder: Path, checked_out: str, sources=(CHECKED, UNCHECKED, RAISES), error_in_last=False,
           seconds: float = 0.5) -> None:
    """The chapter (reference output "42") in ``folder`` and its executed copy in ``folder/executed``."""
    chapter = new_notebook(cells=[new_code_cell(CHECKED, execution_count=1,
                                                outputs=[new_output("stream", name="stdout", text="42\n")]),
                                  new_code_cell(UNCHECKED), new_code_cell(RAISES)])
    nbformat.write(chapter, str(folder / "chapter.ipynb"))
    outputs = [[new_output("stream", name="stdout", text=checked_out)],
               [new_output("stream", name="stdout", text="anything\n")],
               [new_output("error", ename="ValueError", evalue="boom", traceback=["ValueError: boom"])]
               if error_in_last else []]
    cells = []
    for k, (source, outs) in enumerate(zip(sources, outputs)):
        cell = new_code_cell(source, execution_count=k + 1, outputs=outs)
        cell.metadata["execution"] = _stamps(seconds)
        cells.append(cell)
    (folder / "executed").mkdir()
    nbformat.write(new_notebook(cells=cells), str(folder / "executed" / "chapter.ipynb"))


def _pytest(folder: Path, executed: bool = True, budget: float = 60.0) -> subprocess.CompletedProcess:
    shutil.copy(ROOT / "notebooks" / "conftest.py", folder / "conftest.py")
    shutil.copy(ROOT / "notebooks" / "nbval_sanitize.cfg", folder / "nbval_sanitize.cfg")
    (folder / "pytest.ini").write_text("[pytest]\naddopts = --nbval-lax --nbval-current-env "
                                       "--nbval-sanitize-with nbval_sanitize.cfg\n")
    env = {**os.environ, "MINISTD_CHAPTER_BUDGET_S": str(budget)}
    env.pop("MINISTD_EXECUTED_NOTEBOOKS", None)
    if executed:
        env["MINISTD_EXECUTED_NOTEBOOKS"] = str(folder / "executed")
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "chapter.ipynb"],
                          cwd=folder, env=env, capture_output=True, text=True, timeout=300)


def test_a_matching_executed_copy_passes_without_running_a_kernel(tmp_path):
    _write(tmp_path, checked_out="42\n", seconds=0.5)
    result = _pytest(tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 passed" in result.stdout
    assert "1.5 s  chapter.ipynb" in result.stdout          # three cells of 0.5 s each, as the build timed them


def test_without_the_variable_the_chapter_runs_live(tmp_path):
    """The control: run live, the raising cell fails, so the replay above really read the copy."""
    _write(tmp_path, checked_out="42\n")
    result = _pytest(tmp_path, executed=False)
    assert result.returncode != 0
    assert "this cell must never run in a replay" in result.stdout
    assert "2 passed" in result.stdout and "1 failed" in result.stdout


def test_a_checked_output_that_differs_fails(tmp_path):
    _write(tmp_path, checked_out="41\n")
    result = _pytest(tmp_path)
    assert result.returncode != 0
    assert "Cell outputs differ" in result.stdout and "1 failed" in result.stdout


def test_sanitized_differences_do_not_fail(tmp_path):
    """nbval's sanitizing applies: the reference and the copy differ only in a memory address."""
    _write(tmp_path, checked_out="42\n")
    for name in ("chapter.ipynb", "executed/chapter.ipynb"):
        nb = nbformat.read(str(tmp_path / name), as_version=4)
        nb.cells[0].outputs[0].text = "at 0x7f00aa\n" if name == "chapter.ipynb" else "at 0x55bb01\n"
        nbformat.write(nb, str(tmp_path / name))
    result = _pytest(tmp_path)
    assert result.returncode == 0, result.stdout


def test_an_error_in_the_executed_copy_fails(tmp_path):
    _write(tmp_path, checked_out="42\n", error_in_last=True)
    result = _pytest(tmp_path)
    assert result.returncode != 0
    assert "Cell execution caused an exception" in result.stdout and "ValueError: boom" in result.stdout


def test_a_copy_of_another_version_of_the_chapter_fails(tmp_path):
    _write(tmp_path, checked_out="42\n", sources=(CHECKED, "print('an older cell')", RAISES))
    result = _pytest(tmp_path)
    assert result.returncode != 0
    assert "executed from a different version of chapter.ipynb" in result.stdout


def test_a_missing_copy_fails(tmp_path):
    _write(tmp_path, checked_out="42\n")
    (tmp_path / "executed" / "chapter.ipynb").unlink()
    result = _pytest(tmp_path)
    assert result.returncode != 0
    assert "holds no executed copy of chapter.ipynb" in result.stdout


@pytest.mark.parametrize("seconds, over", [(0.9, False), (1.1, True)])
def test_the_budget_counts_the_builds_cell_times(tmp_path, seconds, over):
    """Budget 3 s: three cells of 0.9 s pass, three of 1.1 s fail the session."""
    _write(tmp_path, checked_out="42\n", seconds=seconds)
    result = _pytest(tmp_path, budget=3.0)
    assert "3 passed" in result.stdout
    assert (result.returncode != 0) == over
    assert ("OVER BUDGET" in result.stdout) == over
