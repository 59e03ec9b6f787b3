"""In-memory fakes of ociworker's Protocols, for unit tests.

Every fake here is held to the shared suite of the Protocol it stands in for,
so a unit test that passes with a fake says something about the real thing:
``MemoryCacheIndex`` to ``tests/test_scheduler.py::test_cache_index_suite``,
``MemorySnapshotter`` to ``ociworker.testing.snapshot_suite``, ``MemoryMounter``
to ``ociworker.testing.mounter_suite`` and ``FakeExecutor`` to
``ociworker.testing.executor_suite`` (all in ``tests/test_fakes_suites.py``).
The fake registry is in ``fake_registry.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gzip
import os
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import zstandard

from ociworker.content.store import ContentStore
from ociworker.core.digest import Digest, sha256_bytes
from ociworker.core.graph import Vertex
from ociworker.core.mounts import Mount
from ociworker.core.oci import Descriptor, layer_compression
from ociworker.errors import NotFoundError, UnsupportedError, UserError
from ociworker.executor.base import OutputSink, ProcessSpec, check_run
from ociworker.ops.runmount.secret import SecretFile
from ociworker.snapshot import access
from ociworker.snapshot.base import Kind, SnapshotInfo
from ociworker.solver.scheduler import Job, Result, default_cache_key


class MemoryCacheIndex:
    def __init__(self) -> None:
        self.records: dict[str, tuple[Result, str]] = {}

    async def lookup(self, key: str) -> Result | None:
        hit = self.records.get(key)
        return hit[0] if hit else None

    async def record(self, key: str, result: Result, description: str) -> None:
        self.records[key] = (result, description)


class ArithmeticHandler:
    """Runs vertices whose op is ``ExecOp(args=("add", "N"))`` etc. on integer results.

    ``runs`` counts how many times each vertex digest actually ran, and ``gate``
    (when set) makes every run wait for it, so tests can observe concurrency.
    """

    def __init__(self) -> None:
        self.runs: dict[str, int] = {}
        self.active = 0
        self.max_active = 0
        self.gate: asyncio.Event | None = None
        self.delay = 0.0

    def handler(self, vertex: Vertex) -> ArithmeticHandler:
        return self

    async def cache_key(self, vertex: Vertex, input_keys: Sequence[str], job: Job) -> str:
        return default_cache_key(vertex, input_keys)

    async def run(self, vertex: Vertex, inputs: Sequence[Result], job: Job) -> Result:
        self.runs[vertex.digest] = self.runs.get(vertex.digest, 0) + 1
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            if self.gate is not None:
                await self.gate.wait()
            if self.delay:
                await asyncio.sleep(self.delay)
            op = vertex.op
            args: tuple[str, ...] = getattr(op, "args", ())
            values = [int(r.ref) if r.ref else 0 for r in inputs]
            if args[0] == "const":
                value = int(args[1])
            elif args[0] == "add":
                value = sum(values) + int(args[1])
            elif args[0] == "fail":
                raise RuntimeError(f"vertex failed on purpose: {args[1]}")
            else:
                raise ValueError(f"unknown arithmetic op {args!r}")
            return Result("snapshot", str(value))
        finally:
            self.active -= 1


# --- snapshots and layers ----------------------------------------------------------

#: The mount type of every ``MemorySnapshotter`` mount: no kernel knows it, so a
#: fake mount that reaches a real ``mount`` fails loudly instead of binding some
#: host path.
MEMORY_MOUNT_TYPE = "memory"


@dataclass
class MemorySnapshotState:
    """What a snapshotter root would hold on disk, kept in memory.

    Several ``MemorySnapshotter`` objects on one state stand in for several
    processes on one root (and a new object on an old state for a restart).
    """

    #: key or name -> (serial id, info); ids are never reused, like the row ids
    #: of the real snapshotters, so a mount never names an earlier snapshot
    snapshots: dict[str, tuple[int, SnapshotInfo]] = field(default_factory=dict)
    last_id: int = 0


class MemorySnapshotter:
    """``Snapshotter`` + ``SnapshotCatalog`` that keeps only the bookkeeping.

    Follows the rules of the real snapshotters (containerd's): keys and names
    share one namespace; parents must be committed; a committed name cannot be
    mounted, only viewed; a snapshot with children cannot be removed. It holds
    no files: mounts are of type ``memory`` and ``usage`` is always 0, so code
    that needs real trees must use ``NativeSnapshotter`` on a tmp dir instead.
    """

    def __init__(self, state: MemorySnapshotState | None = None) -> None:
        self.state = state if state is not None else MemorySnapshotState()

    def _get(self, key: str) -> tuple[int, SnapshotInfo]:
        found = self.state.snapshots.get(key)
        if found is None:
            raise NotFoundError(f"no snapshot {key!r}")
        return found

    def _mount(self, ident: int, kind: Kind) -> list[Mount]:
        mode = "rw" if kind == "active" else "ro"
        return [Mount(type=MEMORY_MOUNT_TYPE, source=f"memory-snapshot-{ident}", options=(mode,))]

    async def _create(self, key: str, parent: str | None, kind: Kind) -> Sequence[Mount]:
        # One scheduling point per call, and none between check and change:
        # concurrent callers interleave like processes, yet each call is atomic
        # as a database transaction makes it for the real ones.
        await asyncio.sleep(0)
        if parent is not None:
            p = self.state.snapshots.get(parent)
            if p is None or p[1].kind != "committed":
                raise NotFoundError(f"parent snapshot {parent!r} is not a committed snapshot")
        if key in self.state.snapshots:
            raise FileExistsError(f"snapshot {key!r} already exists")
        self.state.last_id += 1
        self.state.snapshots[key] = (self.state.last_id, SnapshotInfo(key, kind, parent))
        return self._mount(self.state.last_id, kind)

    async def prepare(self, key: str, parent: str | None) -> Sequence[Mount]:
        return await self._create(key, parent, "active")

    async def view(self, key: str, parent: str | None) -> Sequence[Mount]:
        return await self._create(key, parent, "view")

    async def commit(self, name: str, key: str) -> None:
        await asyncio.sleep(0)
        found = self.state.snapshots.get(key)
        if found is None or found[1].kind != "active":
            raise NotFoundError(f"no active snapshot {key!r} to commit")
        if name != key and name in self.state.snapshots:
            raise FileExistsError(f"snapshot {name!r} already exists")
        ident, info = found
        del self.state.snapshots[key]
        self.state.snapshots[name] = (ident, SnapshotInfo(name, "committed", info.parent))

    async def remove(self, key: str) -> None:
        await asyncio.sleep(0)
        self._get(key)
        child = next((k for k, (_, i) in self.state.snapshots.items() if i.parent == key), None)
        if child is not None:
            raise UserError(
                f"snapshot {key!r} is the parent of {child!r}; remove its children first"
            )
        del self.state.snapshots[key]

    async def mounts(self, key: str) -> Sequence[Mount]:
        await asyncio.sleep(0)
        ident, info = self._get(key)
        if info.kind == "committed":
            raise UserError(f"snapshot {key!r} is committed; create a view of it to mount it")
        return self._mount(ident, info.kind)

    async def stat(self, key: str) -> SnapshotInfo | None:
        await asyncio.sleep(0)
        found = self.state.snapshots.get(key)
        return None if found is None else found[1]

    async def usage(self, key: str) -> int:
        await asyncio.sleep(0)
        self._get(key)
        return 0  # it holds no files

    async def walk(self) -> Sequence[SnapshotInfo]:
        await asyncio.sleep(0)
        return [info for _, info in sorted(self.state.snapshots.values(), key=lambda t: t[0])]

    async def recover(self) -> int:
        return await access.drop_uncommitted(self, self)


class MemoryApplier:
    """``Applier`` that records which layer went onto which mount instead of
    extracting it, and returns the true diffID of the blob in ``store``.

    ``fail_on``: the layer digest whose apply fails with ``OSError`` (disk full).
    Refuses what ``diff.apply.LayerApplier`` refuses, with the same errors: no
    mounts, read-only mounts, unknown layer media types.
    """

    def __init__(self, store: ContentStore, fail_on: Digest | None = None) -> None:
        self.store = store
        self.fail_on = fail_on
        self.applied: list[tuple[Digest, Sequence[Mount]]] = []

    async def apply(self, layer: Descriptor, mounts: Sequence[Mount]) -> Digest:
        await asyncio.sleep(0)
        if not mounts:
            raise UserError("apply: the snapshot has no mounts")
        if any(m.readonly for m in mounts):
            raise UserError("apply: the snapshot is mounted read-only")
        if layer.digest == self.fail_on:
            raise OSError(errno.ENOSPC, "disk full")
        blob = await asyncio.to_thread(self.store.read, layer.digest)
        diff_id = sha256_bytes(_decompress(layer.media_type, blob))
        self.applied.append((layer.digest, mounts))
        return diff_id


def _decompress(media_type: str, blob: bytes) -> bytes:
    try:
        compression = layer_compression(media_type)
    except ValueError:
        raise UnsupportedError(f"unsupported layer media type {media_type!r}") from None
    if compression == "gzip":
        return gzip.decompress(blob)
    if compression == "zstd":
        # Frame by frame, as the real applier reads: a layer may hold several.
        return zstandard.ZstdDecompressor().stream_reader(blob, read_across_frames=True).read()
    return blob


class MemoryMounter:
    """``Mounter`` for ``MemorySnapshotter`` mounts: each snapshot's files are a
    plain dir under ``root`` (made on first use as a copy of its parent's, as the
    native snapshotter does), and ``mounted`` hands out a fresh copy of it under
    ``root`` that is written back on exit when the mount is writable.

    Refuses any other mount (a real bind or overlay) loudly. Read-only mounts are
    not enforced (nothing stops a write, it is just not kept), and two writable
    mounts of one snapshot at once are last-writer-wins.
    """

    def __init__(self, snapshotter: MemorySnapshotter, root: Path) -> None:
        self._state = snapshotter.state
        self.root = root
        self._trees = root / "trees"

    def _ident(self, mounts: Sequence[Mount]) -> int:
        if len(mounts) != 1 or mounts[0].type != MEMORY_MOUNT_TYPE:
            raise UnsupportedError(
                f"MemoryMounter mounts only one {MEMORY_MOUNT_TYPE!r} mount of a "
                f"MemorySnapshotter, got {[m.type for m in mounts]}"
            )
        prefix = "memory-snapshot-"
        if not mounts[0].source.startswith(prefix):
            raise UnsupportedError(f"not a MemorySnapshotter mount: {mounts[0].source!r}")
        return int(mounts[0].source.removeprefix(prefix))

    def _tree(self, ident: int) -> Path:
        """The snapshot's dir, made from its parent's on first use."""
        tree = self._trees / str(ident)
        if tree.exists():
            return tree
        found = [info for i, info in self._state.snapshots.values() if i == ident]
        if not found:
            raise NotFoundError(f"snapshot #{ident} is gone from the MemorySnapshotter")
        parent = found[0].parent
        if parent is None:
            tree.mkdir(parents=True)
        else:
            shutil.copytree(self._tree(self._state.snapshots[parent][0]), tree, symlinks=True)
        return tree

    @contextlib.asynccontextmanager
    async def mounted(self, mounts: Sequence[Mount]) -> AsyncIterator[Path]:
        ident = self._ident(mounts)
        writable = not mounts[0].readonly
        tree = await asyncio.to_thread(self._tree, ident)
        path = self.root / f"mnt-{uuid.uuid4().hex}"
        await asyncio.to_thread(shutil.copytree, tree, path, symlinks=True)
        try:
            yield path
        finally:
            await asyncio.shield(asyncio.to_thread(self._release, path, tree, writable))

    @staticmethod
    def _release(path: Path, tree: Path, writable: bool) -> None:
        if writable:
            # what was written is kept, as through a real mount (also on an error)
            shutil.rmtree(tree)
            path.rename(tree)
        else:
            shutil.rmtree(path)


@contextlib.asynccontextmanager
async def plain_secret_files(tmp: Path, files: Sequence[SecretFile]) -> AsyncIterator[list[Path]]:
    """``ops.runmount.secret.secret_files`` without the tmpfs (no root needed): the
    files in a private dir under ``tmp``, removed on exit."""
    if not files:
        yield []
        return
    d = Path(tempfile.mkdtemp(dir=tmp, prefix="secrets-"))
    try:
        paths = []
        for i, f in enumerate(files):
            path = d / f"secret-{i}"
            path.write_bytes(f.data)
            os.chmod(path, f.mode)
            paths.append(path)
        yield paths
    finally:
        shutil.rmtree(d)


@dataclass(frozen=True)
class FakeRun:
    """What a ``FakeExecutor`` run does: output to write, then an exit code; with
    ``block`` it then waits until cancelled (a command that never ends)."""

    exit_code: int = 0
    stdout: bytes = b""
    stderr: bytes = b""
    block: bool = False


@dataclass(frozen=True)
class ExecutorCall:
    rootfs: tuple[Mount, ...]
    process: ProcessSpec
    mounts: tuple[Mount, ...]


class FakeExecutor:
    """``Executor`` that runs nothing: it records each call and plays the
    ``FakeRun`` that ``script`` gives for it (by args, or a function of the call,
    e.g. one that reads a mounted file while the "process" runs); ``default`` for
    args the script does not know. Refuses what the real one refuses."""

    def __init__(
        self,
        script: Mapping[tuple[str, ...], FakeRun] | Callable[[ExecutorCall], FakeRun] | None = None,
        default: FakeRun | None = None,
    ) -> None:
        self.script = script if script is not None else {}
        self.default = default if default is not None else FakeRun()
        self.calls: list[ExecutorCall] = []
        #: runs in progress (a cancelled one must not stay counted)
        self.running = 0

    def _play(self, call: ExecutorCall) -> FakeRun:
        if callable(self.script):
            return self.script(call)
        return self.script.get(call.process.args, self.default)

    async def run(
        self,
        rootfs: Sequence[Mount],
        process: ProcessSpec,
        mounts: Sequence[Mount],
        output: OutputSink,
    ) -> int:
        check_run(rootfs, process, mounts)
        call = ExecutorCall(tuple(rootfs), process, tuple(mounts))
        self.calls.append(call)
        self.running += 1
        try:
            await asyncio.sleep(0)
            run = self._play(call)
            if run.stdout:
                output("stdout", run.stdout)
            if run.stderr:
                output("stderr", run.stderr)
            if run.block:
                await asyncio.Event().wait()
            return run.exit_code
        finally:
            self.running -= 1

    async def recover(self) -> dict[str, int]:
        return {"containers": 0, "mounts": 0}
