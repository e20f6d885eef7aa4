import os
import sys
from pathlib import Path

# Nothing may reach a model hub while testing.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))  # tests/nbtools.py


import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for the module's tests: tiny models run many small ops, and on a shared
    2-core machine one thread is several times faster than two fighting other processes.
    A module opts in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")  # module: Playwright's sync API allows one instance at a time
def browser():
    """Headless Chromium for the browser tests (see tests/browser.py)."""
    from browser import launch_browser

    yield from launch_browser()
