"""The shared suite of ``executor.base.Executor``: what the exec handler relies on.

Run against ``OCIRuntimeExecutor`` on runc and crun with a busybox rootfs
(``integration/test_executor_runtime.py``, as root) and against the unit
tests' ``testing.fakes.FakeExecutor`` (``tests/test_fakes_suites.py``). The
checks run the shell commands in ``COMMANDS``; a fake is scripted with what
each is expected to do (``FakeRun`` from ``COMMANDS[args]``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from ociworker.core.mounts import Mount
from ociworker.executor.base import Executor, ProcessSpec

EXIT_3 = ("sh", "-c", "exit 3")
HELLO = ("sh", "-c", "echo hello; echo oops >&2")
FOREVER = ("sh", "-c", "echo started; exec sleep 600")

#: args -> (exit code, stdout, stderr, whether it runs until cancelled)
COMMANDS: dict[tuple[str, ...], tuple[int, bytes, bytes, bool]] = {
    EXIT_3: (3, b"", b"", False),
    HELLO: (0, b"hello\n", b"oops\n", False),
    FOREVER: (0, b"started\n", b"", True),
}


@dataclass
class ExecutorSuiteContext:
    executor: Executor
    rootfs: Sequence[Mount]


class _Output:
    def __init__(self) -> None:
        self.data: dict[str, bytes] = {"stdout": b"", "stderr": b""}
        self.started = asyncio.Event()

    def __call__(self, stream: str, data: bytes) -> None:
        self.data[stream] += data
        self.started.set()


def _expect(cond: bool, msg: str) -> None:
    if not cond:
        raise AssertionError(msg)


async def check_exit_code_returned(ctx: ExecutorSuiteContext) -> None:
    code = await ctx.executor.run(ctx.rootfs, ProcessSpec(args=EXIT_3), (), _Output())
    _expect(code == 3, f"exit 3 came back as {code}")


async def check_output_delivered(ctx: ExecutorSuiteContext) -> None:
    out = _Output()
    code = await ctx.executor.run(ctx.rootfs, ProcessSpec(args=HELLO), (), out)
    _expect(code == 0, f"exit code {code}")
    _expect(out.data["stdout"] == b"hello\n", f"stdout was {out.data['stdout']!r}")
    _expect(out.data["stderr"] == b"oops\n", f"stderr was {out.data['stderr']!r}")


async def check_cancel_raises_cancelled(ctx: ExecutorSuiteContext) -> None:
    out = _Output()
    task = asyncio.ensure_future(ctx.executor.run(ctx.rootfs, ProcessSpec(args=FOREVER), (), out))
    await asyncio.wait_for(out.started.wait(), 30)
    task.cancel()
    try:
        await asyncio.wait_for(task, 30)
    except asyncio.CancelledError:
        pass
    else:
        raise AssertionError("a cancelled run returned instead of raising CancelledError")


CHECKS: dict[str, Callable[[ExecutorSuiteContext], Awaitable[None]]] = {
    "exit_code_returned": check_exit_code_returned,
    "output_delivered": check_output_delivered,
    "cancel_raises_cancelled": check_cancel_raises_cancelled,
}
