"""The one place where an exception becomes what the user sees: a message and an exit code.

buildx prints ``ERROR: <message>`` and exits 1 for a usage error and for a failed
build alike, and prefixes ``failed to solve:`` only to errors of the solve itself
(not to a bad flag, a missing context or an unreachable daemon). An error we did
not foresee is a bug: the user gets one line saying so and the path of a file
holding the full trace, never the trace itself on their terminal.
"""

from __future__ import annotations

import enum
import errno
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from ociworker.errors import (
    BuildCancelled,
    ConfigError,
    DaemonUnavailable,
    OciworkerError,
)
from ociworker.fs.oserror import os_error_text

ISSUES_URL = "https://github.com/ociworker/ociworker/issues"

#: exit codes as buildx (1 for any failure) and the shell (128 + signal number)
EXIT_FAILURE = 1
EXIT_SIGINT = 128 + signal.SIGINT
EXIT_SIGTERM = 128 + signal.SIGTERM


class Phase(enum.Enum):
    """Where the command was when it failed: only a solve error is a "failed to solve"."""

    SETUP = "setup"
    SOLVE = "solve"


class UsageError(OciworkerError):
    """A command line argparse refused (unknown flag, missing argument)."""

    code = "usage"

    def __init__(self, message: str, command: str) -> None:
        self.command = command
        super().__init__(message)


@dataclass(frozen=True)
class Failure:
    message: str
    exit_code: int = EXIT_FAILURE

    def render(self) -> str:
        return f"ERROR: {self.message}"


def describe(
    exc: BaseException,
    *,
    phase: Phase = Phase.SETUP,
    signum: int | None = None,
    trace_dir: Path | None = None,
) -> Failure:
    """What to print and which code to exit with for ``exc``."""
    exc = _unwrap(exc)
    if signum is not None or isinstance(exc, KeyboardInterrupt | BuildCancelled):
        code = EXIT_SIGTERM if signum == signal.SIGTERM else EXIT_SIGINT
        return Failure("build cancelled" if phase is Phase.SOLVE else "cancelled", code)
    if isinstance(exc, UsageError):
        return Failure(f"{exc}\nSee '{exc.command} --help'.")
    if isinstance(exc, OciworkerError):
        text = str(exc) or type(exc).__name__
        solve_error = phase is Phase.SOLVE and not isinstance(exc, ConfigError | DaemonUnavailable)
        return Failure(f"failed to solve: {text}" if solve_error else text)
    if isinstance(exc, BrokenPipeError):
        return Failure("stdout: the reader went away before everything was written (broken pipe)")
    if isinstance(exc, OSError) and exc.errno in _HOST_ERRNOS:
        return Failure(os_error_text(exc))
    return _internal(exc, trace_dir)


# Conditions of the host a user can cause or fix (a full disk, a read-only or
# foreign dir, too many files); anything else unexpected is our bug.
_HOST_ERRNOS = frozenset(
    {
        errno.ENOSPC,
        errno.EDQUOT,
        errno.EACCES,
        errno.EPERM,
        errno.EROFS,
        errno.ENOENT,
        errno.ENOTDIR,
        errno.EISDIR,
        errno.EEXIST,
        errno.ENAMETOOLONG,
        errno.ELOOP,
        errno.EMFILE,
        errno.ENFILE,
        errno.ENOMEM,
        errno.EXDEV,
        errno.EBUSY,
    }
)


def _unwrap(exc: BaseException) -> BaseException:
    # A TaskGroup's group of one is that one error.
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


def _internal(exc: BaseException, trace_dir: Path | None) -> Failure:
    import traceback

    trace = "".join(traceback.format_exception(exc))
    path = _write_trace(trace, trace_dir)
    where = f"the full trace is in {path}" if path else "the trace could not be saved"
    return Failure(
        f"internal error: {type(exc).__name__}: {exc}\n"
        f"This is a bug in ociworker; {where}.\n"
        f"Please report it at {ISSUES_URL} with that file and the command you ran."
    )


def _write_trace(trace: str, trace_dir: Path | None) -> Path | None:
    # The state dir first (nothing outside it is ours to write); the temp dir when
    # the state dir is the problem or there is none (a daemon's client).
    import tempfile  # only on this rare path: it costs start-up otherwise

    stamp = time.strftime("%Y%m%dT%H%M%S")
    name = f"ociworker-crash-{stamp}-{os.getpid()}.txt"
    candidates = [trace_dir / "crash"] if trace_dir is not None else []
    candidates.append(Path(tempfile.gettempdir()))
    for d in candidates:
        try:
            if d.parent.is_dir():
                d.mkdir(mode=0o700, exist_ok=True)
            path = d / name
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(trace)
            return path
        except OSError:
            continue
    return None
