"""The browser test runs when asked for: ``make browser`` or ``pytest tests/browser`` (or ADLIB_BROWSER=1).

``pytest tests`` (``make unit``) collects it too, but there it only skips, with that reason: it would
otherwise check whatever stale book lies in ``_build/html``, before ``make test`` has built one.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent.resolve()


def _asked_for(config) -> bool:
    if os.environ.get("ADLIB_BROWSER") == "1":
        return True
    for arg in config.args:
        path = Path(str(arg).split("::")[0]).resolve()
        if path == HERE or HERE in path.parents:
            return True
    return False


def pytest_collection_modifyitems(config, items):
    if _asked_for(config):
        return
    skip = pytest.mark.skip(reason="browser test of the built book: run `make browser` or `pytest tests/browser`")
    for item in items:
        if HERE in Path(str(item.path)).resolve().parents:
            item.add_marker(skip)


def pytest_terminal_summary(terminalreporter):
    module = sys.modules.get("test_book")  # its record of external URLs (listed, never fetched)
    EXTERNAL = getattr(module, "EXTERNAL", None)
    if EXTERNAL:
        urls = sorted(EXTERNAL)
        terminalreporter.write_sep("-", f"external URLs in the book (listed, not fetched): {len(urls)}")
        for url in urls:
            terminalreporter.write_line(f"  {url}  ({', '.join(sorted(EXTERNAL[url])[:3])}{' ...' if len(EXTERNAL[url]) > 3 else ''})")
