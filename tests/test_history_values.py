"""Build history values (core.history) and the store (cachedb.history)."""

from __future__ import annotations

import asyncio
import json
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from ociworker.cachedb.history import SQLiteHistory
from ociworker.core.history import (
    BuildRecord,
    StepRecord,
    critical_path,
    expired,
    explain,
    resolve_ref,
    trace_json,
    trace_svg,
)
from ociworker.core.progress import VertexLog, VertexStatus
from ociworker.errors import NotFoundError
from ociworker.ops import history as oh
from ociworker.ops.context import ContextChecksums

BASE_OLD = "docker-image://r/base@sha256:" + "1" * 64
BASE_NEW = "docker-image://r/base@sha256:" + "2" * 64


def _build(
    rid: str,
    *,
    created: float = 100.0,
    base: str = BASE_OLD,
    env: tuple[str, ...] = ("PATH=/bin", "MODE=a"),
    args: dict[str, str] | None = None,
    files: dict[str, str] | None = None,
    run_cmd: str = "make",
    ran: tuple[str, ...] = (),
    keys: dict[str, str] | None = None,
    no_cache: bool = False,
) -> BuildRecord:
    """FROM (base) -> COPY (context) -> RUN: keys derived from their inputs, as
    the solver's are, unless ``keys`` overrides one."""
    files = files if files is not None else {"a.txt": "d1", "b.txt": "d2"}
    keys = keys or {}
    k_from = keys.get("from", "k-" + base[-4:])
    k_copy = keys.get("copy", f"k-copy-{k_from}-{sorted(files.items())}")
    k_run = keys.get("run", f"k-run-{k_copy}-{env}-{run_cmd}")
    t = created

    def step(name: str, digest: str, **kw: object) -> StepRecord:
        # one after the other, as a chain runs: [n/3] starts at t+n
        n = int(name[1])
        cached = name.split()[1] not in ran
        return StepRecord(
            digest=digest,
            name=name,
            started=t + n,
            completed=t + n + (0.01 if cached else 0.9),
            cached=cached,
            **kw,  # type: ignore[arg-type]
        )

    steps = (
        StepRecord("ctx", "[internal] load build context", t, t + 0.5, key="k-ctx",
                   op={"source": {"identifier": "local://context"}}),
        step("[1/3] FROM r/base@sha256:" + base[-64:], "v-from", key=k_from,
             op={"source": {"identifier": base}}),
        step("[2/3] COPY . /", "v-copy", key=k_copy, op={"file": {"actions": []}},
             inputs=("v-from", "ctx"), input_keys=(k_from, str(sorted(files.items()))),
             files=files),
        step(f"[3/3] RUN {run_cmd}", "v-run", key=k_run,
             op={"exec": {"args": ["sh", "-c", run_cmd], "env": list(env)}},
             inputs=("v-copy",), input_keys=(k_copy,)),
        StepRecord("x", "exporting layers", t + 5, t + 6),
    )  # fmt: skip
    return BuildRecord(
        id=rid,
        created=t,
        completed=t + 6,
        dockerfile="/ctx/Dockerfile",
        build_args=args or {},
        steps=steps,
        no_cache=no_cache,
    )


def test_a_changed_context_file_is_named_and_its_children_name_the_parent() -> None:
    prev = _build("p")
    cur = _build("c", files={"a.txt": "d1", "b.txt": "CHANGED"}, ran=("COPY", "RUN"))
    got = explain(cur, prev)
    assert got["[2/3] COPY . /"] == ("context files changed: b.txt",)
    assert got["[3/3] RUN make"] == ("parent step '[2/3] COPY . /' re-ran",)
    assert set(got) == {"[2/3] COPY . /", "[3/3] RUN make"}  # the context load is no miss


def test_build_arg_and_env_are_told_apart() -> None:
    prev = _build("p", args={"MODE": "a"}, env=("MODE=a", "X=1"))
    cur = _build("c", args={"MODE": "b"}, env=("MODE=b", "X=2"), ran=("RUN",))
    assert explain(cur, prev)["[3/3] RUN make"] == ("build-arg MODE changed", "env X changed")


