"""nbval helpers: the per-chapter time budget.

Each chapter must run top to bottom in under ``MINISTD_CHAPTER_BUDGET_S``
seconds (60 by default, the book's budget on 2 CPU cores). The durations of
a notebook's cells are summed and the session fails if any chapter is over.
"""

import os
from collections import defaultdict

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

BUDGET_S = float(os.environ.get("MINISTD_CHAPTER_BUDGET_S", "60"))
_durations: dict[str, float] = defaultdict(float)


def pytest_runtest_logreport(report):
    if report.nodeid.endswith(".ipynb") or ".ipynb::" in report.nodeid:
        _durations[report.nodeid.split("::")[0]] += report.duration


def pytest_terminal_summary(terminalreporter):
    if not _durations:
        return
    terminalreporter.section(f"chapter run times (budget {BUDGET_S:.0f} s each)")
    for name, seconds in sorted(_durations.items()):
        flag = "  OVER BUDGET" if seconds > BUDGET_S else ""
        terminalreporter.write_line(f"{seconds:7.1f} s  {name}{flag}")


def pytest_sessionfinish(session, exitstatus):
    over = {k: v for k, v in _durations.items() if v > BUDGET_S}
    if over and session.exitstatus == 0:
        session.exitstatus = 1
