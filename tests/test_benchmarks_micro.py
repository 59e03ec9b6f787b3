"""The micro-benchmarks' pure parts: the per-RUN arithmetic (floor.py), the graph
(solve_cached.py), the export window read from rawjson progress (export_big.py)."""

from __future__ import annotations

import importlib.util
import json
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import ModuleType

import pytest

_DIR = Path(__file__).resolve().parent.parent / "benchmarks"


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"ociworker_bench_{name}", _DIR / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


floor = _load("floor")
solve_cached = _load("solve_cached")
export_big = _load("export_big")


def test_per_step_cost_is_the_medians_difference_over_the_steps() -> None:
    # medians 1.0 s (0 steps) and 2.0 s (20 steps): the outliers do not move them
    zero = [1.0, 0.9, 5.0]
    many = [2.0, 1.5, 9.0]
    assert floor.per_step_ms(zero, many, 20) == pytest.approx(1000 * (2.0 - 1.0) / 20)


def test_floor_dockerfiles_have_the_asked_number_of_runs() -> None:
    for steps in (0, 3):
        lines = floor.dockerfile(steps).splitlines()
        assert lines[:2] == ["ARG BASE", "FROM $BASE"]
        assert lines[2:] == ["RUN true"] * steps


def test_solve_graph_shape_and_distinct_vertices() -> None:
    top, order = solve_cached.make_graph(4, 3)
    assert len(order) == 4 * 3 + 1 and order[-1] is top
    assert len(top.inputs) == 4
    assert len({v.digest for v in order}) == len(order)  # no two vertices share work
    seen: set[object] = set()
    for v in order:  # inputs come first: the order the cache is primed in
        assert all(i is None or i.digest in seen for i in v.inputs)
        seen.add(v.digest)


def _status(name: str, start: datetime, seconds: float | None) -> str:
    v: dict[str, str] = {"digest": "sha256:" + name[:1] * 64, "name": name}
    v["started"] = start.strftime("%Y-%m-%dT%H:%M:%S.%f") + "123Z"  # nanoseconds, as Go
    if seconds is not None:
        v["completed"] = (start + timedelta(seconds=seconds)).isoformat().replace("+00:00", "Z")
    return json.dumps({"vertexes": [v]})


def test_export_window_spans_every_exporting_vertex() -> None:
    t0 = datetime(2026, 1, 2, 3, 4, 5, 250000, tzinfo=UTC)
    lines = [
        "noise that is not json",
        _status("[2/2] RUN head -c 1 /dev/urandom", t0, 9.0),
        _status("exporting layers", t0 + timedelta(seconds=10), None),  # started only
        _status("exporting layers", t0 + timedelta(seconds=10), 3.5),
        _status("exporting to oci image format", t0 + timedelta(seconds=14), 0.5),
        json.dumps({"statuses": [{"id": "writing image"}]}),
    ]
    total, parts = export_big.export_window(lines)
    # from 10.000000 s to 14.5 s after t0; the started stamp's nanoseconds are cut
    assert total == pytest.approx(4.5, abs=1e-5)
    assert parts == pytest.approx({"exporting layers": 3.5, "exporting to oci image format": 0.5})
    with pytest.raises(ValueError, match="exporting"):
        export_big.export_window(lines[:3])


def test_export_dockerfile_writes_half_random_half_text_in_one_run() -> None:
    text = export_big.dockerfile(64)
    assert [line.split()[0] for line in text.splitlines()] == ["ARG", "FROM", "RUN"]
    half = str(32 * 1024 * 1024)
    assert text.count(f"head -c {half}") == 2 and "/dev/urandom" in text
