"""The one layout rule of docs/architecture.md: arrows point down.

``core`` and ``frontend`` are pure (no asyncio, os, subprocess, grpc); the
solver reaches IO only through Protocols; only ``api`` imports grpc.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "src" / "ociworker"

PURE_FORBIDDEN = {"asyncio", "os", "subprocess", "grpc", "socket", "shutil", "aiofiles"}
SHELLS = {
    "executor",
    "snapshot",
    "diff",
    "content",
    "sources",
    "exporter",
    "registry",
    "worker",
    "controller",
    "cli",
    "api",
}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def _modules(sub: str) -> list[Path]:
    return sorted((PKG / sub).rglob("*.py"))


@pytest.mark.parametrize("layer", ["core", "frontend"])
def test_pure_layers_import_no_io(layer: str) -> None:
    bad = []
    for path in _modules(layer):
        for name in _imports(path):
            top = name.split(".")[0]
            if top in PURE_FORBIDDEN:
                bad.append(f"{path.relative_to(PKG)} imports {name}")
            if name.startswith("ociworker.") and name.split(".")[1] in SHELLS:
                bad.append(f"{path.relative_to(PKG)} imports IO shell {name}")
    assert bad == []


def test_solver_sees_shells_only_through_protocols() -> None:
    bad = []
    for path in _modules("solver"):
        for name in _imports(path):
            if name.startswith("ociworker.") and name.split(".")[1] in SHELLS:
                bad.append(f"{path.relative_to(PKG)} imports {name}")
    assert bad == []


def test_only_api_imports_grpc() -> None:
    bad = []
    for path in PKG.rglob("*.py"):
        if "api" in path.relative_to(PKG).parts[:1]:
            continue
        if any(n.split(".")[0] == "grpc" for n in _imports(path)):
            bad.append(str(path.relative_to(PKG)))
    assert bad == []


def test_test_module_names_are_unique_across_suites() -> None:
    # pytest's default import mode keys modules by basename: a clash breaks collection.
    root = PKG.parents[1]
    unit = {p.name for p in (root / "tests").glob("test_*.py")}
    integ = {p.name for p in (root / "integration").glob("test_*.py")}
    assert unit & integ == set()
