"""Executor Protocol: run one process in a sandbox on a rootfs."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

from ociworker.core.build import Ulimit
from ociworker.core.mounts import Mount
from ociworker.core.progress import Usage
from ociworker.errors import UserError

#: receives ("stdout" | "stderr", chunk) as soon as the process writes it
OutputSink = Callable[[str, bytes], None]

NetworkMode = Literal["default", "host", "none"]
#: "sandbox": Docker's default capabilities, seccomp profile, masked paths;
#: "insecure": privileged (RUN --security=insecure, behind its entitlement)
SecurityMode = Literal["sandbox", "insecure"]


@dataclass(frozen=True)
class StepLimits:
    """What one step may use (None: no limit). ``memory``, ``pids`` and ``cpus``
    are the worker's (applied to the step's cgroup); ``ulimits`` and
    ``shm_size`` the build's (process rlimits, /dev/shm size)."""

    memory: int | None = None
    pids: int | None = None
    cpus: float | None = None
    shm_size: int | None = None
    ulimits: tuple[Ulimit, ...] = ()


@dataclass(frozen=True)
class RunReport:
    """How a run went beyond its exit code: what it cost, and which limit (if
    any) killed it, e.g. ``memory limit 256MiB``."""

    usage: Usage
    limit_hit: str = ""


#: receives the report once the process has ended (an executor that does not
#: account, such as the fakes, never calls it)
ReportSink = Callable[[RunReport], None]


@dataclass(frozen=True)
class ProcessSpec:
    args: tuple[str, ...]
    env: tuple[str, ...] = ()  # "K=V"
    cwd: str = "/"
    user: str = ""  # "", "uid", "uid:gid", "name", "name:group" (resolved in the rootfs)
    hostname: str = "buildkitsandbox"
    #: the driver's default is no network of its own; builds choose explicitly
    #: (the frontend's default is ``default``, host needs an entitlement)
    network: NetworkMode = "host"
    security: SecurityMode = "sandbox"
    #: ("NAME", "IP") lines added to the step's /etc/hosts (``--add-host``)
    extra_hosts: tuple[tuple[str, str], ...] = ()
    #: "K=V" entries holding secrets (RUN --mount=type=secret,env=K): added to the
    #: environment, but the runtime's files for such a process (config.json, its
    #: state dir) are kept on a tmpfs, never on disk; never shown by repr
    secret_env: tuple[str, ...] = field(default=(), repr=False)
    limits: StepLimits = StepLimits()
    report: ReportSink | None = field(default=None, repr=False, compare=False)


def check_run(rootfs: Sequence[Mount], process: ProcessSpec, mounts: Sequence[Mount]) -> None:
    """Refuse a run no executor can start (every implementation calls this first)."""
    if not process.args:
        raise UserError("no command to run (empty args)")
    if not rootfs:
        raise UserError("no rootfs mounts to run on")
    for m in mounts:
        if not m.target.startswith("/"):
            raise UserError(f"mount target must be absolute, got {m.target!r}")


class Executor(Protocol):
    async def run(
        self,
        rootfs: Sequence[Mount],
        process: ProcessSpec,
        mounts: Sequence[Mount],
        output: OutputSink,
    ) -> int:
        """Run ``process`` on ``rootfs`` with extra ``mounts`` (each with a ``target``).

        Returns the exit code. Cancelling the awaiting task kills the container and
        releases every mount before the CancelledError propagates.
        """
        ...


@runtime_checkable
class Preparing(Protocol):
    """An executor that can get ready for a step before the step's inputs are."""

    def prepare(self, network: NetworkMode) -> None:
        """Start, in the background, what a step on ``network`` will need (the
        ``default`` network's bridge and a namespace); idempotent, never fails
        (the step itself reports what could not be made)."""
        ...


class RecoverableExecutor(Executor, Protocol):
    """An ``Executor`` that owns a state dir, as the worker holds it."""

    async def recover(self) -> dict[str, int]:
        """Kill what the runs of a dead process left (containers, mounts, bundles);
        counts of the ``containers`` and ``mounts`` found. Called by whoever owns
        the root, before the first run."""
        ...
