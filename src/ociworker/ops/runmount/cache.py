"""Persistent directories behind ``RUN --mount=type=cache``.

Layout, one dir per cache id, named by a hash of the id (so an id such as
``../../etc`` cannot name a host path)::

    <root>/<sha256(id)>/id          the id itself; its mtime is the last use
    <root>/<sha256(id)>/.lock       held while an instance is created or pruned
    <root>/<sha256(id)>/i0, i1...   instances: i0 is the shared one
    <root>/<sha256(id)>/i0.lock     flock of the steps using that instance

Every step using an instance holds a flock on its lock file, which is what
makes the sharing modes hold across processes on the same root as well as
within one: ``shared`` takes it shared, ``locked`` takes i0 exclusively (so
writers run one after another), ``private`` takes the first instance nobody
holds, or makes a new one. Locks are polled rather than waited for in a
thread, so a cancelled step never leaves a thread blocked in ``flock``.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import hashlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ociworker.errors import ConfigError, HostError, UserError
from ociworker.fs.mount import bind_fd, unmount
from ociworker.fs.paths import DIR_PATH, open_dir_beneath, secure_join
from ociworker.fs.tree import disk_usage

Sharing = Literal["shared", "private", "locked"]

#: how often a step waiting for a lock held by another step looks again
_POLL = 0.02


@dataclass(frozen=True)
class CacheSpec:
    """What a cache mount asks for (the parts that matter to its directory)."""

    id: str
    sharing: Sharing = "shared"
    mode: int = 0o755
    uid: int = 0
    gid: int = 0

    @classmethod
    def from_options(cls, options: dict[str, str], target: str) -> CacheSpec:
        sharing = options.get("sharing", "shared")
        if sharing not in ("shared", "private", "locked"):
            raise ConfigError(f"cache mount {target}: invalid sharing {sharing!r}")
        try:
            return cls(
                id=options.get("id") or target,
                sharing=sharing,  # type: ignore[arg-type]
                mode=int(options.get("mode", "755"), 8),
                uid=int(options.get("uid", "0")),
                gid=int(options.get("gid", "0")),
            )
        except ValueError as exc:
            raise ConfigError(f"cache mount {target}: {exc}") from None


@dataclass(frozen=True)
class CacheUsage:
    key: str  # the hash naming the id's dir
    id: str
    size: int
    last_used: float


#: fills a new instance dir before its first use (``from=``/``source=``)
Seed = Callable[[Path], Awaitable[None]]


class CacheMounts:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self._locks: dict[str, asyncio.Lock] = {}

    def dir_for(self, cache_id: str) -> Path:
        return self.root / hashlib.sha256(cache_id.encode()).hexdigest()

    @contextlib.asynccontextmanager
    async def acquire(
        self,
        spec: CacheSpec,
        subdir: str = "/",
        seed: Seed | None = None,
        *,
        pin_in: Path | None = None,
    ) -> AsyncIterator[Path]:
        """The directory to mount for ``spec`` (``subdir`` of the instance),
        held for the ``with`` block as its sharing mode says.

        With ``pin_in``, what is yielded is a bind mount (in a new dir under
        ``pin_in``) of ``subdir`` as resolved now: another step sharing the cache
        may swap ``subdir`` for a symlink to a host path at any moment, and the
        runtime binding the path a moment later would follow it. The bind is made
        through a descriptor opened beneath the instance (see ``pinned``)."""
        d = self.dir_for(spec.id)
        async with contextlib.AsyncExitStack() as outer:
            if spec.sharing == "locked":
                # In-process first (cheap, fair), then across processes.
                lock = self._locks.setdefault(spec.id, asyncio.Lock())
                await outer.enter_async_context(lock)
            while True:
                stack = contextlib.AsyncExitStack()
                try:
                    await asyncio.to_thread(_ensure_id_dir, d, spec.id)
                    if spec.sharing == "private":
                        inst = await self._take_free(stack, d, spec, seed)
                    else:
                        inst = await self._instance(d, "i0", spec, seed)
                        kind = fcntl.LOCK_SH if spec.sharing == "shared" else fcntl.LOCK_EX
                        await stack.enter_async_context(_flock(d / "i0.lock", kind))
                except _Stale:
                    # pruned under our feet: start again on a fresh dir
                    await stack.aclose()
                    continue
                except BaseException:
                    await stack.aclose()
                    raise
                outer.push_async_exit(stack)
                break
            path = await asyncio.to_thread(_subdir, inst, subdir, spec)
            try:
                if pin_in is None:
                    yield path
                else:
                    async with pinned(inst, subdir, spec, pin_in) as pin:
                        yield pin
            finally:
                with contextlib.suppress(OSError):
                    os.utime(d / "id")

    async def _take_free(
        self, stack: contextlib.AsyncExitStack, d: Path, spec: CacheSpec, seed: Seed | None
    ) -> Path:
        n = 0
        while True:
            name = f"i{n}"
            if not (d / name).is_dir():
                inst = await self._instance(d, name, spec, seed)
            else:
                inst = d / name
            fd = _try_flock(d / f"{name}.lock", fcntl.LOCK_EX)
            if fd is not None:
                stack.callback(os.close, fd)
                return inst
            n += 1

    async def _instance(self, d: Path, name: str, spec: CacheSpec, seed: Seed | None) -> Path:
        """``d/name``, made (and seeded) first if it does not exist yet."""
        inst = d / name
        if inst.is_dir():
            return inst
        async with _flock(d / ".lock", fcntl.LOCK_EX):
            if inst.is_dir():
                return inst
            # Made aside and renamed in place, so no step ever sees a half-seeded cache.
            tmp = d / f".new-{name}-{os.getpid()}"
            await asyncio.to_thread(_fresh_dir, tmp, spec)
            try:
                if seed is not None:
                    await seed(tmp)
                os.rename(tmp, inst)
            except BaseException:
                await asyncio.to_thread(shutil.rmtree, tmp, True)
                raise
        return inst

    # -- du / prune ----------------------------------------------------------------

    def usage(self) -> list[CacheUsage]:
        out = []
        for d in sorted(self.root.iterdir()):
            if not d.is_dir():
                continue
            try:
                cache_id = (d / "id").read_text()
                last = (d / "id").stat().st_mtime
            except OSError:
                cache_id, last = "", d.stat().st_mtime
            out.append(CacheUsage(d.name, cache_id, disk_usage(d), last))
        return out

    def remove(self, key: str) -> int:
        """Delete the cache dir ``key`` unless a step holds it; bytes freed (0 if held)."""
        d = self.root / key
        if d.parent != self.root or not d.is_dir():
            return 0
        with _held_all(d) as held:
            if not held:
                return 0
            size = disk_usage(d)
            # Renamed away first: a step that opens a lock file after this sees
            # no dir and starts a new cache instead of using one being deleted.
            doomed = self.root / f".prune-{key}-{os.getpid()}"
            os.rename(d, doomed)
        shutil.rmtree(doomed, ignore_errors=True)
        return size


# -- helpers (run in threads) ------------------------------------------------------------


def _ensure_id_dir(d: Path, cache_id: str) -> None:
    with contextlib.suppress(FileExistsError):
        d.mkdir(mode=0o700)
    idf = d / "id"
    if not idf.exists():
        # unlocked, so two steps of one process may both get here: each writes
        # its own temp file (a pid-named one was renamed away under the other)
        fd, tmp = tempfile.mkstemp(dir=d, prefix=".id-")
        with os.fdopen(fd, "w") as f:
            f.write(cache_id)
        os.replace(tmp, idf)


def _fresh_dir(path: Path, spec: CacheSpec) -> None:
    if path.exists():
        shutil.rmtree(path)
    path.mkdir()
    os.chmod(path, spec.mode)
    os.chown(path, spec.uid, spec.gid)


def _subdir(inst: Path, subdir: str, spec: CacheSpec) -> Path:
    """``subdir`` of an instance, resolved inside it (symlinks a step left in the
    cache cannot lead out of it) and made when missing."""
    if subdir in ("", "/"):
        return inst
    path = secure_join(inst, subdir)
    if not path.is_dir():
        path.mkdir(mode=spec.mode, parents=True, exist_ok=True)
        os.chown(path, spec.uid, spec.gid)
    return path


#: how many times a subdir swapped between its resolution and its opening is resolved again
_PIN_TRIES = 8


def _open_pinned(inst: Path, subdir: str, spec: CacheSpec) -> int:
    """An ``O_PATH`` descriptor of ``subdir`` of ``inst``, resolved inside it.

    ``secure_join`` resolves symlinks as if ``inst`` were /, then every
    component of its answer is opened with ``O_NOFOLLOW`` from a descriptor of
    ``inst``: a component that became a symlink (or vanished) in between makes
    us resolve again, so what we hold is always a directory inside the cache."""
    for _ in range(_PIN_TRIES):
        rel = _subdir(inst, subdir, spec).relative_to(inst).parts
        root = os.open(inst, DIR_PATH)
        try:
            fd = open_dir_beneath(root, rel)
        finally:
            os.close(root)
        if fd is not None:
            return fd
    raise UserError(
        f"cache mount source {subdir!r} kept changing while it was resolved "
        "(another step is replacing it); refusing to mount it"
    )


@contextlib.asynccontextmanager
async def pinned(inst: Path, subdir: str, spec: CacheSpec, scratch: Path) -> AsyncIterator[Path]:
    """``subdir`` of ``inst`` bound on a fresh dir under ``scratch`` through a
    descriptor (``fs.mount.bind_fd``), unmounted and removed after."""
    target = Path(await asyncio.to_thread(tempfile.mkdtemp, dir=scratch, prefix="cache-"))

    def bind() -> None:
        fd = _open_pinned(inst, subdir, spec)
        try:
            bind_fd(fd, target)
        finally:
            os.close(fd)

    binding = asyncio.ensure_future(asyncio.to_thread(bind))

    async def undo() -> None:
        # a cancelled caller must not unmount while the bind is still being made
        await asyncio.wait([binding])
        if not binding.cancelled():
            binding.exception()  # the caller saw it already; mark it retrieved
        await asyncio.to_thread(_unpin, target)

    try:
        await asyncio.shield(binding)
        yield target
    finally:
        await asyncio.shield(undo())


def _unpin(target: Path) -> None:
    unmount(target)
    # rmdir, never rmtree: were it still mounted, rmtree would empty the cache
    target.rmdir()


def _try_flock(path: Path, kind: int) -> int | None:
    try:
        fd = os.open(path, os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600)
    except FileNotFoundError:
        raise _Stale(path) from None
    try:
        fcntl.flock(fd, kind | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return None
        raise
    # A prune may have renamed the dir away between our open and our lock.
    try:
        same = os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        same = False
    if not same:
        os.close(fd)
        raise _Stale(path)
    return fd


class _Stale(Exception):
    pass


@contextlib.asynccontextmanager
async def _flock(path: Path, kind: int) -> AsyncIterator[None]:
    while True:
        fd = _try_flock(path, kind)
        if fd is not None:
            break
        await asyncio.sleep(_POLL)
    try:
        yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def _held_all(d: Path) -> Iterator[bool]:
    """Every lock of ``d`` taken exclusively without waiting (False if one is busy)."""
    fds: list[int] = []
    try:
        for lock in [d / ".lock", *sorted(d.glob("i*.lock"))]:
            try:
                fd = _try_flock(lock, fcntl.LOCK_EX)
            except _Stale:
                fd = None
            if fd is None:
                yield False
                return
            fds.append(fd)
        yield True
    finally:
        for fd in fds:
            os.close(fd)


async def copy_seed(src: Path, dst: Path) -> None:
    """Copy ``src`` (a new cache's seed) into ``dst`` keeping owners, modes, links and times."""
    proc = await asyncio.create_subprocess_exec(
        "cp",
        "-a",
        "-T",
        "--",
        str(src),
        str(dst),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    _, err = await proc.communicate()
    if proc.returncode != 0:
        raise HostError(f"seeding cache mount failed: {err.decode(errors='replace').strip()}")
