"""A chapter's slider, moved by a browser in a real JupyterLab.

Starts ``jupyter lab`` headless on a free localhost port (token, no browser,
root = the repository, settings and workspaces in a temporary folder), opens
notebooks/00_welcome.ipynb in headless Chromium (Debian's /usr/bin/chromium via
Playwright; no browser is downloaded), runs every cell, moves the caption app's
seed slider with the keyboard and checks that the picture the app shows changes.
A screenshot goes to test-artifacts/jupyterlab-slider.png.

Without Chromium or Playwright the test skips and says why; under CI
(``CI=true``) it fails instead.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"
NOTEBOOK = "notebooks/00_welcome.ipynb"


# the `browser` fixture (headless Chromium) is in tests/conftest.py


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """A JupyterLab server for this module: yields its base URL and token."""
    pytest.importorskip("jupyterlab", reason="JupyterLab is not installed (the notebooks extra)")
    home = tmp_path_factory.mktemp("jupyter")
    port, token = free_port(), secrets.token_hex(16)
    env = dict(os.environ, JUPYTER_CONFIG_DIR=str(home / "config"), JUPYTER_RUNTIME_DIR=str(home / "runtime"),
               JUPYTERLAB_SETTINGS_DIR=str(home / "settings"), JUPYTERLAB_WORKSPACES_DIR=str(home / "workspaces"),
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", MPLBACKEND="module://matplotlib_inline.backend_inline")
    # never autosave the executed notebook over the committed one; no news pop-up
    for plugin, settings in {"docmanager-extension/plugin": {"autosave": False},
                             "apputils-extension/notification": {"fetchNews": "false"}}.items():
        path = home / "settings" / "@jupyterlab" / f"{plugin}.jupyterlab-settings"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(settings))
    log = open(home / "lab.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", f"--ServerApp.port={port}",
         "--ServerApp.port_retries=0", "--ServerApp.ip=127.0.0.1", f"--IdentityProvider.token={token}",
         f"--ServerApp.root_dir={ROOT}", "--LabApp.expose_app_in_browser=True", "--LabApp.news_url=None",
         "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
         "--LabApp.extension_manager=readonly", "--ServerApp.terminals_enabled=False",
         *(["--allow-root"] if hasattr(os, "geteuid") and os.geteuid() == 0 else [])],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=2).read()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    log.flush()
                    pytest.fail("jupyter lab did not start:\n" + (home / "lab.log").read_text()[-3000:])
                time.sleep(0.5)
        yield base, token
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


IMAGE = ".jp-OutputArea-output .widget-image"
HANDLE = ".jp-OutputArea-output .widget-slider .noUi-handle"
READOUT = ".jp-OutputArea-output .widget-slider .widget-readout"


def _picture(page) -> tuple[str, str]:
    """The app's <img> src and a hash of the picture's pixels as drawn in the page."""
    src = page.get_attribute(IMAGE, "src")
    digest = hashlib.sha256(page.locator(IMAGE).screenshot()).hexdigest()
    return src, digest


@pytest.fixture
def notebook_untouched():
    """The committed notebook must be byte-for-byte the same after the browser ran it."""
    path = ROOT / NOTEBOOK
    original = path.read_bytes()
    yield
    if path.read_bytes() != original:
        path.write_bytes(original)
        pytest.fail(f"JupyterLab wrote to {NOTEBOOK} (restored)")


def test_caption_app_seed_slider_redraws_the_picture(lab, browser, notebook_untouched):
    base, token = lab
    context = browser.new_context(viewport={"width": 1280, "height": 1000})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    try:
        page.goto(f"{base}/lab/tree/{NOTEBOOK}?token={token}", wait_until="domcontentloaded")
        # the app is exposed (expose_app_in_browser); wait for the notebook and an idle kernel
        page.wait_for_function(
            """() => {
                const app = window.jupyterapp;
                const w = app && app.shell.currentWidget;
                const k = w && w.sessionContext && w.sessionContext.session && w.sessionContext.session.kernel;
                return k && k.status === 'idle' && w.context.path.endsWith('00_welcome.ipynb');
            }""", timeout=120_000)
        page.evaluate("() => window.jupyterapp.commands.execute('notebook:run-all-cells')")
        page.wait_for_selector(HANDLE, timeout=120_000)
        page.wait_for_function(f"() => {{ const i = document.querySelector('{IMAGE}'); "
                               "return i && i.complete && i.naturalWidth > 0; }", timeout=60_000)
        page.locator(IMAGE).scroll_into_view_if_needed()
        before = _picture(page)
        readout_before = page.inner_text(READOUT)

        handle = page.locator(HANDLE).first
        handle.focus()
        changed = None
        for _ in range(5):  # a neighbouring seed may, rarely, draw the same picture
            old_src = page.get_attribute(IMAGE, "src")
            page.keyboard.press("ArrowRight")
            try:
                page.wait_for_function(
                    f"old => {{ const i = document.querySelector('{IMAGE}'); "
                    "return i && i.getAttribute('src') !== old && i.complete && i.naturalWidth > 0; }",
                    arg=old_src, timeout=30_000)
            except Exception:
                continue
            after = _picture(page)
            if after[1] != before[1]:
                changed = after
                break
        readout_after = page.inner_text(READOUT)
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "jupyterlab-slider.png"))

        assert readout_after != readout_before, f"the slider did not move (readout {readout_before!r})"
        assert changed is not None, "moving the seed slider did not change the picture"
        assert changed[0] != before[0], "the picture changed but the <img> src did not"
        assert not errors, "; ".join(errors)
    finally:
        context.close()
