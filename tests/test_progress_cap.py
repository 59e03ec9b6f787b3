"""cap_logs: per-step log limit with BuildKit's "output clipped" line."""

from __future__ import annotations

from ociworker.core.progress import (
    DEFAULT_LOG_CAP,
    Event,
    Info,
    VertexLog,
    VertexStatus,
    cap_logs,
    clipped_line,
)


def _logs(events: list[Event], digest: str) -> list[VertexLog]:
    return [e for e in events if isinstance(e, VertexLog) and e.digest == digest]


def test_default_cap_text_is_buildkits() -> None:
    assert DEFAULT_LOG_CAP == 2 * 1024 * 1024
    assert clipped_line(DEFAULT_LOG_CAP) == b"\n[output clipped, log limit 2MiB reached]\n"
    assert b"log limit 1.5KiB reached" in clipped_line(1536)


def test_under_the_cap_everything_passes_unchanged() -> None:
    got: list[Event] = []
    sink = cap_logs(got.append, 10)
    evs: list[Event] = [
        VertexStatus("a", "RUN x", started=1.0),
        VertexLog("a", 1, b"12345", 1.0),
        VertexLog("a", 2, b"67890", 1.1),  # exactly the cap: no clip line
        VertexStatus("a", "RUN x", started=1.0, completed=2.0),
    ]
    for e in evs:
        sink(e)
    assert got == evs


def test_over_the_cap_data_is_cut_and_clipped_line_sent_once() -> None:
    got: list[Event] = []
    sink = cap_logs(got.append, 10)
    sink(VertexLog("a", 1, b"1234567", 1.0))
    sink(VertexLog("a", 1, b"89abcdef", 2.0))  # crosses the cap
    sink(VertexLog("a", 1, b"more", 3.0))
    sink(VertexLog("a", 2, b"and more", 4.0))
    sink(Info("still passes", "a"))
    sink(VertexStatus("a", "RUN x", started=1.0, completed=5.0))
    logs = _logs(got, "a")
    data = b"".join(e.data for e in logs if e.data != clipped_line(10))
    assert data == b"123456789a"
    clips = [e for e in logs if e.data == clipped_line(10)]
    assert len(clips) == 1 and clips[0].stream == 2
    assert logs[-1] == clips[0]  # nothing after the clip line
    assert isinstance(got[-2], Info) and isinstance(got[-1], VertexStatus)


def test_cap_is_per_vertex() -> None:
    got: list[Event] = []
    sink = cap_logs(got.append, 4)
    sink(VertexLog("a", 1, b"aaaaaa", 1.0))
    sink(VertexLog("b", 1, b"bbbb", 1.0))
    assert b"".join(e.data for e in _logs(got, "b")) == b"bbbb"
    assert [e.data for e in _logs(got, "a")] == [b"aaaa", clipped_line(4)]


def test_a_chunk_arriving_exactly_at_the_cap_only_clips() -> None:
    got: list[Event] = []
    sink = cap_logs(got.append, 4)
    sink(VertexLog("a", 1, b"aaaa", 1.0))
    sink(VertexLog("a", 1, b"b", 2.0))
    assert [e.data for e in _logs(got, "a")] == [b"aaaa", clipped_line(4)]


def test_zero_means_no_cap() -> None:
    got: list[Event] = []
    sink = cap_logs(got.append, 0)
    sink(VertexLog("a", 1, b"x" * 100, 1.0))
    assert [e.data for e in _logs(got, "a")] == [b"x" * 100]
