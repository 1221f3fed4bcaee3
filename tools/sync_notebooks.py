"""Keep what every chapter notebook repeats in step with the one place it is stated.

The repository URL lives in ``_config.yml`` (``repository.url``, which also drives Jupyter Book's
Colab/Binder launch buttons); the distribution name in ``pyproject.toml``. From them this script
writes, in every notebook:

- the first code cell, the Colab install cell: ``pip install "<dist>[<extras>] @ git+<url>"``, the
  extras each chapter needs (notebook metadata ``adlib.extras``); ``ADLIB_INSTALL`` overrides what is
  installed (a wheel, a local path: how ``tests/test_colab.py`` runs it without the network);
- the metadata that asks Colab for a GPU runtime (``accelerator: GPU``);
- the run-time line under the title, from the metadata ``adlib.minutes_cpu`` / ``adlib.minutes_gpu``
  (and ``adlib.contended_minutes``: a stored CPU run that shared its cores and took that long, while
  ``minutes_cpu`` is the chapter's time on a quiet CPU);

and in ``book/intro.md``, between ``<!-- runtimes:start -->`` and ``<!-- runtimes:end -->``, the table of
every chapter's run time from the same metadata, so the introduction cannot disagree with the chapters.

``python tools/sync_notebooks.py`` rewrites the notebooks; ``--check`` only reports (the tests run it).
Outputs are never touched: the cells it writes produce no output outside Colab.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
RUNTIME_PREFIX = "**Run time.**"


def repository_url() -> str:
    """``repository.url`` of ``_config.yml`` (read without a YAML dependency: one key, one line)."""
    text = (ROOT / "_config.yml").read_text()
    block = re.search(r"^repository:\n((?:[ \t]+.*\n)+)", text, re.M)
    url = re.search(r"^\s+url:\s*(\S+)", block.group(1), re.M) if block else None
    if not url:
        raise SystemExit("_config.yml has no repository.url")
    return url.group(1).strip("\"'")


def distribution_name() -> str:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["name"]


def install_cell(url: str, dist: str, extras: list[str]) -> str:
    spec = f"{dist}[{','.join(extras)}] @ git+{url}" if extras else f"{dist} @ git+{url}"
    return f'''# In Colab: install this book's library (import name `adlib`) from its repository, with what this
# chapter needs; anywhere else this cell does nothing (see Setup). Written by tools/sync_notebooks.py.
import os, subprocess, sys
try:
    import google.colab  # noqa: F401 (exists only in Colab)
    IN_COLAB = True
except ImportError:
    IN_COLAB = False
if IN_COLAB:
    package = os.environ.get("ADLIB_INSTALL", "{spec}")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", package], check=True)'''


def stored_run_minutes(nb: dict) -> float | None:
    """How long the stored run took: from the first cell's start to the last cell's end, read from the
    execution timestamps that ``jupyter execute`` records in the cells' metadata (None without them)."""
    from datetime import datetime

    def parse(stamp: str) -> datetime:   # "2026-12-07T10:00:00.123456Z"; fromisoformat of Python 3.10 wants 6 digits
        day, _, fraction = stamp.rstrip("Z").partition(".")
        return datetime.strptime(f"{day}.{(fraction or '0')[:6]:0<6}", "%Y-%m-%dT%H:%M:%S.%f")

    stamps = [parse(cell["metadata"]["execution"][key])
              for cell in nb["cells"] if "execution" in cell.get("metadata", {})
              for key in ("iopub.execute_input", "iopub.status.idle") if key in cell["metadata"]["execution"]]
    return (max(stamps) - min(stamps)).total_seconds() / 60 if stamps else None


def runtime_line(meta: dict) -> str:
    cpu, gpu = meta.get("minutes_cpu"), meta.get("minutes_gpu")
    parts = []
    if cpu is not None and meta.get("contended_minutes") is not None:
        parts.append(f"about {cpu} min on a quiet 2-core CPU (the stored run shared its cores with other "
                     f"jobs and took {meta['contended_minutes']} min)")
    elif cpu is not None:
        parts.append(f"about {cpu} min on a 2-core CPU")
    if gpu is not None:
        parts.append(f"about {gpu} min on one GPU ({meta.get('gpu_name', 'an NVIDIA H200')})")
    if not parts:
        return ""
    gpu_note = "" if gpu is not None else " Its GPU run time is not measured yet."
    return (f"{RUNTIME_PREFIX} The whole chapter, as stored here: {' and '.join(parts)}.{gpu_note} "
            f"In Colab, pick *Runtime > Change runtime type > GPU* (the notebook asks for one).")