def test_a_moved_base_image_is_named_with_both_digests() -> None:
    prev = _build("p")
    cur = _build("c", base=BASE_NEW, ran=("FROM", "COPY", "RUN"))
    got = explain(cur, prev)
    (reason,) = got["[1/3] FROM r/base@sha256:" + "2" * 64]
    assert reason == f"base image changed: {BASE_OLD[15:]} -> {BASE_NEW[15:]}"
    assert got["[2/3] COPY . /"][0].startswith("parent step '[1/3] FROM")


def test_same_key_that_ran_was_pruned_and_no_cache_says_so() -> None:
    prev = _build("p")
    assert explain(_build("c", ran=("RUN",)), prev)["[3/3] RUN make"] == (
        "its cache record was pruned since build p",
    )
    assert explain(_build("c", ran=("RUN",), no_cache=True), prev)["[3/3] RUN make"] == (
        "--no-cache was given",
    )


def test_an_edited_instruction_and_a_first_build() -> None:
    cur = _build("c", run_cmd="make all", ran=("RUN",))
    assert explain(cur, _build("p"))["[3/3] RUN make all"][0].startswith("the Dockerfile changed")
    assert explain(cur, None)["[3/3] RUN make all"] == (
        "no earlier build of this Dockerfile and target",
    )


def test_resolve_ref_by_id_prefix_and_offset() -> None:
    ids = ["c3", "b2", "b1"]
    assert resolve_ref("", ids) == "c3"
    assert resolve_ref("^2", ids) == "b1"
    assert resolve_ref("c", ids) == "c3"
    with pytest.raises(NotFoundError, match="ambiguous"):
        resolve_ref("b", ids)
    with pytest.raises(NotFoundError, match="only 3 kept"):
        resolve_ref("^3", ids)
    with pytest.raises(NotFoundError, match="no build records"):
        resolve_ref("", [])


def test_expired_keeps_the_newest_within_count_and_age() -> None:
    now = time.time()
    recs = [("a", now - 10), ("b", now - 5), ("c", now - 1000), ("d", now)]
    assert sorted(expired(recs, 2, 0)) == ["a", "c"]
    assert expired(recs, 0, 100) == ["c"]
    assert expired(recs, 0, 0) == []


def test_trace_json_is_chrome_trace_and_marks_the_critical_path() -> None:
    r = _build("c", ran=("COPY", "RUN"))
    data = json.loads(json.dumps(trace_json(r)))
    spans = [e for e in data["traceEvents"] if e["ph"] == "X"]
    assert {e["name"] for e in spans} == {s.name for s in r.steps}
    for e in spans:
        assert isinstance(e["ts"], int) and isinstance(e["dur"], int) and e["dur"] > 0
    # the RUN ends last among the steps; its chain goes back through COPY to FROM
    crit = {e["name"] for e in spans if e["args"]["critical_path"]}
    assert {"[3/3] RUN make", "[2/3] COPY . /"} <= crit
    assert "[internal] load build context" not in crit
    assert critical_path(r)[0] == "x"  # the export, then the keyed chain


def test_trace_svg_is_xml_naming_every_step_and_escaping_them() -> None:
    r = _build("c", run_cmd='echo "<a & b>"', ran=("RUN",))
    root = ET.fromstring(trace_svg(r))
    titles = ["".join(t.itertext()) for t in root.iter("{http://www.w3.org/2000/svg}title")]
    for s in r.steps:
        assert any(t.startswith(s.name) for t in titles), s.name
    groups = list(root.iter("{http://www.w3.org/2000/svg}g"))
    assert sum("cached" in g.get("class", "").split() for g in groups) == 2  # FROM, COPY
    assert any("critical" in g.get("class", "").split() for g in groups)


