"""Shared pieces of the browser tests (tests/test_book.py, tests/test_jupyterlab_sliders.py).

Chromium is Debian's package, driven through Playwright; no browser is ever
downloaded. Outside CI a missing browser or Playwright skips with the reason;
under CI (``CI=true``) it fails, since .ci/run installs both.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest


def missing(reason: str):
    """Skip, except under CI where a missing browser or extra is a broken set-up."""
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(reason + " (CI must provide it: see .ci/run)")
    pytest.skip(reason)


def chromium_path() -> str:
    for candidate in (os.environ.get("MINISTD_CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium"),
                      shutil.which("chromium-browser")):
        if candidate and Path(candidate).exists():
            return candidate
    missing("Chromium not found (Debian/Ubuntu: apt-get install chromium; or set MINISTD_CHROMIUM)")


def launch_browser():
    """Yield a headless Chromium (a generator for a pytest fixture)."""
    executable = chromium_path()
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing("playwright is not installed: pip install -e '.[book]' -c constraints.txt")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, headless=True,
                                    args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        yield browser
        browser.close()
