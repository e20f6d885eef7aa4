import os
import sys
from pathlib import Path

# Nothing may reach a model hub while testing.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))  # tests/nbtools.py


import pytest  # noqa: E402


@pytest.fixture(scope="module")  # module: Playwright's sync API allows one instance at a time
def browser():
    """Headless Chromium for the browser tests (see tests/browser.py)."""
    from browser import launch_browser

    yield from launch_browser()