def test_store_keeps_limits_finds_previous_and_removes(tmp_path: Path) -> None:
    h = SQLiteHistory(tmp_path / "history.db", max_entries=3, max_age=0)
    now = time.time()
    for n in range(5):
        h.put(_build(f"id{n}", created=now + n), [{"info": {"message": f"m{n}"}}])
    assert h.ids() == ["id4", "id3", "id2"]
    assert h.events("id3") == [{"info": {"message": "m3"}}]
    assert h.get("^1").id == "id3"
    latest = h.get("id4")
    prev = h.previous(latest)
    assert prev is not None and prev.id == "id3"
    assert h.get("id4") == latest  # round trip through JSON
    other = BuildRecord(id="t", created=now + 9, dockerfile="/ctx/Dockerfile", target="x")
    assert h.previous(other) is None  # another target is another build
    with pytest.raises(NotFoundError):
        h.remove(["id4", "nope"])
    assert h.ids() == ["id4", "id3", "id2"]  # one bad name removes nothing
    assert h.remove(["id4"]) == ["id4"]
    assert h.ids() == ["id3", "id2"]
    h.close()


def test_a_base_image_step_named_after_another_stage_is_still_matched() -> None:
    prev = _build("p")
    renamed = tuple(
        s
        if not s.name.startswith("[1/3]")
        else StepRecord(**{**s.__dict__, "name": "[b 1/2] FROM"})
        for s in prev.steps
    )
    prev = BuildRecord(**{**prev.__dict__, "steps": renamed})
    cur = _build("c", base=BASE_NEW, ran=("FROM", "COPY", "RUN"))
    (reason,) = explain(cur, prev)["[1/3] FROM r/base@sha256:" + "2" * 64]
    assert reason.startswith("base image changed: ")


def test_a_stage_under_no_cache_filter_says_so() -> None:
    prev = _build("p")
    cur = _build("c", ran=("RUN",))
    steps = tuple(
        StepRecord(**{**s.__dict__, "cache_ignored": True}) if s.name.startswith("[3/3]") else s
        for s in cur.steps
    )
    cur = BuildRecord.from_json(BuildRecord(**{**cur.__dict__, "steps": steps}).to_json())
    assert explain(cur, prev)["[3/3] RUN make"] == ("--no-cache-filter names its stage",)


def test_recorder_keeps_statuses_and_clips_logs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(oh, "MAX_LOG_BYTES", 10)
    rec = oh.BuildRecorder(
        dockerfile="/c/Dockerfile", context="/c", target="", build_args={}, no_cache=False,
        checksums=ContextChecksums(),
    )  # fmt: skip
    seen: list[object] = []
    sink = rec.sink(seen.append)
    sink(VertexStatus("v", "[1/1] RUN x", started=5.0))
    for n in range(4):
        sink(VertexLog("v", 1, b"1234", float(n)))
    sink(VertexStatus("v", "[1/1] RUN x", started=5.0, completed=6.0, error="boom"))
    assert len(seen) == 6  # the build's own view is untouched
    logs = [e["log"]["data"] for e in rec.events if "log" in e]
    assert logs[:2] == ["1234", "1234"] and "logs clipped" in logs[2] and len(logs) == 3
    record = asyncio.run(rec.finish(None, None, {}, "boom"))
    (step,) = record.steps
    assert (step.started, step.completed, step.error, step.ran) == (5.0, 6.0, "boom", True)


def test_a_step_that_failed_or_stopped_last_time_is_no_pruned_record() -> None:
    prev = _build("p")
    failed = tuple(
        StepRecord(**{**s.__dict__, "error": "exit code: 1"}) if s.name.startswith("[3/3]") else s
        for s in prev.steps
    )
    stopped = tuple(
        StepRecord(**{**s.__dict__, "completed": None, "cached": False})
        if s.name.startswith("[3/3]")
        else s
        for s in prev.steps
    )
    cur = _build("c", ran=("RUN",))
    for steps, why in ((failed, "it failed in build p"), (stopped, "it did not finish")):
        prev_run = BuildRecord(**{**prev.__dict__, "steps": steps})
        (reason,) = explain(cur, prev_run)["[3/3] RUN make"]
        assert reason.startswith(why), reason
