"""The HTML book (book/, Jupyter Book 1.x), checked in a real browser.

- book/_toc.yml lists every chapter notebook, in order (no browser needed);
- the build (``python book/build.py``; CI runs it before pytest, and the fixture
  below builds it when it is missing or older than the notebooks) has a page for
  every chapter;
- served over http on localhost and opened in headless Chromium (Debian's
  /usr/bin/chromium, driven by Playwright; no browser is ever downloaded), every
  page loads with no console error and no request leaving localhost, every
  figure renders (naturalWidth > 0), and the search page finds chapters;
- screenshots of the landing page and of a chapter go to test-artifacts/.

Without Chromium, or without the ``book`` extra (jupyter-book, playwright), the
browser tests skip and say why; under CI (``CI=true``) they fail instead.
"""

from __future__ import annotations

import functools
import http.server
import importlib.util
import re
import subprocess
import sys
import threading
from pathlib import Path
from urllib.parse import urlparse

import pytest

ROOT = Path(__file__).resolve().parent.parent
BOOK = ROOT / "book"
HTML = BOOK / "_build" / "html"
ARTIFACTS = ROOT / "test-artifacts"
sys.path.insert(0, str(BOOK))
from chapters import chapter_notebooks, toc_yaml  # noqa: E402

CHAPTERS = chapter_notebooks()


from browser import missing  # noqa: E402  (shared with the other browser test; the `browser` fixture is in conftest.py)


# ----------------------------------------------------------------------- the table of contents

def test_toc_lists_every_chapter_in_order():
    toc = (BOOK / "_toc.yml").read_text()
    listed = re.findall(r"file:\s*notebooks/(\S+)", toc)
    assert listed == [p.stem for p in CHAPTERS], \
        "book/_toc.yml is out of date: run `python book/build.py --toc` (the build rewrites it too)"
    assert toc == toc_yaml(), "book/_toc.yml differs from what book/build.py writes: run `python book/build.py --toc`"


def test_toc_of_a_new_chapter_lands_in_its_part(tmp_path):
    for name in ("00_welcome", "05_latent_diffusion", "09_guidance", "13_sdxl"):
        (tmp_path / f"{name}.ipynb").write_text("{}")
    toc = toc_yaml(chapter_notebooks(tmp_path))
    files = re.findall(r"file:\s*(\S+)", toc)
    assert files == ["course", "notebooks/00_welcome", "notebooks/05_latent_diffusion",
                     "notebooks/09_guidance", "notebooks/13_sdxl", "glossary", "references"]
    assert "caption: SDXL" in toc and "caption: Diffusion from scratch" not in toc


# ----------------------------------------------------------------------- the build

def _stale() -> bool:
    """True when the HTML is missing or older than a chapter, a page of the book or the builder."""
    spec = importlib.util.spec_from_file_location("ministd_book_build", BOOK / "build.py")
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    index = HTML / "index.html"
    if not index.exists():
        return True
    inputs = [*CHAPTERS, BOOK / "build.py"]
    for name in build.PAGES:
        path = BOOK / name
        inputs += [p for p in path.rglob("*") if p.is_file() and "__pycache__" not in p.parts] \
            if path.is_dir() else [path] if path.exists() else []
    return index.stat().st_mtime < max(p.stat().st_mtime for p in inputs)


@pytest.fixture(scope="session")
def book_html() -> Path:
    """book/_build/html, built once per session if missing or older than its sources."""
    if _stale():
        try:
            import jupyter_book  # noqa: F401
        except ImportError:
            missing("jupyter-book is not installed: pip install -e '.[book]' -c constraints.txt")
        result = subprocess.run([sys.executable, str(BOOK / "build.py"), "--cached"], cwd=ROOT,
                                capture_output=True, text=True)
        assert result.returncode == 0, f"book build failed:\n{result.stdout[-5000:]}\n{result.stderr[-5000:]}"
    return HTML


def test_every_chapter_has_a_page(book_html):
    for path in CHAPTERS:
        assert (book_html / "notebooks" / f"{path.stem}.html").exists(), f"no page for {path.name}"
    for page in ("intro", "course", "glossary", "references", "search"):
        assert (book_html / f"{page}.html").exists(), f"no {page}.html"


# ----------------------------------------------------------------------- in the browser

class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture(scope="session")
def server(book_html):
    """The built book over http on a free localhost port."""
    handler = functools.partial(_Quiet, directory=str(book_html))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


