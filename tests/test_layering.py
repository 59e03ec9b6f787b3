"""docs/architecture.md's layer table, enforced: arrows point down.

The table between the ``layer-table`` markers names every part of the package
(a top-level module or subpackage of ``ociworker``), which parts it may import,
and what it must never import (stdlib modules, ``module.Name`` for one name, or
``ociworker.x.y`` for a submodule). Parts marked ``pure`` also open no file.
A new package that is not in the table fails here until it is placed.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "src" / "ociworker"
DOC = ROOT / "docs" / "architecture.md"


@dataclass(frozen=True)
class Part:
    name: str
    pure: bool
    may_import: frozenset[str]
    never: tuple[str, ...]


def _cell_names(cell: str) -> list[str]:
    return [w.strip("`") for w in cell.replace(",", " ").split() if w.strip("`") not in ("", "-")]


def _table() -> dict[str, Part]:
    text = DOC.read_text()
    m = re.search(r"<!-- layer-table -->\n(.*?)<!-- /layer-table -->", text, re.S)
    assert m, "docs/architecture.md lost its <!-- layer-table --> block"
    parts: dict[str, Part] = {}
    for line in m.group(1).splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 4 or cells[0] in ("part", "") or set(cells[0]) <= {"-", ":"}:
            continue
        name = cells[0].strip("`")
        parts[name] = Part(
            name,
            cells[1] == "pure",
            frozenset(_cell_names(cells[2])),
            tuple(_cell_names(cells[3])),
        )
    return parts


TABLE = _table()


def _part_of(path: Path) -> str:
    return path.relative_to(PKG).parts[0].removesuffix(".py")


def _files() -> list[Path]:
    return sorted(p for p in PKG.rglob("*.py") if "v1" not in p.relative_to(PKG).parts)


@dataclass(frozen=True)
class Imported:
    module: str
    names: tuple[str, ...]
    line: int


def _imports(path: Path) -> list[Imported]:
    """Run-time imports: those under ``if TYPE_CHECKING:`` only name types."""
    tree = ast.parse(path.read_text(), str(path))
    typing_only: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and ast.unparse(node.test) in (
            "TYPE_CHECKING",
            "typing.TYPE_CHECKING",
        ):
            typing_only.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    out: list[Imported] = []
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            out.extend(Imported(a.name, (), node.lineno) for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append(Imported(node.module, tuple(a.name for a in node.names), node.lineno))
    return out


def _targets(imp: Imported) -> list[str]:
    """The ociworker parts an import reaches (``from ociworker import x`` reaches x)."""
    if imp.module == "ociworker":
        return [
            n if (PKG / n).is_dir() or (PKG / f"{n}.py").exists() else "__init__" for n in imp.names
        ]
    if imp.module.startswith("ociworker.api.v1.") and imp.module.endswith("_pb2"):
        return ["api.v1"]  # the generated message modules (protobuf only): see the table's notes
    if imp.module == "ociworker.api.v1" and all(n.endswith("_pb2") for n in imp.names):
        return ["api.v1"]
    if imp.module.startswith("ociworker."):
        return [imp.module.split(".")[1]]
    return []


def test_every_part_is_in_the_table() -> None:
    found = {_part_of(p) for p in _files()}
    assert sorted(found - TABLE.keys()) == [], "place these in docs/architecture.md's table"
    assert sorted(TABLE.keys() - found) == [], "the table names parts that do not exist"


def test_allowed_arrows_form_no_cycle() -> None:
    # arrows point down: the allowed imports must have a topological order
    remaining = {n: set(p.may_import) & TABLE.keys() for n, p in TABLE.items()}
    while remaining:
        leaves = [n for n, deps in remaining.items() if not deps - {n}]
        assert leaves, f"cycle among {sorted(remaining)}"
        for n in leaves:
            del remaining[n]
        for deps in remaining.values():
            deps.difference_update(leaves)


@pytest.mark.parametrize("part", sorted(TABLE))
def test_part_imports_only_what_the_table_allows(part: str) -> None:
    spec = TABLE[part]
    bad = []
    for path in _files():
        if _part_of(path) != part:
            continue
        rel = path.relative_to(PKG)
        for imp in _imports(path):
            for target in _targets(imp):
                if target != part and target not in spec.may_import:
                    bad.append(f"{rel}:{imp.line} imports ociworker.{target}")
            for never in spec.never:
                head, _, last = never.rpartition(".")
                if head and last[:1].isupper():  # module.Name: that one name
                    if imp.module == head and last in imp.names:
                        bad.append(f"{rel}:{imp.line} imports {never}")
                elif imp.module == never or imp.module.startswith(never + "."):
                    bad.append(f"{rel}:{imp.line} imports {imp.module}")
    assert bad == []


@pytest.mark.parametrize("part", sorted(n for n, p in TABLE.items() if p.pure))
def test_pure_parts_open_no_file(part: str) -> None:
    bad = []
    for path in _files():
        if _part_of(path) != part:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id == "open"
            ):
                bad.append(f"{path.relative_to(PKG)}:{node.lineno} calls open()")
    assert bad == []


def test_only_api_imports_grpc() -> None:
    bad = []
    for path in _files():
        if _part_of(path) == "api":
            continue
        if any(i.module.split(".")[0] == "grpc" for i in _imports(path)):
            bad.append(str(path.relative_to(PKG)))
    assert bad == []


def test_the_checks_see_a_forbidden_import(tmp_path: Path) -> None:
    # The test's own parser on a known-bad file: a check that cannot fail proves nothing.
    bad = tmp_path / "m.py"
    bad.write_text(
        "import os\nfrom pathlib import Path\nfrom ociworker import controller\n"
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import sqlite3\n"
    )
    found = _imports(bad)[:3]
    assert [i.module for i in _imports(bad)] == ["os", "pathlib", "ociworker", "typing"]
    assert _targets(found[2]) == ["controller"]
    assert "os" in TABLE["core"].never and "pathlib.Path" in TABLE["core"].never
    assert "controller" not in TABLE["core"].may_import


def test_test_module_names_are_unique_across_suites() -> None:
    # pytest's default import mode keys modules by basename: a clash breaks collection.
    unit = {p.name for p in (ROOT / "tests").glob("test_*.py")}
    integ = {p.name for p in (ROOT / "integration").glob("test_*.py")}
    assert unit & integ == set()
