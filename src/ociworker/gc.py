"""What a root holds, as ``du`` records, and their removal (``prune``, GC).

The IO shell around ``core.gc``: it reads the cache index, the snapshots, the
cache mounts, the daemon's synced contexts, git checkouts and repositories and
HTTP download records into ``UsageRecord``s, lets ``core.gc`` choose, then
removes what was chosen, each removal checked again at the last moment so a
build that started using a record since it was read keeps it.

What a running build holds: the cache index's leases. A build takes one when it
starts; every record it looks up or writes from then on has a later last use
than the lease's start, so it (and the snapshots it is built on) is "in use"
until the lease is released. A lease of a process that died is released the
next time anyone reads them (``held_since``), i.e. at the next start.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import shutil
import time
import weakref
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ociworker.content.image import read_image
from ociworker.core.build import (
    CACHE_MOUNT_TYPE,
    GIT_CHECKOUT_TYPE,
    INTERNAL_TYPE,
    LOCAL_SOURCE_TYPE,
    REGULAR_TYPE,
    UsageRecord,
)
from ociworker.core.gc import DiskSpace, GCPolicy, PruneOptions, prune_selection, select
from ociworker.fs.atomic import write_atomic
from ociworker.log import get_logger
from ociworker.sources.image import LAYER_SNAPSHOT_PREFIX
from ociworker.worker import Worker

_log = get_logger("ociworker.gc")

Remove = Callable[[], Awaitable[int]]


@dataclass(frozen=True)
class _Entry:
    record: UsageRecord
    #: removes it if still unused; bytes freed (-1: it was kept after all)
    remove: Remove


def _rid(text: str) -> str:
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


async def disk_usage_records(worker: Worker, contexts: Path | None = None) -> list[UsageRecord]:
    return [e.record for e in await _inventory(worker, contexts)]


async def prune(
    worker: Worker, opts: PruneOptions, contexts: Path | None = None
) -> list[UsageRecord]:
    """Remove what ``opts`` selects and nothing a running build holds; the
    records removed (with the bytes each freed)."""
    async with _lock(worker):
        entries = await _inventory(worker, contexts)
        chosen = prune_selection(
            [e.record for e in entries],
            opts.filter,
            all=opts.all,
            keep_storage=opts.keep_storage,
            keep_duration=opts.keep_duration,
            now=time.time(),
        )
        removed = await _remove(worker, entries, chosen)
        if opts.all and opts.filter.empty and not opts.keep_storage and not opts.keep_duration:
            removed.extend(await _orphan_blobs(worker))
        return removed


#: a root nothing was written to is looked at again after this long anyway
#: (time-based rules: records age without any build)
RECHECK_AFTER = 3600.0


async def collect(
    worker: Worker,
    policies: Sequence[GCPolicy],
    contexts: Path | None = None,
    *,
    skip_unchanged: bool = False,
) -> list[UsageRecord]:
    """One GC pass of ``policies`` over the root; the records removed. With
    ``skip_unchanged`` (the embedded worker, after each build) a root where no
    record was written since the last pass, less than ``RECHECK_AFTER`` ago, is
    not walked: a fully cached rebuild costs one query."""
    stamp = worker.root / "gc.last"
    newest = worker.cache.newest_created()
    if skip_unchanged:
        with contextlib.suppress(OSError, ValueError):
            seen = float(stamp.read_text())
            if newest <= seen and time.time() - stamp.stat().st_mtime < RECHECK_AFTER:
                return []
    async with _lock(worker):
        entries = await _inventory(worker, contexts)
        st = os.statvfs(worker.root)
        other = await asyncio.to_thread(_unowned_blobs, worker, entries)
        disk = DiskSpace(
            total=st.f_blocks * st.f_frsize, free=st.f_bavail * st.f_frsize, other=other
        )
        chosen = select([e.record for e in entries], policies, disk=disk, now=time.time())
        removed = await _remove(worker, entries, chosen)
        if removed:
            _log.info("gc", removed=len(removed), freed=sum(r.size for r in removed))
        with contextlib.suppress(OSError):
            if worker.cache.held_since() is None:
                write_atomic(stamp, repr(newest).encode())
            else:  # a running build kept what it holds: the next pass must look again
                stamp.unlink(missing_ok=True)
        return removed


def _unowned_blobs(worker: Worker, entries: Sequence[_Entry]) -> int:
    """Bytes the snapshot and content stores hold beyond what the records count
    (see ``DiskSpace.other``): blobs no record owns, and each snapshot's own
    bookkeeping (its dir, overlayfs' work dir), which its size leaves out."""
    held = sum(disk_usage(worker.root / d) for d in ("snapshots", "content"))
    counted = sum(e.record.size for e in entries if e.record.type == REGULAR_TYPE)
    return max(0, held - counted)


def disk_usage(path: Path) -> int:
    """Bytes of disk used below ``path``, each inode once; files that vanish
    while it walks (a build's scratch files, SQLite's -shm) are skipped."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames:
            try:
                st = os.lstat(os.path.join(dirpath, name))
            except FileNotFoundError:
                continue
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_blocks * 512
    return total


_locks: weakref.WeakKeyDictionary[Worker, asyncio.Lock] = weakref.WeakKeyDictionary()


def _lock(worker: Worker) -> asyncio.Lock:
    # one prune/GC at a time per worker: two would race for the same records
    return _locks.setdefault(worker, asyncio.Lock())


async def _remove(
    worker: Worker, entries: Sequence[_Entry], chosen: Sequence[UsageRecord]
) -> list[UsageRecord]:
    by_id = {e.record.id: e for e in entries}
    out: list[UsageRecord] = []
    for rec in chosen:
        freed = await by_id[rec.id].remove()
        if freed >= 0:
            out.append(dataclasses.replace(rec, size=freed))
    return out


# --- the inventory -------------------------------------------------------------------


async def _inventory(worker: Worker, contexts: Path | None) -> list[_Entry]:
    held = worker.cache.held_since()
    out = await _snapshot_entries(worker, held)
    for cm in await asyncio.to_thread(worker.cache_mounts.usage):
        out.append(_cache_mount_entry(worker, cm.key, cm.id, cm.size, cm.last_used))
    files = await asyncio.to_thread(_file_entries, worker, contexts, held)
    out.extend(files)
    return out


def _in_use(last_used: float, held: float | None) -> bool:
    return held is not None and last_used >= held


async def _snapshot_entries(worker: Worker, held: float | None) -> list[_Entry]:
    infos = {i.key: i for i in await worker.snapshots.walk()}
    children: dict[str, int] = {}
    for info in infos.values():
        if info.parent:
            children[info.parent] = children.get(info.parent, 0) + 1
    records = [r for r in worker.cache.records() if r.result.kind == "snapshot"]
    by_ref: dict[str, list[str]] = {}
    for r in records:
        by_ref.setdefault(r.result.ref, []).append(r.key)

    def ids_of(ref: str) -> list[str]:
        return by_ref.get(ref) or [_rid("snapshot:" + ref)]

    async def size_of(ref: str) -> int:
        size = 0
        with contextlib.suppress(Exception):
            size = await worker.snapshots.usage(ref)
        # the layer blobs made from it live and die with it
        for digest in worker.layers.blobs_of(ref):
            with contextlib.suppress(Exception):
                size += worker.content.size(digest)
        return size

    out: list[_Entry] = []
    for r in records:
        ref = r.result.ref
        snap = infos.get(ref)
        if snap is None:
            continue
        parents = tuple(ids_of(snap.parent)) if snap.parent else ()
        shared = bool(children.get(ref)) or len(by_ref[ref]) > 1
        desc = r.description
        if ref.startswith(LAYER_SNAPSHOT_PREFIX) and not desc:
            desc = "pulled layer " + ref.removeprefix(LAYER_SNAPSHOT_PREFIX)
        rec = UsageRecord(
            r.key,
            REGULAR_TYPE,
            await size_of(ref),
            desc,
            r.last_used,
            created=r.created,
            parents=parents[:1],
            in_use=_in_use(r.last_used, held),
            shared=shared,
            usage_count=r.usage_count,
        )
        remove = _remove_cache_record(worker, r.key, ref, r.last_used)
        out.append(_Entry(rec, remove))
    # committed snapshots no record names: the lower layers of pulled images,
    # results whose record was dropped; records too, so du adds up to the disk
    for key, info in infos.items():
        if info.kind != "committed" or key in by_ref:
            continue
        parents = tuple(ids_of(info.parent)) if info.parent else ()
        desc = (
            "pulled layer " + key.removeprefix(LAYER_SNAPSHOT_PREFIX)
            if key.startswith(LAYER_SNAPSHOT_PREFIX)
            else f"snapshot {key}"
        )
        rec = UsageRecord(
            _rid("snapshot:" + key),
            REGULAR_TYPE,
            await size_of(key),
            desc,
            0.0,
            parents=parents[:1],
            # with no use recorded, only a root no build holds may lose it (a
            # running build may have committed it and not yet recorded it)
            in_use=held is not None,
            shared=bool(children.get(key)),
        )
        remove = _remove_snapshot_chain(worker, key)
        out.append(_Entry(rec, remove))
    return out


def _remove_cache_record(worker: Worker, key: str, ref: str, last_used: float) -> Remove:
    async def remove() -> int:
        if not worker.cache.remove_unused_since(key, last_used):
            return -1  # used since it was read: kept
        if any(r.result.ref == ref for r in worker.cache.records()):
            return 0  # another record names the same snapshot
        return await _remove_snapshot_chain(worker, ref)()

    return remove


def _remove_snapshot_chain(worker: Worker, ref: str) -> Remove:
    """Remove snapshot ``ref`` if nothing is built on it, then each parent that
    no record names and nothing else is built on (its layers went with it)."""

    async def remove() -> int:
        freed = 0
        current: str | None = ref
        keep_blobs = _image_blobs(worker)
        while current is not None:
            infos = await worker.snapshots.walk()
            if any(i.parent == current for i in infos):
                break
            found = next((i for i in infos if i.key == current), None)
            if found is None:
                break
            info = found
            with contextlib.suppress(Exception):
                freed += await worker.snapshots.usage(current)
            blobs = worker.layers.blobs_of(current)
            try:
                await worker.snapshots.remove(current)
            except Exception as exc:  # a snapshot someone mounted: it stays
                _log.warning("cannot remove snapshot", snapshot=current, error=str(exc))
                break
            worker.layers.forget_layers(current)
            for digest in blobs:
                if digest not in keep_blobs and not worker.layers.blob_in_use(digest):
                    with contextlib.suppress(Exception):
                        freed += worker.content.size(digest)
                        worker.content.delete(digest)
            parent = info.parent
            if parent is None or any(r.result.ref == parent for r in worker.cache.records()):
                break
            current = parent
        return freed

    return remove


def _image_blobs(worker: Worker) -> set[str]:
    """Blobs a stored image (a tag) uses: never removed by prune or GC."""
    keep: set[str] = set()
    for _, desc in worker.images.list():
        keep.add(desc.digest)
        with contextlib.suppress(Exception):
            manifest, _cfg = read_image(worker.content, desc.digest)
            keep.add(manifest["config"]["digest"])
            keep.update(layer["digest"] for layer in manifest.get("layers", []))
    return keep


async def _orphan_blobs(worker: Worker) -> list[UsageRecord]:
    """``prune --all``: blobs no stored image uses go too (manifests and configs
    of pulled images, exported cache blobs, downloads)."""
    if worker.cache.held_since() is not None:
        return []  # a running build may need any of them (its base's manifest, its layers)
    keep = _image_blobs(worker)
    out: list[UsageRecord] = []
    for digest, size in list(worker.content.walk()):
        if digest not in keep:
            worker.content.delete(digest)
            out.append(UsageRecord(digest, REGULAR_TYPE, size, "blob", 0.0))
    return out


def _cache_mount_entry(worker: Worker, key: str, cid: str, size: int, last: float) -> _Entry:
    rec = UsageRecord(
        "sha256:" + key, CACHE_MOUNT_TYPE, size, cid, last, created=last, mutable=True
    )

    async def remove() -> int:
        if not (worker.cache_mounts.root / key).exists():
            return -1
        freed = await asyncio.to_thread(worker.cache_mounts.remove, key)
        # held by a step: remove() leaves it and frees nothing
        return freed if not (worker.cache_mounts.root / key).exists() else -1

    return _Entry(rec, remove)


# --- files: synced contexts, git, HTTP records (run in a thread) ----------------------


def _file_entries(worker: Worker, contexts: Path | None, held: float | None) -> list[_Entry]:
    out: list[_Entry] = []
    if contexts is not None and contexts.is_dir():
        out.extend(_context_entries(contexts))
    git = worker.root / "git"
    for sub, kind, what in (
        ("checkouts", GIT_CHECKOUT_TYPE, "git checkout"),
        ("repos", INTERNAL_TYPE, "git repository"),
    ):
        d = git / sub
        if not d.is_dir():
            continue
        for p in sorted(d.iterdir()):
            if p.name.startswith(".") or not p.is_dir():
                continue
            mtime = p.stat().st_mtime
            desc = f"{what} {p.name.removesuffix('.git')}"
            if sub == "repos":
                desc = f"{what} {_git_remote(p) or p.name}"
            rec = UsageRecord(
                _rid(f"git:{sub}/{p.name}"),
                kind,
                disk_usage(p),
                desc,
                mtime,
                created=mtime,
                in_use=_in_use(mtime, held),
            )
            out.append(_Entry(rec, _remove_tree(p, mtime)))
    http = worker.root / "http"
    if http.is_dir():
        for p in sorted(http.glob("*.json")):
            out.append(_http_entry(worker, p, held))
    return out


def _git_remote(bare: Path) -> str:
    # the redacted URL git was told; credentials never reach the config
    with contextlib.suppress(OSError):
        for line in (bare / "config").read_text().splitlines():
            if line.strip().startswith("url = "):
                return line.split("=", 1)[1].strip()
    return ""


def _remove_tree(path: Path, seen_mtime: float) -> Remove:
    async def remove() -> int:
        def run() -> int:
            try:
                if path.stat().st_mtime > seen_mtime:
                    return -1  # used since it was read
            except FileNotFoundError:
                return -1
            size = disk_usage(path)
            doomed = path.parent / f".prune-{path.name}-{os.getpid()}"
            os.rename(path, doomed)
            shutil.rmtree(doomed, ignore_errors=True)
            return size

        return await asyncio.to_thread(run)

    return remove


def _http_entry(worker: Worker, path: Path, held: float | None) -> _Entry:
    mtime = path.stat().st_mtime
    url, digest = "", ""
    with contextlib.suppress(OSError, ValueError):
        rec = json.loads(path.read_text())
        url, digest = str(rec.get("url", "")), str(rec.get("digest", ""))
    size = path.stat().st_size
    with contextlib.suppress(Exception):
        size += worker.content.size(digest) if digest else 0
    rec_ = UsageRecord(
        _rid("http:" + path.name),
        REGULAR_TYPE,
        size,
        f"http download {url}" if url else f"http download {path.stem[:12]}",
        mtime,
        created=mtime,
        in_use=_in_use(mtime, held),
    )

    async def remove() -> int:
        def run() -> int:
            try:
                if path.stat().st_mtime > mtime:
                    return -1
                freed = path.stat().st_size
                path.unlink()
            except FileNotFoundError:
                return -1
            if digest and digest not in _image_blobs(worker):
                with contextlib.suppress(Exception):
                    freed += worker.content.size(digest)
                    worker.content.delete(digest)
            return freed

        return await asyncio.to_thread(run)

    return _Entry(rec_, remove)


def _context_entries(root: Path) -> list[_Entry]:
    """The daemon's last synced copy of each client context (``ContextStore``):
    one ``source.local`` record each; held while its lock is (a build reads it)."""
    out: list[_Entry] = []
    for tree in sorted(root.iterdir()):
        if not tree.is_dir() or "." in tree.name:
            continue
        meta = root / f"{tree.name}.json"
        lock = root / f"{tree.name}.lock"
        mtime = (meta if meta.exists() else tree).stat().st_mtime
        rec = UsageRecord(
            _rid("context:" + tree.name),
            LOCAL_SOURCE_TYPE,
            disk_usage(tree),
            "local source for context",
            mtime,
            created=mtime,
            mutable=True,
            in_use=_locked(lock),
        )
        out.append(_Entry(rec, _remove_context(tree, meta, lock)))
    return out


def _locked(lock: Path) -> bool:
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def _remove_context(tree: Path, meta: Path, lock: Path) -> Remove:
    async def remove() -> int:
        def run() -> int:
            fd = os.open(lock, os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600)
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    return -1  # a build is syncing or reading it
                if not tree.is_dir():
                    return -1
                size = disk_usage(tree)
                meta.unlink(missing_ok=True)  # first: a half-removed tree is never trusted
                shutil.rmtree(tree, ignore_errors=True)
                return size
            finally:
                os.close(fd)

        return await asyncio.to_thread(run)

    return remove
