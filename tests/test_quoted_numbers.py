"""The numbers the chapters' prose quotes are the numbers their stored outputs show.

``tools/check_quoted_numbers.py`` holds the rule and the marker for numbers that are not from the
outputs (``<!-- cited: ... -->``, ``<!-- derived: ... -->``, ``<!-- figure: ... -->``); this file runs it
on every notebook and pins the rule down on small examples.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("check_quoted_numbers", ROOT / "tools" / "check_quoted_numbers.py")
cqn = importlib.util.module_from_spec(_spec)
sys.modules["check_quoted_numbers"] = cqn
_spec.loader.exec_module(cqn)

NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_prose_numbers_match_stored_outputs(notebook):
    problems = cqn.check_notebook(notebook)
    assert not problems, "quoted numbers that the stored outputs do not back:\n" + "\n".join(map(str, problems))


def test_every_chapter_is_checked():
    assert len(NOTEBOOKS) >= 9
    # every notebook chapter of the book's table of contents is one of the notebooks checked above, and
    # every notebook checked is a chapter of the book
    chapters = {line.split("file:")[1].strip() for line in (ROOT / "_toc.yml").read_text().splitlines()
                if line.strip().startswith("- file: notebooks/")}
    assert chapters == {f"notebooks/{p.stem}" for p in NOTEBOOKS}


# --- the rule, on small examples ----------------------------------------------------------------------


def _nb(markdown: str, *outputs: str) -> dict:
    cells = [{"cell_type": "markdown", "metadata": {}, "source": markdown}]
    for text in outputs:
        cells.append({"cell_type": "code", "metadata": {}, "source": "", "execution_count": 1,
                      "outputs": [{"output_type": "stream", "name": "stdout", "text": text}]})
    return {"cells": cells, "metadata": {}, "nbformat": 4, "nbformat_minor": 5}


def _problems(tmp_path, markdown: str, *outputs: str) -> list[str]:
    import json

    path = tmp_path / "nb.ipynb"
    path.write_text(json.dumps(_nb(markdown, *outputs)))
    return [p.number for p in cqn.check_notebook(path)]


def _checked(markdown: str) -> list[str]:
    return [q.text for q in cqn.quoted_numbers(markdown) if q.checked]


def test_which_numbers_are_checked():
    text = ("AUROC 0.981 and 0.18; 105.6 s, 12.4 MB, 0.5%, 1.4x, 5.4 times; range 2.3-2.9x; "
            "not: 3 images, 0.3 of the curve, 1e-6, torch 2.14.1, 6,400 images, T4")
    assert _checked(text) == ["0.981", "0.18", "105.6", "12.4", "0.5", "1.4", "5.4", "2.3", "2.9"]


def test_code_comments_links_and_runtime_line_are_not_prose():
    text = ("**Run time.** about 1.5 min\n\n`lr=0.001` [a](https://x.org/v0.25) <!-- 0.77 -->\n"
            "```python\nx = 0.123\n```\n"
            "```{dropdown} Solution\n:class: tip\nthe AUPRO is 0.935\n```\n"
            ":::{admonition} Note\nand 0.42\n:::\n")
    assert _checked(text) == ["0.935", "0.42"]


def test_backed_by_rounding(tmp_path):
    out = "| image_auroc | 0.9957 |\nfit 105.61 s, 0.177, -0.0099, peak 4538.9 MB, share 0.844"
    text = "0.996, 0.99575 no, 105.6 s, 0.18, 0.0099, 4.5 GB, 84.4%, and 0.997"
    assert _problems(tmp_path, text, out) == ["0.99575", "0.997"]


def test_markers_excuse_exactly_what_they_name(tmp_path):
    text = "the paper's 80.72 and 28.25, our 0.41 <!-- cited: 80.72 28.25 Table I --> <!-- figure: 0.41 -->"
    assert _problems(tmp_path, text, "nothing here") == []
    assert _problems(tmp_path, "80.72 <!-- cited: 80.7 -->", "") == ["80.72", "80.7"]  # wrong and stale


def test_stale_marker_is_reported(tmp_path):
    assert _problems(tmp_path, "no numbers <!-- derived: 0.6 -->", "") == ["0.6"]


# --- pages: the README and the book's pages quote the notebooks -------------------------------------


@pytest.mark.parametrize("page", cqn.PAGES, ids=[p.name for p in cqn.PAGES])
def test_page_numbers_match_their_sources(page):
    problems = cqn.check_page(page)
    assert not problems, "quoted numbers that their named sources do not back:\n" + "\n".join(map(str, problems))


def test_a_page_part_is_checked_against_the_sources_it_names(tmp_path, monkeypatch):
    nb = _nb("", "fit 98.3 s; image AUROC 0.977; 3 images")
    nb["metadata"]["adlib"] = {"minutes_cpu": 16}
    (tmp_path / "notebooks").mkdir()
    (tmp_path / "notebooks" / "07_x.ipynb").write_text(__import__("json").dumps(nb))
    monkeypatch.setattr(cqn, "ROOT", tmp_path)
    page = tmp_path / "page.md"
    page.write_text("before any source: 12 min and 0.5 <!-- cited: 0.5 -->\n\n<!-- from: 07_x -->\n"
                    "the chapter takes 16 min, fits in 98 s and scores 0.977, not 0.978 nor 99 s; 3 images, "
                    "not 3 min nor 3 s (a count or a row index, not a time)\n"
                    "<!-- from: -->\nno source again: 0.977\n")
    assert [(p.cell, p.number) for p in cqn.check_page(page)] == [
        (0, "12"), (1, "0.978"), (1, "99"), (1, "3"), (1, "3"), (2, "0.977")]
    page.write_text("<!-- from: 08_missing -->\n0.5\n")
    with pytest.raises(ValueError, match="08_missing"):
        cqn.check_page(page)


# --- run times: the metadata every run-time line is written from is the stored run's -----------------

_spec_sync = importlib.util.spec_from_file_location("sync_notebooks", ROOT / "tools" / "sync_notebooks.py")
sync_notebooks = importlib.util.module_from_spec(_spec_sync)
_spec_sync.loader.exec_module(sync_notebooks)


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_run_time_metadata_is_the_stored_run(notebook):
    """``minutes_cpu`` (or, for a stored run that shared its cores, ``contended_minutes``) is how long
    the stored CPU run took, read from its cells' execution timestamps: within a minute or 15%."""
    import json

    nb = json.loads(notebook.read_text())
    meta = nb["metadata"]["adlib"]
    measured = sync_notebooks.stored_run_minutes(nb)
    assert measured is not None, "the stored run has no execution timestamps (run it with jupyter execute)"
    stated = meta.get("contended_minutes", meta["minutes_cpu"])
    assert abs(stated - measured) <= max(1.0, 0.15 * measured), (
        f"metadata says {stated} min, the stored run took {measured:.1f} min: set adlib.minutes_cpu (quiet CPU) "
        f"or adlib.contended_minutes (shared CPU) and run tools/sync_notebooks.py")


