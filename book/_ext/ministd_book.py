"""Sphinx additions for the ministd book.

The ``{chapter}`NN``` role: a link to chapter NN when its notebook is in the book,
otherwise its planned title as plain text ("chapter 13 · SDXL (planned)"), so pages
written ahead of a chapter never carry a broken link."""

from __future__ import annotations

import re
import sys
from pathlib import Path

from docutils import nodes
from sphinx import addnodes

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # book/chapters.py
from chapters import PLAN, planned_title  # noqa: E402


def chapter_role(name, rawtext, text, lineno, inliner, options=None, content=None):
    try:
        number = int(text.strip())
    except ValueError:
        msg = inliner.reporter.error(f"chapter role needs a chapter number, got {text!r}", line=lineno)
        return [inliner.problematic(rawtext, rawtext, msg)], [msg]
    env = inliner.document.settings.env
    docs = sorted(d for d in env.found_docs if re.match(rf"notebooks/{number:02d}_", d))
    if not docs:
        return [nodes.emphasis(text=planned_title(number))], []
    ref = addnodes.pending_xref("", refdomain="std", reftype="doc", reftarget="/" + docs[0],
                                refexplicit=True, refwarn=True)
    ref += nodes.inline(text=f"chapter {number:02d} · {PLAN.get(number, '')}".rstrip(" ·"))
    return [ref], []


def drop_thebe_scripts(app, pagename, templatename, context, doctree):
    """Remove sphinx-thebe's scripts, which Jupyter Book 1.x always loads: the book has no
    live-code button, and its config script is added twice (a console error on every page)."""
    if "script_files" in context:
        context["script_files"] = [
            js for js in context["script_files"]
            if "thebe" not in str(getattr(js, "filename", js) or "").lower()
            and "THEBE_JS_URL" not in getattr(js, "attributes", {}).get("body", "")
        ]


def setup(app):
    app.add_role("chapter", chapter_role)
    app.connect("html-page-context", drop_thebe_scripts, priority=900)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
