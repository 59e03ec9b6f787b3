"""What the user reads when a command fails: one mapping, checked case by case,
and once end to end through ``main`` with a bug planted in a command."""

from __future__ import annotations

import asyncio
import errno
import re
import signal
from pathlib import Path

import pytest

from ociworker import cli
from ociworker.cli.failures import Phase, UsageError, describe
from ociworker.errors import (
    ConfigError,
    DaemonUnavailable,
    DockerfileError,
    ExecError,
    RegistryError,
)


def test_solve_errors_get_the_prefix_and_setup_errors_do_not() -> None:
    failed = ExecError("[2/2] RUN exit 3", "/bin/sh -c exit 3", 3)
    assert describe(failed, phase=Phase.SOLVE).render() == (
        "ERROR: failed to solve: step [2/2] RUN exit 3: process '/bin/sh -c exit 3' "
        "did not complete successfully: exit code: 3"
    )
    reg = RegistryError("127.0.0.1:9/x: connection refused")
    assert describe(reg, phase=Phase.SOLVE).message.startswith("failed to solve: ")
    assert describe(DockerfileError("bad"), phase=Phase.SETUP).message == "bad"
    for exc in (ConfigError("bad flag"), DaemonUnavailable("daemon unavailable: x")):
        assert not describe(exc, phase=Phase.SOLVE).message.startswith("failed to solve")
    usage = describe(UsageError("unknown flag: --x", "ociworker build"))
    assert usage.render() == "ERROR: unknown flag: --x\nSee 'ociworker build --help'."
    assert usage.exit_code == 1


def test_signals_map_to_the_shells_codes() -> None:
    cancelled = asyncio.CancelledError()
    assert describe(cancelled, phase=Phase.SOLVE, signum=signal.SIGINT).exit_code == 130
    assert describe(cancelled, phase=Phase.SOLVE, signum=signal.SIGTERM).exit_code == 143
    assert describe(KeyboardInterrupt()).exit_code == 130


def test_host_conditions_are_words_not_errno() -> None:
    full = OSError(errno.ENOSPC, "No space left on device", "/out/img.tar")
    assert describe(full).message == "no space left on device: /out/img.tar"
    denied = PermissionError(errno.EACCES, "Permission denied", "/var/lib/x")
    assert describe(denied).message == "permission denied: /var/lib/x"
    pipe = describe(BrokenPipeError(errno.EPIPE, "Broken pipe"))
    assert "broken pipe" in pipe.message and "[Errno" not in pipe.message


def test_a_group_of_one_is_that_error() -> None:
    group = ExceptionGroup("tasks", [ConfigError("the real one")])
    assert describe(group).message == "the real one"


def test_an_unexpected_error_says_internal_error_and_where_the_trace_is(tmp_path: Path) -> None:
    failure = describe(ZeroDivisionError("boom"), trace_dir=tmp_path)
    first, second, third = failure.message.splitlines()
    assert first == "internal error: ZeroDivisionError: boom"
    traces = list((tmp_path / "crash").iterdir())
    assert len(traces) == 1 and str(traces[0]) in second
    assert "Traceback" not in failure.message
    assert "ZeroDivisionError: boom" in traces[0].read_text()
    assert "report it at https://" in third


def test_main_turns_a_planted_bug_into_one_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    async def broken(args: object) -> int:
        return {}["no such key"]  # type: ignore[no-any-return]

    monkeypatch.setattr(cli, "_cmd_du", broken)
    assert cli.main(["du", "--root", str(tmp_path / "state")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("ERROR: internal error: KeyError: 'no such key'\n")
    assert "Traceback" not in err
    found = re.search(r"the full trace is in (\S+)\.\n", err)
    assert found, err
    trace = Path(found.group(1))
    assert "KeyError" in trace.read_text()
    trace.unlink()
