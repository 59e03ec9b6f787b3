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
    (case,) = bench.load_cases([tmp_path], ["steps"], tmp_path / "work", base="reg/b:1")
    assert case.context == tmp_path / "steps"
    assert case.phases == ("cold", "warm")
    assert case.base == "reg/b:1"
    with pytest.raises(SystemExit, match="fanout"):
        bench.load_cases([tmp_path], ["fanout"], tmp_path / "work")


def test_load_cases_from_the_shared_dir_then_ours_with_their_own_base(tmp_path: Path) -> None:
    shared, own = tmp_path / "shared", tmp_path / "own"
    for d, name in ((shared, "steps"), (own, "steps"), (own, "debian")):
        (d / name).mkdir(parents=True)
        (d / name / "Dockerfile").write_text(f"FROM {d.name}\n")
    steps, debian = bench.load_cases(
        [shared, own], ["steps", "debian"], tmp_path / "w", base="b", bases={"debian": "deb"}
    )
    assert steps.dockerfile == shared / "steps" / "Dockerfile"  # the shared one wins
    assert (steps.base, debian.base) == ("b", "deb")
    assert debian.dockerfile == own / "debian" / "Dockerfile"
    assert debian.context == own / "debian"


def test_our_debian_case_is_loaded_from_the_repository(tmp_path: Path) -> None:
    (case,) = bench.load_cases(
        [tmp_path, bench.OWN_CASES_DIR], ["debian"], tmp_path / "w", base="b",
        bases={"debian": bench.DEFAULT_DEBIAN_BASE},
    )  # fmt: skip
    text = case.dockerfile.read_text()
    assert "ARG BASE" in text and "USER" in text and "COPY --from=" in text
    assert (case.context / "hello.c").is_file()  # what its COPY needs
    assert case.base == "127.0.0.1:5000/debian:bookworm"


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
    flush = lambda: tool.calls.append("sync")  # noqa: E731
    results = bench.run_case(tool, case, tmp_path, 0, iter(range(7, 100)), flush)
    # a sync before each timed build, after the reset (which writes too)
    assert tool.calls == [
        "reset",
        "sync",
        "build:t-context-cold-0.log",
        "sync",
        "build:t-context-warm-0.log",
        "sync",
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
    (case,) = bench.load_cases([tmp_path], ["steps"], tmp_path / "w", registry_cache=True)
    assert case.phases == ("cold", "warm", "import")
    tool, plain = _CacheTool("c"), _Tool("p")
    results = bench.run_case(tool, case, tmp_path, 0, iter(range(1, 9)), lambda: None)
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
    assert [r.phase for r in bench.run_case(plain, case, tmp_path, 0, iter(range(9)), list)] == [
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
        "fastest",
        "ociworker/fastest",
        "ociworker/buildkit",
        "ociworker/buildah",
    ]
    # a failed peer is not the fastest: the one that finished is
    assert table[2].split() == [
        "steps", "cold", "4.00", "2.00", "FAILED", "buildkit", "2.00x", "2.00x", "-",
    ]  # fmt: skip
    assert table[3].split() == [
        "steps",
        "warm",
        "1.00",
        "0.50",
        "-",
        "buildkit",
        "2.00x",
        "2.00x",
        "-",
    ]


def test_ratio_to_the_fastest_peer_per_row_for_embedded_and_daemon() -> None:
    R = bench.Result
    tools = ["ociworker", "ociworkerd", "buildkit", "buildah"]
    results = [
        # cold: buildah is the faster peer; warm: buildkit is
        R("ociworker", "fanout", "cold", 3.0),
        R("ociworkerd", "fanout", "cold", 2.4),
        R("buildkit", "fanout", "cold", 6.0),
        R("buildah", "fanout", "cold", 4.0),
        R("ociworker", "fanout", "warm", 0.3),
        R("ociworkerd", "fanout", "warm", 0.1),
        R("buildkit", "fanout", "warm", 0.2),
        R("buildah", "fanout", "warm", 1.0),
    ]
    cold, warm = bench.summary_rows(results, tools)
    assert (cold.fastest, warm.fastest) == ("buildah", "buildkit")
    assert cold.ratios["ociworker/fastest"] == pytest.approx(3.0 / 4.0)
    assert cold.ratios["ociworkerd/fastest"] == pytest.approx(2.4 / 4.0)
    assert warm.ratios["ociworker/fastest"] == pytest.approx(0.3 / 0.2)
    assert warm.ratios["ociworkerd/fastest"] == pytest.approx(0.1 / 0.2)
    # the per-peer ratios stay
    assert cold.ratios["ociworkerd/buildkit"] == pytest.approx(2.4 / 6.0)
    assert warm.ratios["ociworker/buildah"] == pytest.approx(0.3 / 1.0)
    header = bench.format_table(results, tools).splitlines()[0].split()
    assert header[6:9] == ["fastest", "ociworker/fastest", "ociworkerd/fastest"]


def test_fastest_peer_ignores_failed_and_absent_peers() -> None:
    summary = {("c", "cold", "buildkit"): None, ("c", "cold", "buildah"): 5.0}
    assert bench.fastest_peer(summary, "c", "cold") == ("buildah", 5.0)
    assert bench.fastest_peer(summary, "c", "warm") is None
    assert bench.fastest_peer({("c", "cold", "buildkit"): None}, "c", "cold") is None
    # without peers there is no "fastest" column
    only_ours = [bench.Result("ociworker", "c", "cold", 1.0)]
    assert "fastest" not in bench.format_table(only_ours, ["ociworker"])


def test_rotation_puts_every_tool_in_every_position() -> None:
    tools = ["a", "b", "c", "d"]
    orders = [bench.rotated(tools, rep) for rep in range(4)]
    assert orders[0] == tools  # repeat 0 keeps the order given
    assert orders[1] == ["b", "c", "d", "a"]
    for position in range(4):
        assert sorted(order[position] for order in orders) == tools
    assert bench.rotated(tools, 5) == orders[1]
    assert bench.rotated([], 3) == []


def test_parse_list_rejects_unknown() -> None:
    assert bench.parse_list("steps, context", bench.ALL_CASES) == ["steps", "context"]
    with pytest.raises(argparse.ArgumentTypeError, match="choose from"):
        bench.parse_list("steps,nope", bench.ALL_CASES)
