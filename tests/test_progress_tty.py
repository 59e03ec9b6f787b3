"""TTYPrinter (the rich live view) driven by scripted events and a fake clock."""

from __future__ import annotations

import argparse
import asyncio
import io

import pytest
from rich.console import Console

from ociworker.cli import _progress_mode
from ociworker.core.progress import Info, VertexLog, VertexStatus, Warning
from ociworker.errors import ConfigError
from ociworker.progress_ui import TTYPrinter

T0 = 1_700_000_000.0


class Clock:
    """Monotonic and wall time that move only when the test says so."""

    def __init__(self) -> None:
        self.t = 0.0

    def mono(self) -> float:
        return self.t

    def wall(self) -> float:
        return T0 + self.t


def _printer(clock: Clock, rate: float = 10.0, log_lines: int = 6) -> tuple[TTYPrinter, Console]:
    console = Console(
        file=io.StringIO(),
        force_terminal=True,
        record=True,
        width=100,
        height=40,
        color_system="standard",
    )
    printer = TTYPrinter(
        console, refresh_per_second=rate, log_lines=log_lines, clock=clock.mono, wall=clock.wall
    )
    return printer, console


def _final_frame(console: Console) -> str:
    text = console.export_text()
    return text[text.rindex("[+] Building") :]


def _script(p: TTYPrinter, clock: Clock) -> None:
    p(VertexStatus("load", "[internal] load build definition", T0, T0 + 0.1))
    p(VertexStatus("base", "[1/3] FROM docker.io/library/busybox", T0, T0, cached=True))
    p(VertexStatus("ok", "[2/3] RUN echo hello", started=T0 + 0.2))
    p(VertexLog("ok", 1, b"hello\n", T0 + 0.3))
    p(VertexStatus("ok", "[2/3] RUN echo hello", T0 + 0.2, T0 + 0.5))
    p(VertexStatus("bad", "[3/3] RUN ./build.sh", started=T0 + 0.5))
    for i in range(30):
        clock.t += 0.01
        p(VertexLog("bad", 1, f"compiling unit {i}\n".encode(), T0 + clock.t))
    p(VertexLog("bad", 2, b"\x1b[31mfatal: it broke\x1b[0m\nno newline at the end", T0 + 1))
    p(Warning("FromAsCasing: 'as' and 'FROM' keywords' casing do not match (line 2)"))
    clock.t = 1.5
    p(
        VertexStatus(
            "bad",
            "[3/3] RUN ./build.sh",
            T0 + 0.5,
            T0 + 1.5,
            error='process "/bin/sh -c ./build.sh" did not complete successfully: exit code: 2',
        )
    )


def test_final_view_collapses_done_steps_and_keeps_the_failure() -> None:
    clock = Clock()
    p, console = _printer(clock)
    with p:
        _script(p, clock)
    final = _final_frame(console)
    lines = [line.rstrip() for line in final.splitlines()]
    assert lines[0] == "[+] Building 1.5s (4/4) FINISHED"
    assert any(
        line.startswith(" => [internal] load build definition") and line.endswith("0.1s")
        for line in lines
    )
    assert any(line.startswith(" => CACHED [1/3] FROM docker.io/library/busybox") for line in lines)
    # a finished step is one line: its log is gone from the view
    assert any(
        line.startswith(" => [2/3] RUN echo hello") and line.endswith("0.3s") for line in lines
    )
    assert "hello" not in [line.strip() for line in lines]
    assert any(line.startswith(" => ERROR [3/3] RUN ./build.sh") for line in lines)
    # the failing step's last lines stay, escapes stripped, the partial line flushed
    block = final[final.index(" > [3/3] RUN ./build.sh:") :]
    assert "fatal: it broke\nno newline at the end\n------" in block
    assert "compiling unit 29" in block
    assert "compiling unit 0\n" not in block  # only the last lines are kept
    assert "1 warning found" in final and "FromAsCasing" in final
    assert "\x1b" not in final


