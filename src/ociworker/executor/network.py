"""Network namespaces for ``network: none``: a fresh namespace with only ``lo``, up.

The namespace is pinned by bind-mounting its nsfs file onto a file the caller
owns (under the executor's state dir), never under /var/run/netns, so nothing
outside the state dir is touched. It is created by a throw-away thread rather
than a forked child: ``unshare(CLONE_NEWNET)`` moves only the calling thread,
and a thread that exits right after cannot leak its namespace into the event
loop's thread pool or any other code.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import errno
import os
import threading
from collections.abc import Callable
from functools import cache
from pathlib import Path

from ociworker.errors import HostError

_CLONE_NEWNET = 0x40000000
_MS_BIND = 4096
_MNT_DETACH = 2
_EINVAL = errno.EINVAL


@cache
def _libc() -> ctypes.CDLL:
    name = ctypes.util.find_library("c") or "libc.so.6"
    return ctypes.CDLL(name, use_errno=True)


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _set_loopback_up() -> None:
    # Imported here: pyroute2 is slow to import and only this path needs it.
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        links = ipr.link_lookup(ifname="lo")
        if not links:
            raise HostError("new network namespace has no loopback interface")
        ipr.link("set", index=links[0], state="up")


def _create_pinned(path: Path) -> None:
    """Runs in its own short-lived thread: unshare, pin, bring lo up."""
    libc = _libc()
    _check(libc.unshare(_CLONE_NEWNET), "unshare(CLONE_NEWNET)")
    ns_file = f"/proc/self/task/{threading.get_native_id()}/ns/net".encode()
    _check(
        libc.mount(ns_file, os.fsencode(path), b"none", _MS_BIND, None),
        f"bind-mount network namespace onto {path}",
    )
    try:
        _set_loopback_up()
    except BaseException:
        _detach(path)
        raise


def _detach(path: Path) -> None:
    ret = _libc().umount2(os.fsencode(path), _MNT_DETACH)
    if ret != 0 and ctypes.get_errno() not in (_EINVAL, errno.ENOENT):
        _check(ret, f"unmount {path}")


async def _in_own_thread(fn: Callable[[], None]) -> None:
    """Run ``fn`` in a new thread that ends with it; wait even if cancelled.

    A thread cannot be interrupted, so on cancellation we still wait for it to
    finish (it takes milliseconds) and let the caller undo what it did.
    """
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()

    def settle(exc: BaseException | None) -> None:
        if done.cancelled():
            return
        if exc is None:
            done.set_result(None)
        else:
            done.set_exception(exc)

    def runner() -> None:
        try:
            fn()
        except BaseException as exc:
            loop.call_soon_threadsafe(settle, exc)
        else:
            loop.call_soon_threadsafe(settle, None)

    threading.Thread(target=runner, name="ociworker-netns", daemon=True).start()
    try:
        await asyncio.shield(done)
    except asyncio.CancelledError:
        with contextlib.suppress(Exception):
            await done
        raise


async def create_loopback_netns(path: Path) -> None:
    """Create a network namespace pinned at ``path`` (a new file) with lo up.

    On any failure or cancellation ``path`` is left absent.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o444)
    os.close(fd)
    try:
        await _in_own_thread(lambda: _create_pinned(path))
    except BaseException as exc:
        remove_netns(path)
        if isinstance(exc, OSError):
            raise HostError(f"cannot create a network namespace: {exc}") from exc
        raise


def remove_netns(path: Path) -> None:
    """Unpin the namespace at ``path`` and remove the file; a missing path is fine."""
    if not path.exists():
        return
    _detach(path)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
