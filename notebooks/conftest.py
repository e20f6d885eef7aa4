"""nbval helpers: the per-chapter time budget, and checking chapters the book build already ran.

**Budget.** Each chapter must run top to bottom in under ``MINISTD_CHAPTER_BUDGET_S``
seconds (60 by default, the book's budget on 2 CPU cores). The durations of
a notebook's cells are summed and the session fails if any chapter is over.

**Executed once.** ``python book/build.py`` executes every chapter in a fresh kernel
and keeps each executed copy in book/_build/executed. With
``MINISTD_EXECUTED_NOTEBOOKS`` set to that folder (CI sets it after the book build),
nbval starts no kernel: each cell's outputs are read from the executed copy and
judged exactly as nbval judges a live run (an error output fails the cell; the
outputs of ``# NBVAL_CHECK_OUTPUT`` cells are compared by nbval's own
``compare_outputs``, after the same sanitizing), and the budget sums the cell times
the build recorded (nbclient's ``metadata.execution`` timestamps). A copy that is
missing, or whose code differs from the notebook, fails the chapter: only a build
of this very notebook counts. Unset, ``pytest`` runs each chapter live, as before.
"""

import os
import types
from collections import defaultdict
from datetime import datetime
from pathlib import Path

import nbformat
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

BUDGET_S = float(os.environ.get("MINISTD_CHAPTER_BUDGET_S", "60"))
EXECUTED_ENV = "MINISTD_EXECUTED_NOTEBOOKS"
_durations: dict[str, float] = defaultdict(float)


def _executed_dir() -> Path | None:
    value = os.environ.get(EXECUTED_ENV, "").strip()
    return Path(value) if value else None


def cell_seconds(cell) -> float:
    """How long the kernel was busy with ``cell``, from the timestamps nbclient records (0 if absent)."""
    stamps = cell.get("metadata", {}).get("execution", {})
    start = stamps.get("iopub.status.busy") or stamps.get("iopub.execute_input")
    end = stamps.get("shell.execute_reply") or stamps.get("iopub.status.idle")
    if not (start and end):
        return 0.0
    return (datetime.fromisoformat(end.replace("Z", "+00:00"))
            - datetime.fromisoformat(start.replace("Z", "+00:00"))).total_seconds()


def _replay_setup(notebook) -> None:
    """Replaces ``IPyNbFile.setup``: no kernel, the executed copy's code cells instead."""
    notebook.setup_sanitize_files()
    copy = _executed_dir() / notebook.path.name
    if not copy.exists():
        raise FileNotFoundError(f"{EXECUTED_ENV}={_executed_dir()} holds no executed copy of "
                                f"{notebook.path.name}: run python book/build.py first, or unset {EXECUTED_ENV}")
    executed = [c for c in nbformat.read(str(copy), as_version=4).cells if c.cell_type == "code"]
    sources = [c.source for c in notebook.nb.cells if c.cell_type == "code"]
    if [c.source for c in executed] != sources:
        raise RuntimeError(f"{copy} was executed from a different version of {notebook.path.name}: "
                           "rebuild the book (python book/build.py) or unset " + EXECUTED_ENV)
    notebook.executed_cells = executed


def _replay_runtest(item) -> None:
    """Replaces ``IPyNbCell.runtest``: the outputs the build recorded, judged as nbval judges a live run."""
    from nbval.plugin import coalesce_streams

    if item.options["skip"]:
        pytest.skip()
    cell = item.parent.executed_cells[item.cell_num]
    item.user_properties.append(("executed_seconds", cell_seconds(cell)))
    for out in cell.outputs:
        if out.output_type == "error":
            item.raise_cell_error("Cell execution caused an exception (in the book build's run)",
                                  "\n" + "\n".join(out.get("traceback", [])))
    outs = coalesce_streams(list(cell.outputs))
    if item.options["check"] and item.cell.execution_count is not None:
        if not item.compare_outputs(outs, coalesce_streams(item.cell.outputs)):
            item.raise_cell_error("Cell outputs differ (in the book build's run)", "\n".join(item.comparison_traceback))


def pytest_collection_modifyitems(session, config, items):
    if _executed_dir() is None:
        return
    from nbval.plugin import IPyNbCell

    for item in items:
        if isinstance(item, IPyNbCell):
            item.runtest = types.MethodType(_replay_runtest, item)
            item.parent.setup = types.MethodType(_replay_setup, item.parent)


def pytest_runtest_logreport(report):
    if report.nodeid.endswith(".ipynb") or ".ipynb::" in report.nodeid:
        recorded = dict(report.user_properties)
        if "executed_seconds" in recorded:      # replayed: the build's time, counted once per cell
            seconds = recorded["executed_seconds"] if report.when == "call" else 0.0
        else:
            seconds = report.duration
        _durations[report.nodeid.split("::")[0]] += seconds


def pytest_terminal_summary(terminalreporter):
    if not _durations:
        return
    where = f"; cell times of the book build's run in {_executed_dir()}" if _executed_dir() else ""
    terminalreporter.section(f"chapter run times (budget {BUDGET_S:.0f} s each{where})")
    for name, seconds in sorted(_durations.items()):
        flag = "  OVER BUDGET" if seconds > BUDGET_S else ""
        terminalreporter.write_line(f"{seconds:7.1f} s  {name}{flag}")


def pytest_sessionfinish(session, exitstatus):
    over = {k: v for k, v in _durations.items() if v > BUDGET_S}
    if over and session.exitstatus == 0:
        session.exitstatus = 1
