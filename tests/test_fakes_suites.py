"""The fakes of ``ociworker.testing.fakes`` against the shared suites of the real parts.

``MemorySnapshotter`` keeps only the bookkeeping, so it runs every snapshot
suite check that reads or writes no files. It skips, because they need
snapshot contents (trees to read or write through the mounts):
chain_and_views, active_writes_isolated, delete_hides_in_child_only,
stat_walk_usage (usage of 200 kB of files), remove_leaves_nothing (files left
on disk), survives_reopen and crash_before_commit (contents across a reopen),
hostile_keys (keys escaping the root on disk), deep_chain_200/600; and
view_is_read_only, which needs real mounts. The bookkeeping halves of those
are the suite's bookkeeping_and_remove_order and reopen_keeps_bookkeeping.
``test_skipped_checks_really_need_contents`` keeps this list honest.
"""

from __future__ import annotations

import gzip
import io
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest
import zstandard

from ociworker.content.store import ContentStore
from ociworker.core.digest import sha256_bytes
from ociworker.core.mounts import Mount
from ociworker.core.oci import OCI_LAYER, OCI_LAYER_GZIP, OCI_LAYER_ZSTD, Descriptor
from ociworker.diff.apply import LayerApplier
from ociworker.errors import UnsupportedError, UserError
from ociworker.executor.base import ProcessSpec
from ociworker.snapshot import NativeSnapshotter
from ociworker.testing.executor_suite import CHECKS as EXECUTOR_CHECKS
from ociworker.testing.executor_suite import COMMANDS as EXECUTOR_COMMANDS
from ociworker.testing.executor_suite import ExecutorSuiteContext
from ociworker.testing.fakes import (
    MEMORY_MOUNT_TYPE,
    FakeExecutor,
    FakeRun,
    MemoryApplier,
    MemoryMounter,
    MemorySnapshotState,
    MemorySnapshotter,
)
from ociworker.testing.mounter_suite import CHECKS as MOUNTER_CHECKS
from ociworker.testing.mounter_suite import MounterSuiteContext
from ociworker.testing.snapshot_suite import CHECKS, SuiteContext

NEEDS_CONTENTS = {
    "chain_and_views",
    "active_writes_isolated",
    "delete_hides_in_child_only",
    "stat_walk_usage",
    "remove_leaves_nothing",
    "survives_reopen",
    "crash_before_commit",
    "hostile_keys",
    "view_is_read_only",
    "deep_chain_200",
    "deep_chain_600",
}


def _memory_ctx(tmp_path: Path) -> SuiteContext:
    # One state for every object the check opens: the state is the "disk" that
    # two processes, or one process before and after a restart, would share.
    state = MemorySnapshotState()
    return SuiteContext(
        factory=lambda _root: MemorySnapshotter(state), base=tmp_path, contents=False
    )


@pytest.mark.parametrize("name", sorted(set(CHECKS) - NEEDS_CONTENTS))
async def test_memory_snapshotter_suite(name: str, tmp_path: Path) -> None:
    await CHECKS[name](_memory_ctx(tmp_path))
    assert list(tmp_path.iterdir()) == [], "an in-memory fake wrote to disk"


@pytest.mark.parametrize("name", sorted(NEEDS_CONTENTS))
async def test_skipped_checks_really_need_contents(name: str, tmp_path: Path) -> None:
    with pytest.raises(UnsupportedError):
        await CHECKS[name](_memory_ctx(tmp_path))


def test_suite_runs_checks_this_module_skips() -> None:
    # A check renamed or dropped from the suite must not linger here unnoticed.
    assert set(CHECKS) >= NEEDS_CONTENTS
    assert set(CHECKS) - NEEDS_CONTENTS


async def test_memory_mounts_cannot_be_mistaken_for_host_paths() -> None:
    s = MemorySnapshotter()
    (active,) = await s.prepare("k", None)
    await s.commit("a", "k")
    (view,) = await s.view("v", "a")
    assert active.type == view.type == MEMORY_MOUNT_TYPE
    assert not active.readonly and view.readonly
    assert not Path(active.source).is_absolute()
    # A key used again later gets a mount of its own, as a new row would.
    (again,) = await s.prepare("k", None)
    assert again.source != active.source


# --- MemoryApplier against the real applier's contract ---------------------------------


@pytest.fixture
def store(tmp_path: Path) -> ContentStore:
    return ContentStore(tmp_path / "content")


@pytest.mark.parametrize(
    ("media_type", "compress"),
    [
        (OCI_LAYER, lambda b: b),
        (OCI_LAYER_GZIP, gzip.compress),
        # two frames: a zstd layer may be written in several
        (
            OCI_LAYER_ZSTD,
            lambda b: b"".join(zstandard.ZstdCompressor().compress(h) for h in (b[:9], b[9:])),
        ),
    ],
)
async def test_memory_applier_returns_the_uncompressed_digest(
    store: ContentStore, media_type: str, compress: Callable[[bytes], bytes]
) -> None:
    tar = b"not really a tar, but the diffID only hashes it" * 100
    blob = compress(tar)
    digest = store.put(blob)
    layer = Descriptor(media_type, digest, len(blob))
    s = MemorySnapshotter()
    mounts = await s.prepare("k", None)
    applier = MemoryApplier(store)
    assert await applier.apply(layer, mounts) == sha256_bytes(tar)
    assert applier.applied == [(digest, mounts)]


