"""The notebook output tidier (tools/strip_stderr.py): stderr dropped, repeated native lines collapsed."""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from strip_stderr import collapse_repeats, tidy_outputs  # noqa: E402


def test_a_run_of_one_line_becomes_the_line_and_its_count():
    text = "start\n\nMKL ERROR\n\nMKL ERROR\n\nMKL ERROR\n  peer failed\nend\n"
    assert collapse_repeats(text) == "start\n\nMKL ERROR  [... printed 3 times in a row]\n  peer failed\nend\n"
    assert collapse_repeats("a\nb\na\n") == "a\nb\na\n"          # only runs collapse, not every repeat
    assert collapse_repeats("E.\nE.E.\n\nE.\n") == "E.  [... printed 4 times in a row]\n"   # two threads, one line
    once = collapse_repeats("x\n" + "E.\n" * 5 + "y\n")
    assert collapse_repeats(once) == once                          # idempotent


def test_stderr_dropped_and_consecutive_stdout_merged():
    out = [nbformat.v4.new_output("stream", name="stdout", text="x\n"),
           nbformat.v4.new_output("stream", name="stderr", text="10%|#\n"),
           nbformat.v4.new_output("stream", name="stdout", text="x\ny\n"),
           nbformat.v4.new_output("display_data", data={"text/plain": "fig"})]
    kept, removed = tidy_outputs(out)
    assert removed == 1
    assert [o.output_type for o in kept] == ["stream", "display_data"]
    assert kept[0].text == "x  [... printed 2 times in a row]\ny\n"