def test_stored_run_minutes_reads_the_timestamps():
    cells = [{"cell_type": "code", "metadata": {"execution": {"iopub.execute_input": "2026-12-07T10:00:00.000000Z",
                                                             "iopub.status.idle": "2026-12-07T10:01:00Z"}}},
             {"cell_type": "markdown", "metadata": {}},
             {"cell_type": "code", "metadata": {"execution": {"iopub.execute_input": "2026-12-07T10:01:00.5Z",
                                                             "iopub.status.idle": "2026-12-07T10:16:30.0Z"}}}]
    assert sync_notebooks.stored_run_minutes({"cells": cells}) == pytest.approx(16.5)
    assert sync_notebooks.stored_run_minutes({"cells": cells[1:2]}) is None


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_no_prose_after_a_comment_that_starts_a_line(notebook):
    """A markdown line that starts with ``<!--`` opens a raw HTML block: prose after the comment on that
    line is then not Markdown (no math, no emphasis) and splits its paragraph. Markers go at a line's end."""
    import json
    import re

    bad = [(index, line.strip()[:80]) for index, cell in enumerate(json.loads(notebook.read_text())["cells"])
           if cell["cell_type"] == "markdown" for line in "".join(cell["source"]).split("\n")
           if re.match(r"^\s*<!--.*?-->\s*\S", line)]
    assert not bad, f"prose after a line-opening comment (move the comment to the end of the line before): {bad}"
