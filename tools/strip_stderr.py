"""Tidy stored notebook outputs: ``python tools/strip_stderr.py NB...``.

- Drops the stderr streams (progress bars). The book hides stderr anyway (``_config.yml``);
  stripping it keeps the stored notebooks small and their diffs readable.
- Merges consecutive stdout streams of a cell and collapses a run of one repeated line (native
  libraries print straight to the process's stdout: one failed peer call in the benchmark printed
  the same MKL error line tens of thousands of times) into its first occurrence plus a count.

Figures, tables and printed results stay as they were printed.
"""

from __future__ import annotations

import re
import sys

import nbformat

_COUNT = re.compile(r"  \[\.\.\. printed ([\d,]+) times in a row\]$")


def collapse_repeats(text: str) -> str:
    """Each run of an identical non-empty line (blank lines between its copies, and copies run
    together on one line, included) -> the line once, with ``[... printed N times in a row]``."""
    out: list[str] = []
    last: str | None = None
    count = 0
    pending_blank = 0

    def close_run() -> None:
        if last is not None and count > 1:
            out[-1] = f"{out[-1]}  [... printed {count:,} times in a row]"

    for line in text.split("\n"):
        if line.strip() == "":
            pending_blank += 1
            continue
        counted = _COUNT.search(line)           # an already collapsed run (the tool runs again)
        times = int(counted.group(1).replace(",", "")) if counted else 1
        line = line[: counted.start()] if counted else line
        copies = _copies_of(line, last)
        if copies:
            count += copies * times
            pending_blank = 0
            continue
        close_run()
        out.extend([""] * pending_blank)
        pending_blank = 0
        out.append(line)
        last, count = line, times
    close_run()
    out.extend([""] * pending_blank)
    return "\n".join(out)


def _copies_of(line: str, unit: str | None) -> int:
    """How many copies of ``unit`` ``line`` is (0: none): two threads' writes of one message can
    land on one line."""
    if not unit or len(line) % len(unit):
        return 0
    k = len(line) // len(unit)
    return k if line == unit * k else 0


def tidy_outputs(outputs: list) -> tuple[list, int]:
    """``outputs`` without stderr streams, consecutive stdout streams merged and repeats collapsed;
    and how many stderr streams were removed."""
    kept: list = []
    removed = 0
    for output in outputs:
        if output.output_type == "stream" and output.name == "stderr":
            removed += 1
            continue
        if (output.output_type == "stream" and kept and kept[-1].output_type == "stream"
                and kept[-1].name == output.name):
            kept[-1].text += output.text
            continue
        kept.append(output)
    for output in kept:
        if output.output_type == "stream":
            output.text = collapse_repeats(output.text)
    return kept, removed


def strip(path: str) -> int:
    """Tidy the notebook at ``path`` in place; returns how many stderr outputs were removed."""
    nb = nbformat.read(path, as_version=4)
    removed = 0
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        cell.outputs, n = tidy_outputs(cell.outputs)
        removed += n
    nbformat.write(nb, path)
    return removed


if __name__ == "__main__":
    for notebook in sys.argv[1:]:
        print(f"{notebook}: removed {strip(notebook)} stderr outputs")
