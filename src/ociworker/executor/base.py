"""Executor Protocol: run one process in a sandbox on a rootfs."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

from ociworker.core.mounts import Mount

#: receives ("stdout" | "stderr", chunk) as soon as the process writes it
OutputSink = Callable[[str, bytes], None]

NetworkMode = Literal["host", "none"]


@dataclass(frozen=True)
class ProcessSpec:
    args: tuple[str, ...]
    env: tuple[str, ...] = ()  # "K=V"
    cwd: str = "/"
    user: str = ""  # "", "uid", "uid:gid", "name", "name:group" (resolved in the rootfs)
    hostname: str = "buildkitsandbox"
    network: NetworkMode = "host"


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
