"""Sphinx extension for the book's HTML assets (``_config.yml``: ``sphinx: local_extensions``).

1. Serve MathJax from the book. Where ``tools/fetch_mathjax.sh`` (run by ``make book``) has put
MathJax into ``_vendor/mathjax/``, the folder is added to ``html_static_path`` (so it lands in ``_build/html/_static/mathjax/``) and
``mathjax_path`` points at its ``tex-chtml.js``: math renders without a network. Where it has not
(no npm), nothing changes and pages load MathJax from Sphinx's default CDN; this is logged, not a
warning, so ``--warningiserror`` builds still pass.

Not a ``_static/`` folder at the book's root on purpose: Jupyter Book 1 adds every ``.js`` file
under ``_static/`` to every page.

2. Include each inline script once. Sphinx 7.4 (Jupyter Book 1 needs Sphinx 7) registers an inline
script added after the builder starts (``app.add_js_file(None, body=...)``: sphinx-thebe's
``const THEBE_JS_URL``, sphinx-togglebutton's selector) under the file name ``None`` and again under
``''``, so every page declared ``const THEBE_JS_URL`` twice: "Uncaught SyntaxError: Identifier
'THEBE_JS_URL' has already been declared" in the console (tests/browser found it).
"""

from __future__ import annotations

from pathlib import Path

from sphinx.util import logging

logger = logging.getLogger(__name__)
VENDOR = Path("_vendor")  # relative to the book's source folder; holds mathjax/
ENTRY = "mathjax/tex-chtml.js"


def _use_local(app, config) -> None:
    vendor = Path(app.srcdir) / VENDOR
    if not (vendor / ENTRY).is_file():
        logger.info("book_assets: %s not found (run tools/fetch_mathjax.sh); MathJax comes from %s",
                    VENDOR / ENTRY, config.mathjax_path)
        return
    static = list(config.html_static_path or [])
    if str(vendor) not in static:
        static.append(str(vendor))
    config.html_static_path = static
    config.mathjax_path = ENTRY  # relative: Sphinx serves it as _static/mathjax/tex-chtml.js
    version = (vendor / "mathjax" / "VERSION").read_text().strip() if (vendor / "mathjax" / "VERSION").is_file() else "?"
    logger.info("book_assets: serving MathJax %s from _static/%s", version, ENTRY)


def _inline_scripts_once(app, env) -> None:
    builder = app.builder
    scripts = getattr(builder, "_js_files", None)
    if scripts is None:  # not an HTML builder
        return
    try:
        from sphinx.builders.html._assets import _JavaScript  # Sphinx >= 7.2
    except ImportError:
        return

    unique = []
    for js in scripts:
        if js.filename is None:  # the same script as _JavaScript('', ...), which Sphinx adds later
            js = _JavaScript("", priority=js.priority, **js.attributes)
        if js not in unique:
            unique.append(js)
    scripts[:] = unique


def setup(app):
    app.connect("config-inited", _use_local, priority=800)
    app.connect("env-updated", _inline_scripts_once)
    return {"version": "1.0", "parallel_read_safe": True, "parallel_write_safe": True}
