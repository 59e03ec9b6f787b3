"""``--progress=rawjson`` prints BuildKit's ``SolveStatus`` objects, and a failed
step's status carries one line (``cancelled`` for a cancellation).

The expected lines are written out by hand from moby/buildkit client/graph.go
(field order, ``omitempty``, base64 ``[]byte``, RFC 3339 ``time.Time``) and Go's
``json.Encoder`` (compact, ``<``, ``>``, ``&`` escaped).
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import pty
from pathlib import Path

import pytest

from ociworker.core.digest import Digest
from ociworker.core.oci import (
    ANNOTATION_STEP_INDEX,
    ANNOTATION_UNCOMPRESSED,
    ANNOTATION_VERTEX_DIGEST,
    Descriptor,
)
from ociworker.core.progress import (
    Event,
    Info,
    LayerCommitted,
    ProgressStep,
    VertexLog,
    VertexStatus,
    Warning,
    error_line,
)
from ociworker.errors import ConfigError, DockerfileError
from ociworker.progress_ui import RawJSONPrinter, go_time, require_console

# 2026-12-03T11:22:33.123456Z
T0 = 1_796_296_953.123456
RUN = "sha256:" + "a" * 64
LAYER = "sha256:" + "b" * 64
EXPORT_ID = "export:abc"
EXPORT = "sha256:" + hashlib.sha256(EXPORT_ID.encode()).hexdigest()


def _print(events: list[Event], now: float = T0 + 5) -> list[str]:
    out = io.StringIO()
    printer = RawJSONPrinter(out, wall=lambda: now)
    for ev in events:
        printer(ev)
    return out.getvalue().splitlines()


def test_go_time_is_rfc3339_utc_with_trailing_zeros_trimmed() -> None:
    assert go_time(T0) == "2026-12-03T11:22:33.123456Z"
    assert go_time(1_796_296_953.0) == "2026-12-03T11:22:33Z"
    assert go_time(1_796_296_953.5) == "2026-12-03T11:22:33.5Z"
    assert go_time(1_796_296_953.12) == "2026-12-03T11:22:33.12Z"
    assert go_time(0.0) == "1970-01-01T00:00:00Z"
    assert go_time(1_796_296_953.9999999) == "2026-12-03T11:22:34Z"  # rounds up a second


def test_a_build_as_solve_status_lines() -> None:
    lines = _print(
        [
            VertexStatus(RUN, "[2/2] RUN make", started=T0),
            VertexLog(RUN, 1, b"hello\n", T0 + 0.5),
            VertexLog(RUN, 2, b"oops\n", T0 + 1),
            VertexStatus(RUN, "[2/2] RUN make", started=T0, completed=T0 + 2, error="exit 3"),
        ]
    )
    assert lines == [
        '{"vertexes":[{"digest":"@RUN","name":"[2/2] RUN make",'
        '"started":"2026-12-03T11:22:33.123456Z"}]}'.replace("@RUN", RUN),
        '{"logs":[{"vertex":"@RUN","stream":1,"data":"aGVsbG8K",'
        '"timestamp":"2026-12-03T11:22:33.623456Z"}]}'.replace("@RUN", RUN),
        '{"logs":[{"vertex":"@RUN","stream":2,"data":"b29wcwo=",'
        '"timestamp":"2026-12-03T11:22:34.123456Z"}]}'.replace("@RUN", RUN),
        '{"vertexes":[{"digest":"@RUN","name":"[2/2] RUN make",'
        '"started":"2026-12-03T11:22:33.123456Z","completed":"2026-12-03T11:22:35.123456Z",'
        '"error":"exit 3"}]}'.replace("@RUN", RUN),
    ]


def test_cached_step_and_warning() -> None:
    lines = _print(
        [
            VertexStatus(RUN, "[1/2] FROM busybox", started=T0, completed=T0, cached=True),
            Warning("One or more build-args [X] were not consumed"),
            Warning("short", detail="line one\nline two"),
        ]
    )
    assert lines == [
        '{"vertexes":[{"digest":"@RUN","name":"[1/2] FROM busybox",'
        '"started":"2026-12-03T11:22:33.123456Z","completed":"2026-12-03T11:22:33.123456Z",'
        '"cached":true}]}'.replace("@RUN", RUN),
        '{"warnings":[{"level":1,'
        '"short":"T25lIG9yIG1vcmUgYnVpbGQtYXJncyBbWF0gd2VyZSBub3QgY29uc3VtZWQ="}]}',
        '{"warnings":[{"level":1,"short":"c2hvcnQ=","detail":["bGluZSBvbmU=","bGluZSB0d28="]}]}',
    ]


def test_pseudo_steps_get_a_stable_sha256_and_infos_attach_to_the_running_step() -> None:
    layer = Descriptor(
        "application/vnd.oci.image.layer.v1.tar+gzip",
        Digest(LAYER),
        1234,
        annotations=(
            (ANNOTATION_UNCOMPRESSED, "sha256:" + "c" * 64),
            (ANNOTATION_STEP_INDEX, "1"),
            (ANNOTATION_VERTEX_DIGEST, RUN),
        ),
    )
    now = T0 + 5
    stamp = "2026-12-03T11:22:38.123456Z"
    lines = _print(
        [
            VertexStatus(EXPORT_ID, "exporting to oci image format", started=T0),
            Info("writing image sha256:" + "d" * 64),  # no vertex: the running step's
            Info("transferring context: 12kB 0.1s", EXPORT_ID),
            LayerCommitted(layer),
            VertexStatus(EXPORT_ID, "exporting to oci image format", T0, completed=T0 + 1),
            Info("after everything"),  # nothing runs: no vertex at all
        ],
        now=now,
    )
    assert [json.loads(line) for line in lines] == [
        {
            "vertexes": [
                {
                    "digest": EXPORT,
                    "name": "exporting to oci image format",
                    "started": "2026-12-03T11:22:33.123456Z",
                }
            ]
        },
        {
            "statuses": [
                {
                    "id": "writing image sha256:" + "d" * 64,
                    "vertex": EXPORT,
                    "current": 0,
                    "timestamp": stamp,
                    "started": stamp,
                    "completed": stamp,
                }
            ]
        },
        {
            "statuses": [
                {
                    "id": "transferring context: 12kB 0.1s",
                    "vertex": EXPORT,
                    "current": 0,
                    "timestamp": stamp,
                    "started": stamp,
                    "completed": stamp,
                }
            ]
        },
        {
            "statuses": [
                {
                    "id": f"writing layer {LAYER}",
                    "vertex": RUN,
                    "total": 1234,
                    "current": 1234,
                    "timestamp": stamp,
                    "started": stamp,
                    "completed": stamp,
                }
            ]
        },
        {
            "vertexes": [
                {
                    "digest": EXPORT,
                    "name": "exporting to oci image format",
                    "started": "2026-12-03T11:22:33.123456Z",
                    "completed": "2026-12-03T11:22:34.123456Z",
                }
            ]
        },
        {
            "statuses": [
                {
                    "id": "after everything",
                    "current": 0,
                    "timestamp": stamp,
                    "started": stamp,
                    "completed": stamp,
                }
            ]
        },
    ]


def test_json_is_go_encoders_compact_html_safe_utf8() -> None:
    (line,) = _print([VertexStatus(RUN, "[1/1] RUN echo '<a> & b' é\u2028", started=T0)])
    assert line == (
        '{"vertexes":[{"digest":"@RUN","name":"[1/1] RUN echo \'\\u003ca\\u003e \\u0026 b\' é'
        '\\u2028","started":"2026-12-03T11:22:33.123456Z"}]}'.replace("@RUN", RUN)
    )
    assert json.loads(line)["vertexes"][0]["name"] == "[1/1] RUN echo '<a> & b' é\u2028"


def test_log_bytes_that_are_not_utf8_survive_base64() -> None:
    (line,) = _print([VertexLog(RUN, 1, b"\xff\xfe bin\x00", T0)])
    assert json.loads(line)["logs"][0]["data"] == "//4gYmluAA=="


def test_tty_needs_a_console(tmp_path: Path) -> None:
    msg = "failed to get console: provided file is not a console"
    with pytest.raises(ConfigError) as info:
        require_console(io.StringIO())
    assert str(info.value) == msg
    with (tmp_path / "log").open("w") as f, pytest.raises(ConfigError, match=msg):
        require_console(f)
    master, slave = pty.openpty()
    try:
        with os.fdopen(slave, "w") as terminal:
            require_console(terminal)  # a terminal passes
    finally:
        os.close(master)
    closed = io.StringIO()
    closed.close()
    with pytest.raises(ConfigError, match=msg):
        require_console(closed)


def test_error_line() -> None:
    assert error_line(asyncio.CancelledError()) == "cancelled"
    assert error_line(KeyboardInterrupt()) == "cancelled"
    err = DockerfileError("unknown instruction: FORM", filename="Dockerfile", line=1,
                          source_line="FORM busybox")  # fmt: skip
    assert "\n" in str(err)  # the final message keeps the source line...
    assert error_line(err) == "Dockerfile:1: unknown instruction: FORM"  # ...the step does not
    assert error_line(RuntimeError("\n\nsecond try\nthird")) == "second try"
    assert error_line(RuntimeError()) == "failed"


def _step_events(exc: BaseException | None) -> list[VertexStatus]:
    seen: list[Event] = []
    try:
        with ProgressStep(seen.append, "[internal] load metadata for x"):
            if exc is not None:
                raise exc
    except BaseException as got:
        assert got is exc
    assert all(isinstance(e, VertexStatus) for e in seen)
    return [e for e in seen if isinstance(e, VertexStatus)]


def test_progress_step_ends_done_error_or_cancelled() -> None:
    ok = _step_events(None)
    assert [e.error for e in ok] == [None, None]
    assert ok[1].completed is not None
    cancelled = _step_events(asyncio.CancelledError())
    assert cancelled[1].error == "cancelled"  # not "" (which reads as DONE)
    failed = _step_events(DockerfileError("bad", line=3, source_line="RUN x"))
    assert failed[1].error == "line 3: bad"
