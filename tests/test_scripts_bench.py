"""benchmarks/bench.py: case loading, context generation, failure isolation and the report."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

_PATH = Path(__file__).resolve().parent.parent / "benchmarks" / "bench.py"


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("ociworker_bench", _PATH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    # dataclasses resolves annotations through sys.modules while the class body runs.
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


bench = _load()


def test_generate_context_is_exact_and_reproducible(tmp_path: Path) -> None:
    bench.generate_context(tmp_path / "a", dirs=3, files_per_dir=4, total_bytes=50_000)
    bench.generate_context(tmp_path / "b", dirs=3, files_per_dir=4, total_bytes=50_000)
    files = sorted(p for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert len(files) == 12
    assert sum(p.stat().st_size for p in files) == 50_000
    assert len({p.stat().st_size for p in files}) > 1
    for p in files:
        assert (tmp_path / "b" / p.relative_to(tmp_path / "a")).read_bytes() == p.read_bytes()


def test_load_cases(tmp_path: Path) -> None:
    (tmp_path / "steps").mkdir()
    (tmp_path / "steps" / "Dockerfile").write_text("FROM x\n")
    (case,) = bench.load_cases(tmp_path, ["steps"], tmp_path / "work")
    assert case.context == tmp_path / "steps"
    assert case.phases == ("cold", "warm")
    with pytest.raises(SystemExit, match="fanout"):
        bench.load_cases(tmp_path, ["fanout"], tmp_path / "work")


class _Tool:
    """A tool that records calls and fails the builds it is told to."""

    def __init__(self, name: str, fail_phase: str | None = None) -> None:
        self.name = name
        self.fail_phase = fail_phase
        self.calls: list[str] = []

    def start(self) -> None:
        self.calls.append("start")

    def reset(self, case: object) -> None:
        self.calls.append("reset")

    def build(self, case: object, log: Path) -> None:
        self.calls.append(f"build:{log.name}")
        if self.fail_phase and self.fail_phase in log.name:
            raise bench.ToolError("boom")

    def stop(self) -> None:
        self.calls.append("stop")


def test_run_case_orders_phases_and_isolates_failures(tmp_path: Path) -> None:
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "d00").mkdir()
    case = bench.Case("context", tmp_path / "Dockerfile", ctx, ("cold", "warm", "incremental"))
    tool = _Tool("t", fail_phase="warm")
    results = bench.run_case(tool, case, tmp_path, 0, iter(range(7, 100)))
    assert tool.calls == [
        "reset",
        "build:t-context-cold-0.log",
        "build:t-context-warm-0.log",
        "build:t-context-incremental-0.log",
    ]
    assert [(r.phase, r.seconds is None) for r in results] == [
        ("cold", False),
        ("warm", True),
        ("incremental", False),
    ]
    assert results[1].error == "boom"
    assert (ctx / "d00" / "changed.txt").read_text() == "generation 7\n"


class _CacheTool(_Tool):
    def export_cache(self, case: object, log: Path) -> None:
        self.calls.append(f"export:{log.name}")

    def build_from_cache(self, case: object, log: Path) -> None:
        self.calls.append(f"import:{log.name}")


def test_import_phase_exports_untimed_then_resets_then_imports(tmp_path: Path) -> None:
    (tmp_path / "steps").mkdir()
    (tmp_path / "steps" / "Dockerfile").write_text("FROM x\n")
    (case,) = bench.load_cases(tmp_path, ["steps"], tmp_path / "w", registry_cache=True)
    assert case.phases == ("cold", "warm", "import")
    tool, plain = _CacheTool("c"), _Tool("p")
    results = bench.run_case(tool, case, tmp_path, 0, iter(range(1, 9)))
    assert tool.calls == [
        "reset",
        "build:c-steps-cold-0.log",
        "build:c-steps-warm-0.log",
        "export:c-steps-import-0.export.log",
        "reset",
        "import:c-steps-import-0.log",
    ]
    assert [r.phase for r in results] == ["cold", "warm", "import"]
    # a tool without a registry cache is not measured in that phase (no FAILED cell)
    assert [r.phase for r in bench.run_case(plain, case, tmp_path, 0, iter(range(9)))] == [
        "cold",
        "warm",
    ]


def test_table_medians_ratios_and_failures() -> None:
    R = bench.Result
    results = [
        R("ociworker", "steps", "cold", 2.0),
        R("ociworker", "steps", "cold", 4.0),
        R("ociworker", "steps", "cold", 9.0),
        R("buildkit", "steps", "cold", 2.0),
        R("buildah", "steps", "cold", None, "broke"),
        R("ociworker", "steps", "warm", 1.0),
        R("buildkit", "steps", "warm", 0.5),
    ]
    table = bench.format_table(results, ["ociworker", "buildkit", "buildah"]).splitlines()
    assert table[0].split() == [
        "case",
        "phase",
        "ociworker",
        "buildkit",
        "buildah",
        "ociworker/buildkit",
        "ociworker/buildah",
    ]
    assert table[2].split() == ["steps", "cold", "4.00", "2.00", "FAILED", "2.00x", "-"]
    assert table[3].split() == ["steps", "warm", "1.00", "0.50", "-", "2.00x", "-"]


def test_parse_list_rejects_unknown() -> None:
    assert bench.parse_list("steps, context", bench.ALL_CASES) == ["steps", "context"]
    with pytest.raises(argparse.ArgumentTypeError, match="choose from"):
        bench.parse_list("steps,nope", bench.ALL_CASES)