def _source(text: str) -> list[str]:
    lines = text.split("\n")
    return [line + "\n" for line in lines[:-1]] + [lines[-1]]


def sync(path: Path, url: str, dist: str) -> list[str]:
    """Bring one notebook in step; return what changed (empty: already in step)."""
    nb = json.loads(path.read_text())
    meta = nb["metadata"].setdefault("adlib", {})
    meta.setdefault("extras", ["notebooks"])
    changes = []
    if nb["metadata"].get("accelerator") != "GPU":
        nb["metadata"]["accelerator"] = "GPU"
        changes.append("accelerator")
    colab = nb["metadata"].setdefault("colab", {})
    if colab.get("gpuType") != "T4":
        colab["gpuType"] = "T4"
        changes.append("colab.gpuType")
    code = next(c for c in nb["cells"] if c["cell_type"] == "code")
    want = install_cell(url, dist, meta["extras"])
    if "".join(code["source"]) != want:
        code["source"] = _source(want)
        changes.append("install cell")
    title = nb["cells"][0]
    text = "".join(title["source"])
    lines = [line for line in text.split("\n") if not line.startswith("[![Open In Colab]")]
    lines = [line for line in lines if not line.startswith(RUNTIME_PREFIX)]
    while lines and not lines[0].strip():
        lines.pop(0)
    runtime = runtime_line(meta)
    if runtime:
        heading = next(i for i, line in enumerate(lines) if line.startswith("# "))
        lines[heading + 1:heading + 1] = ["", runtime]
        while len(lines) > heading + 4 and lines[heading + 3] == "" and lines[heading + 4] == "":
            del lines[heading + 3]
    new = "\n".join(lines)
    if new != text:
        title["source"] = _source(new)
        changes.append("title cell")
    if changes:
        path.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n")
    return changes


INTRO = ROOT / "book" / "intro.md"
RUNTIMES_START, RUNTIMES_END = "<!-- runtimes:start -->", "<!-- runtimes:end -->"


def _minutes(value) -> str:
    return "not measured yet" if value is None else f"{value:g} min"


def runtime_table(notebooks: list[Path]) -> str:
    """Markdown table: each chapter's title and its stored run time on the CPU and on a GPU."""
    lines = ["| chapter | 2-core CPU | one GPU |", "|---|---|---|"]
    for path in notebooks:
        nb = json.loads(path.read_text())
        meta = nb["metadata"].get("adlib", {})
        title = next(line[2:].strip() for line in "".join(nb["cells"][0]["source"]).split("\n") if line.startswith("# "))
        lines.append(f"| [{title}](../notebooks/{path.name}) | {_minutes(meta.get('minutes_cpu'))} | "
                     f"{_minutes(meta.get('minutes_gpu'))} |")
    return "\n".join(lines)


def sync_intro(check: bool) -> bool:
    """Write (or with ``check`` only compare) the run-time table of ``book/intro.md``; True if in step."""
    text = INTRO.read_text()
    start, end = text.index(RUNTIMES_START) + len(RUNTIMES_START), text.index(RUNTIMES_END)
    new = text[:start] + "\n" + runtime_table(NOTEBOOKS) + "\n" + text[end:]
    if new == text:
        return True
    if not check:
        INTRO.write_text(new)
        print("book/intro.md: run-time table")
    return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="report notebooks out of step; change nothing")
    args = parser.parse_args(argv)
    url, dist = repository_url(), distribution_name()
    stale = []
    for path in NOTEBOOKS:
        if args.check:
            before = path.read_text()
            changes = sync(path, url, dist)
            if changes:
                path.write_text(before)
                stale.append(f"{path.name}: {', '.join(changes)}")
        else:
            changes = sync(path, url, dist)
            if changes:
                print(f"{path.name}: {', '.join(changes)}")
    if not sync_intro(args.check):
        if args.check:
            stale.append("book/intro.md: run-time table")
    if stale:
        print("out of step with _config.yml / pyproject.toml (run python tools/sync_notebooks.py):\n  "
              + "\n  ".join(stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
