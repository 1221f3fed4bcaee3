"""Check that the numbers the prose quotes are the numbers the stored outputs show.

``python tools/check_quoted_numbers.py [NOTEBOOK_OR_PAGE ...]`` (default: every ``notebooks/*.ipynb`` and
the pages of :data:`PAGES`) reports, per notebook and markdown cell, every quoted number that no stored
output of that notebook backs (for a page: see :func:`check_page`), and exits 1 if there is one;
``tests/test_quoted_numbers.py`` runs the same check.

**Which numbers are checked.** In the prose of a markdown cell (fenced code, inline code, link
targets, URLs, HTML comments and the tool-written ``**Run time.**`` line are not prose; the content of
MyST directives such as ``{dropdown}`` or ``{admonition}`` is):

- every number with two or more decimals (``0.981``, ``0.18``, ``+0.005``), and
- every number with one decimal followed by a unit of time, size, share or ratio (``105.6 s``,
  ``9.4 s``, ``12.4 MB``, ``0.5%``, ``1.4x``, ``5.4 times``); a range shares the unit of its last end
  (``2.3-2.9x`` checks 2.3 and 2.9).

Integers, one-decimal numbers without a unit and numbers in scientific notation (``1e-6``) are not
checked; thousands separators are read (``6,400`` is 6400).

**When a number is backed.** Some number in the notebook's stored outputs (stream text, ``text/plain``,
``text/html`` tables, ``text/markdown``) rounds to it at the quoted number of decimals: ``0.18`` is
backed by ``0.177``, ``1.000`` by ``1.0``. Signs are ignored (a quoted difference ``+0.005`` or an output
``-0.0099`` compare by size). A percentage is also backed by a fraction (``84.4%`` by ``0.844``), and
gigabytes by megabytes (``4.5 GB`` by ``4538.9``, the outputs' ``peak_mem_mb``).

**Numbers that are not from the outputs** are marked in the same markdown cell with an HTML comment
(invisible in the book), one per kind::

    <!-- cited: 80.72 28.25 11.49 the paper's Table I (MVTec AD mean) -->
    <!-- derived: 0.6 6,400 / 10^6 -->
    <!-- figure: 1.00 0.41 titles of the figure above -->

``cited``: from outside this notebook's outputs: a paper's result, a constant, a hyper-parameter or
a setting (``0.485``, ``beta = 0.03``), or a measurement stored elsewhere (another chapter,
``bench_results/``, a profiling run); ``derived``: arithmetic on numbers of the outputs; ``figure``:
read off a stored figure, which has no text to check. The numbers come first, written exactly as in the prose; the first word that is not a
number starts a free comment. A marked number that the cell does not quote is reported as a stale
marker, so the marks cannot outlive the prose they excuse.
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
RUNTIME_PREFIX = "**Run time.**"
MARKER_KINDS = ("cited", "derived", "figure")

_MARKER = re.compile(r"<!--\s*(" + "|".join(MARKER_KINDS) + r")\s*:(.*?)-->", re.S)
_COMMENT = re.compile(r"<!--.*?-->", re.S)
_FENCE = re.compile(r"^\s*(`{3,}|~{3,}|:{3,})(.*)$")
_INLINE_CODE = re.compile(r"(`+)(?:(?!\1).)+?\1", re.S)
_LINK_TARGET = re.compile(r"\]\([^)]*\)")
_URL = re.compile(r"https?://\S+")
# A number: digits with optional thousands separators, optional decimals, optional exponent. Not part
# of a word (but 1.4x is) or of a longer dotted token (a version such as 2.14.1 is skipped as a whole).
_NUMBER = re.compile(r"(?<![\w.])(\d{1,3}(?:,\d{3})+|\d+)(?:\.(\d+))?([eE][+\-−]?\d+)?"
                     r"(?=x(?![\w])|[^\w]|$)(?!\.\d)")  # 1.4x is a number with a unit; 3x3 and T4 are not
_UNIT = re.compile(r"\s?\\?(?:%|x(?![a-zA-Z])|×|times\b|ms\b|s\b|min\b|minutes\b|MB\b|GB\b|GFLOP/s)")
_RANGE = re.compile(r"\s*(?:-|–|to)\s*\+?")
_OUTPUT_NUMBER = re.compile(r"(?<![\w.])\d+(?:,\d{3})*(?:\.\d+)?(?:[eE][+\-]?\d+)?")


@dataclass(frozen=True)
class Quoted:
    """One number quoted in the prose: its text, value, decimals and whether a unit follows."""

    text: str
    value: float
    decimals: int
    unit: str
    context: str

    @property
    def checked(self) -> bool:
        return self.decimals >= 2 or (self.decimals == 1 and bool(self.unit))


@dataclass(frozen=True)
class Problem:
    notebook: str
    cell: int
    number: str
    message: str
    part: str = "markdown cell"     # pages: "part" (the text after the cell-th <!-- from: --> marker)

    def __str__(self) -> str:
        return f"{self.notebook}: {self.part} {self.cell}: {self.number}: {self.message}"


def prose(markdown: str) -> str:
    """The prose of a markdown cell: without code, comments, link targets, URLs and the run-time line."""
    text = _COMMENT.sub(" ", markdown)
    kept: list[str] = []
    directives: list[str] = []  # open directive fences (```{dropdown}, :::{admonition}): their content is prose
    code = None  # the open fence of a code block, whose content is skipped
    for line in text.split("\n"):
        match = _FENCE.match(line)
        fence, info = (match.group(1), match.group(2).strip()) if match else ("", "")
        if code is not None:
            if match and fence[0] == code[0] and len(fence) >= len(code) and not info:
                code = None
            continue
        if match and not info and directives and fence[0] == directives[-1][0] \
                and len(fence) >= len(directives[-1]):
            directives.pop()
        elif match and (info.startswith("{") or fence[0] == ":"):
            directives.append(fence)
        elif match:
            code = fence
        elif line.lstrip().startswith(RUNTIME_PREFIX) or re.match(r"^\s*:[\w-]+:", line):
            pass  # the tool-written run-time line; a directive option such as :class: dropdown
        else:
            kept.append(line)
            continue
        kept.append("")
    text = "\n".join(kept)
    text = _INLINE_CODE.sub(" ", text)
    text = _LINK_TARGET.sub("]", text)
    return _URL.sub(" ", text)


def quoted_numbers(markdown: str) -> list[Quoted]:
    """Every number of the prose, with its unit (a range's numbers share the unit of its last end)."""
    text = prose(markdown)
    matches = [m for m in _NUMBER.finditer(text) if not m.group(3)]
    units: list[str] = [""] * len(matches)
    for i in range(len(matches) - 1, -1, -1):
        m = matches[i]
        after = text[m.end():]
        unit = _UNIT.match(after)
        if unit:
            units[i] = unit.group(0).strip().lstrip("\\")
        elif i + 1 < len(matches) and _RANGE.fullmatch(text[m.end():matches[i + 1].start()]):
            units[i] = units[i + 1]
    out = []
    for m, unit in zip(matches, units):
        whole, decimals = m.group(1).replace(",", ""), m.group(2) or ""
        value = float(f"{whole}.{decimals}" if decimals else whole)
        start, end = max(0, m.start() - 30), min(len(text), m.end() + 30)
        context = " ".join(text[start:end].split())
        out.append(Quoted(m.group(0), value, len(decimals), unit, context))
    return out


def markers(markdown: str) -> dict[str, str]:
    """Numbers marked as not from the outputs: ``{number text: kind}``."""
    marked = {}
    for kind, body in _MARKER.findall(markdown):
        for token in body.split():
            token = token.rstrip(",;")
            if not re.fullmatch(r"[+\-−]?\d[\d,]*(?:\.\d+)?", token):
                break
            marked[token.lstrip("+-−").replace(",", "")] = kind
    return marked


def _output_texts(cell: dict) -> list[str]:
    texts = []
    for output in cell.get("outputs", []):
        if output.get("output_type") == "stream":
            texts.append("".join(output.get("text", "")))
        for mime in ("text/plain", "text/html", "text/markdown", "text/latex"):
            data = output.get("data", {}).get(mime)
            if data is not None:
                texts.append(data if isinstance(data, str) else "".join(data))
        if output.get("output_type") == "error":
            texts.append(" ".join(output.get("traceback", [])))
    return texts


def output_numbers(nb: dict) -> list[float]:
    """Every number in the notebook's stored outputs (sizes: signs are dropped)."""
    values = set()
    for cell in nb["cells"]:
        if cell["cell_type"] != "code":
            continue
        for text in _output_texts(cell):
            for token in _OUTPUT_NUMBER.findall(text):
                try:
                    values.add(abs(float(token.replace(",", ""))))
                except ValueError:
                    pass
    return sorted(values)


def backed(q: Quoted, values: list[float]) -> bool:
    """Whether some output value rounds to ``q`` at its decimals (also: a percentage as a fraction of 1,
    gigabytes as megabytes)."""
    half = 0.5 * 10 ** -q.decimals * (1 + 1e-9) + 1e-12
    scales = {"%": (1, 100), "GB": (1, 1 / 1000, 1 / 1024)}.get(q.unit, (1,))
    return any(abs(v * scale - q.value) <= half for scale in scales for v in values)


def check_notebook(path: str | Path) -> list[Problem]:
    """Every quoted number of one notebook that its outputs do not back and no marker excuses."""
    path = Path(path)
    nb = json.loads(path.read_text())
    values = output_numbers(nb)
    problems = []
    for index, cell in enumerate(nb["cells"]):
        if cell["cell_type"] != "markdown":
            continue
        source = "".join(cell["source"])
        marked = markers(source)
        quoted = quoted_numbers(source)
        for q in quoted:
            key = q.text.replace(",", "")
            if key in marked or not q.checked or backed(q, values):
                continue
            problems.append(Problem(path.name, index, q.text,
                                    f"not in the stored outputs (\"...{q.context}...\"); fix the prose, or mark it "
                                    f"<!-- cited: {q.text} --> if it is not a result of this notebook"))
        present = {q.text.replace(",", "") for q in quoted}
        for number, kind in marked.items():
            if number not in present:
                problems.append(Problem(path.name, index, number,
                                        f"stale marker <!-- {kind}: {number} -->: the cell does not quote it"))
    return problems


# --- pages: the README and the book's markdown pages quote the notebooks' numbers too ------------------

PAGES = [ROOT / "README.md", ROOT / "book" / "intro.md", ROOT / "book" / "syllabus.md"]
_FROM = re.compile(r"<!--\s*from\s*:(.*?)-->", re.S)
_RUNTIMES = re.compile(r"<!-- runtimes:start -->.*?<!-- runtimes:end -->", re.S)  # written by sync_notebooks
_TIME_UNITS = ("ms", "s", "min", "minutes")


@dataclass(frozen=True)
class Sources:
    """What a part of a page may quote: every number of its sources (``values``), the measured numbers
    among them, those written with decimals (``measured``: not a row index or a count), and the
    chapters' run times in minutes (``minutes``, their metadata)."""

    values: list[float]
    measured: list[float]
    minutes: list[float]


def source_values(names: list[str]) -> Sources:
    """The numbers a page may quote from ``names``: notebooks (``05_centering``: stored outputs and run-time
    metadata) or files of the repository (``bench_results/methods.csv``: every number)."""
    texts, minutes = [], []
    for name in names:
        notebook = ROOT / "notebooks" / f"{name}.ipynb"
        path = ROOT / name
        if notebook.is_file():
            nb = json.loads(notebook.read_text())
            meta = nb["metadata"].get("adlib", {})
            minutes += [float(meta[k]) for k in ("minutes_cpu", "minutes_gpu", "contended_minutes") if k in meta]
            texts += [t for cell in nb["cells"] if cell["cell_type"] == "code" for t in _output_texts(cell)]
        elif path.is_file():
            texts.append(path.read_text())
        else:
            raise ValueError(f"<!-- from: {name} -->: no notebook notebooks/{name}.ipynb and no file {name}")
    tokens = [t for text in texts for t in _OUTPUT_NUMBER.findall(text)]
    values = sorted({abs(float(t.replace(",", ""))) for t in tokens})
    measured = sorted({abs(float(t.replace(",", ""))) for t in tokens if "." in t})
    return Sources(values, measured, sorted(set(minutes)))


def page_checked(q: Quoted) -> bool:
    """On a page, whole numbers of time are checked too (``26 min``, ``98 s``): run times and fit times."""
    return q.checked or (q.decimals == 0 and q.unit in _TIME_UNITS)


def page_backed(q: Quoted, sources: Sources) -> bool:
    """A whole number of minutes must be a chapter's run time; a whole number of seconds or milliseconds
    a measured value (one with decimals) rounded; every other number as :func:`backed` says."""
    if q.decimals == 0 and q.unit in ("min", "minutes"):
        return any(abs(m - q.value) < 1e-9 for m in sources.minutes)
    if q.decimals == 0 and q.unit in _TIME_UNITS:
        return backed(q, sources.measured)
    return backed(q, sources.values)


def check_page(path: str | Path) -> list[Problem]:
    """Every checked number of a markdown page that its sources do not back and no marker excuses.

    A page names its sources with ``<!-- from: 05_centering 08_choosing_a_method -->``: the numbers
    after the marker, up to the next one, are checked against those notebooks' stored outputs and
    run-time metadata (or a repository file, such as ``bench_results/methods.csv``); whole numbers of
    minutes only against the chapters' run times (see :func:`page_backed`). Numbers before
    the first marker have no source, so each must be marked ``cited`` or ``derived``. The intro's
    run-time table is written from the metadata by ``tools/sync_notebooks.py`` and skipped here."""
    path = Path(path)
    text = _RUNTIMES.sub(" ", path.read_text())
    pieces = _FROM.split(text)      # text, sources, text, sources, text ...
    parts = [("", pieces[0])] + [(pieces[i], pieces[i + 1]) for i in range(1, len(pieces), 2)]
    problems = []
    for index, (sources, part) in enumerate(parts):
        names = [name for name in re.split(r"[\s,]+", sources) if name]
        found = source_values(names)
        marked = markers(part)
        quoted = quoted_numbers(part)
        for q in quoted:
            key = q.text.replace(",", "")
            if key in marked or not page_checked(q) or page_backed(q, found):
                continue
            where = f"the outputs of {', '.join(names)}" if names else "no source: name one with <!-- from: NN_name -->"
            problems.append(Problem(path.name, index, q.text, f"not backed by {where} (\"...{q.context}...\"); "
                                    f"fix the text, or mark it <!-- cited: {q.text} -->", part="part"))
        present = {q.text.replace(",", "") for q in quoted}
        for number, kind in marked.items():
            if number not in present:
                problems.append(Problem(path.name, index, number,
                                        f"stale marker <!-- {kind}: {number} -->: the part does not quote it", part="part"))
    return problems


def main(argv: list[str] | None = None) -> int:
    paths = [Path(p) for p in (argv if argv is not None else sys.argv[1:])] or NOTEBOOKS + PAGES
    problems = [p for path in paths for p in (check_page(path) if path.suffix == ".md" else check_notebook(path))]
    for problem in problems:
        print(problem)
    checked = sum(1 for path in paths if path.suffix == ".ipynb" for cell in json.loads(Path(path).read_text())["cells"]
                  if cell["cell_type"] == "markdown" for q in quoted_numbers("".join(cell["source"])) if q.checked)
    checked += sum(1 for path in paths if path.suffix == ".md"
                   for q in quoted_numbers(_RUNTIMES.sub(" ", Path(path).read_text())) if page_checked(q))
    print(f"{len(paths)} files, {checked} quoted numbers checked, {len(problems)} problems", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
