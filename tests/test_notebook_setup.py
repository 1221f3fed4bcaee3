"""Every chapter runs on another category: a ``CATEGORY`` variable in its setup cell picks the data,
and its key checks, bars meant for the book's bottle run, sit under a guard that names the category.

Checked on the notebooks' code, statically: running a chapter on a second real category would need
that category's data, which CI does not have.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from adlib.settings import BOOK_CATEGORY, is_book_run

ROOT = Path(__file__).resolve().parents[1]
# 08 compares several data sets (its DATA list); 90 measures kernels on generated tensors
CHAPTERS = [p for p in sorted((ROOT / "notebooks").glob("*.ipynb")) if p.stem[:2] not in ("08", "90")]


def _code_cells(path: Path) -> list[str]:
    cells = json.loads(path.read_text())["cells"]
    return ["".join(c["source"]) for c in cells if c["cell_type"] == "code"]


def _is_guard(test: ast.expr) -> bool:
    """``BOOK_RUN``, ``CATEGORY == ...``, or an ``and`` of conditions one of which is such a guard."""
    if isinstance(test, ast.Name):
        return test.id == "BOOK_RUN"
    if isinstance(test, ast.Compare):
        return (isinstance(test.left, ast.Name) and test.left.id == "CATEGORY"
                and len(test.ops) == 1 and isinstance(test.ops[0], ast.Eq))
    if isinstance(test, ast.BoolOp) and isinstance(test.op, ast.And):
        return any(_is_guard(value) for value in test.values)
    return False


def _guarded_asserts(tree: ast.AST) -> list[tuple[int, bool]]:
    """(line, guarded) for every assert: guarded when an enclosing ``if`` is a guard (:func:`_is_guard`),
    in its body, not its ``else``."""
    found: list[tuple[int, bool]] = []

    def visit(node: ast.AST, guarded: bool) -> None:
        if isinstance(node, ast.Assert):
            found.append((node.lineno, guarded))
        if isinstance(node, ast.If):
            for child in node.body:
                visit(child, guarded or _is_guard(node.test))
            for child in node.orelse:
                visit(child, guarded)
            return
        for child in ast.iter_child_nodes(node):
            visit(child, guarded)

    visit(tree, False)
    return found


def test_every_chapter_is_covered():
    assert len(CHAPTERS) >= 9


@pytest.mark.parametrize("notebook", CHAPTERS, ids=[p.stem for p in CHAPTERS])
def test_chapter_takes_a_category(notebook):
    setup = _code_cells(notebook)[1]          # the first code cell is the Colab install cell
    tree = ast.parse(setup)
    assigned = [n for n in tree.body if isinstance(n, ast.Assign) and any(
        isinstance(t, ast.Name) and t.id == "CATEGORY" for t in n.targets)]
    assert assigned, "the setup cell assigns no CATEGORY"
    assert ast.literal_eval(assigned[0].value) == BOOK_CATEGORY     # the stored run is the book's category
    book_run = [ast.unparse(n.value) for n in tree.body if isinstance(n, ast.Assign) and any(
        isinstance(t, ast.Name) and t.id == "BOOK_RUN" for t in n.targets)]
    assert book_run == ["is_book_run(choice)"], f"the setup cell must set BOOK_RUN = is_book_run(choice), got {book_run}"
    calls = [n for cell in _code_cells(notebook) for n in ast.walk(ast.parse(cell))
             if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "choose_data"]
    assert calls, "the chapter never calls choose_data"
    for call in calls:
        assert isinstance(call.args[0], ast.Name) and call.args[0].id == "CATEGORY", (
            f"choose_data({ast.unparse(call.args[0])}) on line {call.lineno}: pass CATEGORY, not a literal")


@pytest.mark.parametrize("notebook", CHAPTERS, ids=[p.stem for p in CHAPTERS])
def test_key_checks_are_guarded_by_the_category(notebook):
    for index, source in enumerate(_code_cells(notebook)):
        for line, guarded in _guarded_asserts(ast.parse(source)):
            assert guarded, (f"code cell {index}, line {line}: an assert outside `if BOOK_RUN:` (or a test of "
                             f"CATEGORY) fails on another category")


def test_the_guard_finds_unguarded_asserts():
    code = ("if BOOK_RUN:\n    assert a\nassert b\nif x:\n    assert c\nif CATEGORY == 'bottle' and y:\n    assert d\n"
            "if not BOOK_RUN:\n    assert e\nif CATEGORY != 'bottle':\n    assert f\nif BOOK_RUN:\n    pass\nelse:\n"
            "    assert g\nif BOOK_RUN or x:\n    assert h\n")
    assert _guarded_asserts(ast.parse(code)) == [(2, True), (3, False), (5, False), (7, True), (9, False),
                                                 (11, False), (15, False), (17, False)]


@pytest.mark.parametrize("real, category, small, expected", [
    (True, "bottle", False, True), (True, "wood", False, False), (False, "synthetic", False, False),
    (True, "bottle", True, False)])
def test_is_book_run(monkeypatch, real, category, small, expected):
    from types import SimpleNamespace

    monkeypatch.setenv("ADLIB_SMALL", "1" if small else "0")
    assert is_book_run(SimpleNamespace(real=real, category=category)) is expected