class Page:
    """A browser page that records console errors, page errors, failed requests and
    any request for something outside localhost (which it blocks: the book must work offline)."""

    def __init__(self, browser, base: str):
        self.context = browser.new_context(viewport={"width": 1280, "height": 900})
        self.page = self.context.new_page()
        self.problems: list[str] = []
        self.base = base
        self.page.on("console", lambda m: m.type == "error" and self.problems.append(f"console: {m.text}"))
        self.page.on("pageerror", lambda e: self.problems.append(f"page error: {e}"))
        self.page.on("requestfailed", lambda r: self.problems.append(f"request failed: {r.url}"))
        self.context.route("**/*", self._route)

    def _route(self, route):
        host = urlparse(route.request.url).hostname
        if route.request.url.startswith(("data:", "blob:")) or host in ("127.0.0.1", "localhost"):
            route.continue_()
        else:
            self.problems.append(f"request outside localhost: {route.request.url}")
            route.abort()

    def goto(self, path: str):
        self.problems.clear()
        response = self.page.goto(f"{self.base}/{path}", wait_until="load")
        assert response is not None and response.ok, f"{path}: HTTP {response and response.status}"
        self.page.wait_for_load_state("networkidle")
        return self.page

    def images(self) -> list[dict]:
        return self.page.evaluate(
            "() => Array.from(document.images).map(i => ({src: i.getAttribute('src'), "
            "complete: i.complete, width: i.naturalWidth}))")

    def close(self):
        self.context.close()


@pytest.fixture
def page(browser, server):
    p = Page(browser, server)
    yield p
    p.close()


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.stem)
def test_chapter_page_loads_and_its_figures_render(page, path):
    page.goto(f"notebooks/{path.stem}.html")
    assert not page.problems, f"{path.stem}: " + "; ".join(page.problems)
    title = page.page.locator("main h1").first.inner_text()
    assert title.startswith(path.name[:2]), f"{path.stem}: page title is {title!r}"
    images = page.images()
    assert images, f"{path.stem}: no figures (the build must execute the chapter)"
    broken = [i["src"] for i in images if not i["complete"] or i["width"] == 0]
    assert not broken, f"{path.stem}: figures that do not render: {broken}"


@pytest.mark.parametrize("name", ["index", "intro", "course", "glossary", "references", "genindex"])
def test_front_and_back_matter_load(page, name):
    page.goto(f"{name}.html")
    assert not page.problems, f"{name}: " + "; ".join(page.problems)
    if name == "index":  # a redirect to the preface
        assert page.page.url.endswith("intro.html")


def test_glossary_links_chapters_and_references(page):
    page.goto("glossary.html")
    hrefs = page.page.eval_on_selector_all("main a[href]", "els => els.map(e => e.getAttribute('href'))")
    chapters_linked = {h.split("#")[0] for h in hrefs if h.startswith("notebooks/")}
    assert chapters_linked == {f"notebooks/{p.stem}.html" for p in CHAPTERS}, chapters_linked
    assert any(h.startswith("references.html#") for h in hrefs), "glossary cites no paper"
    text = page.page.locator("main").inner_text()
    for term in ("latent space", "VAE", "U-Net", "noise schedule", "sampler", "CFG scale",
                 "denoising strength", "token", "embedding", "cross-attention", "LoRA",
                 "textual inversion", "hypernetwork", "ControlNet", "refiner", "micro-conditioning",
                 "v-prediction", "clip skip"):
        assert re.search(rf"^{re.escape(term)}", text, re.M | re.I), f"glossary lacks {term!r}"
    planned = re.findall(r"chapter (\d\d) · (?:(?!chapter)[^\n])*?\(planned\)", text)
    present = {p.name[:2] for p in CHAPTERS}
    assert not present & set(planned), "a chapter that exists is still called planned"


def test_references_list_the_cited_papers(page):
    page.goto("references.html")
    text = page.page.locator("main").inner_text()
    for title in ("Denoising Diffusion Probabilistic Models", "Denoising Diffusion Implicit Models",
                  "Classifier-Free Diffusion Guidance", "High-Resolution Image Synthesis with Latent Diffusion",
                  "Elucidating the Design Space", "Learning Transferable Visual Models"):
        assert title.lower() in text.lower(), f"references lack {title!r}"


@pytest.mark.parametrize("query, expected", [
    ("guidance", ["glossary.html", "notebooks/"]),   # the glossary and at least one chapter
    ("ShapesWorld", ["notebooks/00_welcome.html"]),
])
def test_search_finds_chapters(page, query, expected):
    p = page.goto(f"search.html?q={query}")
    p.wait_for_selector("#search-results ul.search li a", timeout=30_000)
    hrefs = p.eval_on_selector_all("#search-results ul.search li a",
                                   "els => els.map(e => e.getAttribute('href'))")
    for want in expected:
        assert any(want in h for h in hrefs), f"search for {query!r} found {hrefs}, none with {want!r}"
    assert not page.problems, "; ".join(page.problems)


def test_screenshots(page):
    ARTIFACTS.mkdir(exist_ok=True)
    page.goto("intro.html").screenshot(path=str(ARTIFACTS / "book-landing.png"), full_page=True)
    chapter = next((p for p in CHAPTERS if p.name.startswith("01_")), CHAPTERS[0])
    p = page.goto(f"notebooks/{chapter.stem}.html")
    p.screenshot(path=str(ARTIFACTS / f"book-{chapter.stem}.png"), full_page=True)
    for name in ("book-landing.png", f"book-{chapter.stem}.png"):
        assert (ARTIFACTS / name).stat().st_size > 10_000, f"{name} looks empty"
