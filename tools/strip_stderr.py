"""Drop the stderr streams (progress bars) from stored notebook outputs: ``python tools/strip_stderr.py NB...``.

The book hides stderr anyway (``_config.yml``); stripping it keeps the stored notebooks small and
their diffs readable. Figures, tables and printed results (stdout) stay.
"""

from __future__ import annotations

import sys

import nbformat


def strip(path: str) -> int:
    """Remove stderr stream outputs from the notebook at ``path``; returns how many were removed."""
    nb = nbformat.read(path, as_version=4)
    removed = 0
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        kept = [o for o in cell.outputs if not (o.output_type == "stream" and o.name == "stderr")]
        removed += len(cell.outputs) - len(kept)
        cell.outputs = kept
    nbformat.write(nb, path)
    return removed


if __name__ == "__main__":
    for notebook in sys.argv[1:]:
        print(f"{notebook}: removed {strip(notebook)} stderr outputs")