def test_running_step_shows_timer_and_last_log_lines_dimmed() -> None:
    clock = Clock()
    p, console = _printer(clock, log_lines=3)
    with p:
        p(VertexStatus("a", "[1/1] RUN make", started=T0))
        for i in range(5):
            p(VertexLog("a", 1, f"step {i}\n".encode(), T0))
        clock.t = 2.34
        p(Info("transferring context: 12kB"))  # no digest: it goes to the running step
        live = console.export_text(styles=True)
    frame = live[live.rindex("[+] Building") :]
    lines = [line.rstrip() for line in frame.splitlines()]
    assert lines[0] == "[+] Building 2.3s (0/1)"
    assert lines[1].startswith(" => [1/1] RUN make") and lines[1].endswith("2.3s")
    dim = "\x1b[2m"  # the SGR code of rich's "dim"
    assert lines[2].startswith(f"{dim} => => transferring context: 12kB")
    shown = [line.split("\x1b[0m")[0].rstrip() for line in lines if "# step" in line]
    assert shown == [f"{dim} => => # step {i}" for i in (2, 3, 4)]


def test_refresh_is_rate_limited() -> None:
    clock = Clock()
    p, _ = _printer(clock, rate=10)
    with p:
        p(VertexStatus("a", "[1/1] RUN yes", started=T0))
        first = p.renders
        # 1000 log events within one second of fake time: at most ~10 frames.
        for i in range(1000):
            clock.t = i / 1000
            p(VertexLog("a", 1, b"y\n", T0 + clock.t))
        during = p.renders - first
    assert 9 <= during <= 11
    assert p.renders == first + during + 1  # stop() renders the final state once


def test_a_clock_going_backwards_does_not_freeze_the_view() -> None:
    clock = Clock()
    clock.t = 100.0
    p, _ = _printer(clock)
    with p:
        p(VertexStatus("a", "[1/1] RUN x", started=T0))
        before = p.renders
        clock.t = 5.0
        p(VertexLog("a", 1, b"x\n", T0))
        assert p.renders == before + 1


async def test_ticker_moves_timers_without_events_and_stops_on_exit() -> None:
    clock = Clock()
    p, _ = _printer(clock, rate=1000)
    with p:
        p(VertexStatus("a", "[1/1] RUN sleep 5", started=T0))
        before = p.renders
        for _ in range(50):  # yield to the loop until the ticker has fired
            clock.t += 0.01
            await asyncio.sleep(0.002)
            if p.renders > before:
                break
        assert p.renders > before
    after = p.renders
    await asyncio.sleep(0.01)
    assert p.renders == after  # no ticking after stop
    p.stop()  # idempotent
    assert p.renders == after


def test_error_unwinding_through_the_view_prints_the_final_state() -> None:
    clock = Clock()
    p, console = _printer(clock)
    with pytest.raises(KeyboardInterrupt), p:
        p(VertexStatus("a", "[1/1] RUN sleep 100", started=T0))
        raise KeyboardInterrupt
    final = _final_frame(console)
    assert " => [1/1] RUN sleep 100" in final and "FINISHED" in final


@pytest.mark.parametrize(
    ("flag", "env", "tty", "want"),
    [
        (None, None, True, "tty"),
        (None, None, False, "plain"),
        ("auto", "plain", True, "tty"),
        (None, "rawjson", True, "rawjson"),
        ("plain", "tty", True, "plain"),
    ],
)
def test_progress_mode_choice(
    monkeypatch: pytest.MonkeyPatch, flag: str | None, env: str | None, tty: bool, want: str
) -> None:
    if env is None:
        monkeypatch.delenv("BUILDKIT_PROGRESS", raising=False)
    else:
        monkeypatch.setenv("BUILDKIT_PROGRESS", env)
    monkeypatch.setattr("sys.stderr.isatty", lambda: tty)
    assert _progress_mode(argparse.Namespace(quiet=False, progress=flag)) == want


def test_bad_buildkit_progress_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BUILDKIT_PROGRESS", "fancy")
    with pytest.raises(ConfigError, match="BUILDKIT_PROGRESS"):
        _progress_mode(argparse.Namespace(quiet=False, progress=None))