async def test_memory_applier_refuses_what_the_real_one_refuses(store: ContentStore) -> None:
    digest = store.put(b"layer")
    s = MemorySnapshotter()
    applier = MemoryApplier(store)
    await s.prepare("k", None)
    await s.commit("a", "k")
    view = await s.view("v", "a")
    with pytest.raises(UserError, match="read-only"):
        await applier.apply(Descriptor(OCI_LAYER, digest, 5), view)
    with pytest.raises(UserError, match="no mounts"):
        await applier.apply(Descriptor(OCI_LAYER, digest, 5), [])
    active = await s.prepare("k2", "a")
    with pytest.raises(UnsupportedError, match="media type"):
        await applier.apply(Descriptor("text/plain", digest, 5), active)
    with pytest.raises(OSError, match="disk full"):
        await MemoryApplier(store, fail_on=digest).apply(Descriptor(OCI_LAYER, digest, 5), active)
    assert applier.applied == []


async def test_real_applier_refuses_the_same(store: ContentStore, tmp_path: Path) -> None:
    # The fake's refusals above are only worth something if the real pair agrees.
    digest = store.put(b"layer")
    s = NativeSnapshotter(tmp_path / "snapshots")
    real = LayerApplier(store, scratch_dir=tmp_path / "scratch")
    await s.prepare("k", None)
    await s.commit("a", "k")
    with pytest.raises(UserError, match="read-only"):
        await real.apply(Descriptor(OCI_LAYER, digest, 5), await s.view("v", "a"))
    with pytest.raises(UserError, match="no mounts"):
        await real.apply(Descriptor(OCI_LAYER, digest, 5), [])
    with pytest.raises(UnsupportedError, match="media type"):
        await real.apply(Descriptor("text/plain", digest, 5), await s.prepare("k2", "a"))


@pytest.mark.parametrize("media_type", [OCI_LAYER, OCI_LAYER_GZIP, OCI_LAYER_ZSTD])
async def test_both_appliers_return_one_diff_id(
    store: ContentStore, tmp_path: Path, media_type: str
) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("etc/hostname")
        info.size = 5
        tar.addfile(info, io.BytesIO(b"fake\n"))
    raw = buf.getvalue()
    blob = {
        OCI_LAYER: raw,
        OCI_LAYER_GZIP: gzip.compress(raw),
        OCI_LAYER_ZSTD: zstandard.ZstdCompressor().compress(raw),
    }[media_type]
    layer = Descriptor(media_type, store.put(blob), len(blob))
    native = NativeSnapshotter(tmp_path / "snapshots")
    real = LayerApplier(store, scratch_dir=tmp_path / "scratch")
    want = await real.apply(layer, await native.prepare("k", None))
    assert want == sha256_bytes(raw)
    assert (
        await MemoryApplier(store).apply(layer, await MemorySnapshotter().prepare("k", None))
        == want
    )


# --- MemoryMounter and FakeExecutor against the shared suites ---------------------------


@pytest.mark.parametrize("name", sorted(MOUNTER_CHECKS))
async def test_memory_mounter_suite(name: str, tmp_path: Path) -> None:
    snapshots = MemorySnapshotter()
    mounter = MemoryMounter(snapshots, tmp_path)
    await MOUNTER_CHECKS[name](MounterSuiteContext(snapshots, mounter))
    assert await snapshots.walk() == []
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("mnt-")] == []


async def test_memory_mounter_refuses_real_mounts(tmp_path: Path) -> None:
    mounter = MemoryMounter(MemorySnapshotter(), tmp_path)
    host = Mount("bind", str(tmp_path), ("rbind", "ro"))
    with pytest.raises(UnsupportedError, match="bind"):
        async with mounter.mounted([host]):
            pass
    assert list(tmp_path.iterdir()) == []


def _scripted() -> FakeExecutor:
    return FakeExecutor(
        {
            args: FakeRun(exit_code=code, stdout=out, stderr=err, block=block)
            for args, (code, out, err, block) in EXECUTOR_COMMANDS.items()
        }
    )


@pytest.mark.parametrize("name", sorted(EXECUTOR_CHECKS))
async def test_fake_executor_suite(name: str) -> None:
    executor = _scripted()
    rootfs = [Mount(MEMORY_MOUNT_TYPE, "memory-snapshot-1", ("rw",))]
    await EXECUTOR_CHECKS[name](ExecutorSuiteContext(executor, rootfs))
    assert executor.running == 0


async def test_fake_executor_refuses_what_the_real_one_refuses() -> None:
    executor = _scripted()
    rootfs = [Mount(MEMORY_MOUNT_TYPE, "memory-snapshot-1", ("rw",))]
    with pytest.raises(UserError, match="empty args"):
        await executor.run(rootfs, ProcessSpec(args=()), (), lambda s, d: None)
    with pytest.raises(UserError, match="no rootfs"):
        await executor.run((), ProcessSpec(args=("true",)), (), lambda s, d: None)
    relative = Mount("tmpfs", "tmpfs", (), "tmp")
    with pytest.raises(UserError, match="absolute"):
        await executor.run(rootfs, ProcessSpec(args=("true",)), (relative,), lambda s, d: None)
    assert executor.calls == []
