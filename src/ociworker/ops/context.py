"""Local build contexts as the op handlers see them: the ``LocalContext`` a
session hands the worker, the checksum of the files a step selects from one,
and the cache key that uses it; plus the two checks every handler makes on its
inputs (an input index in range, a local source present in the session)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import stat
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from ociworker.core.digest import digest_of
from ociworker.core.graph import Copy, OpSpec, SourceOp, Vertex
from ociworker.errors import NotFoundError, UserError
from ociworker.fs import walk
from ociworker.fs.paths import secure_join
from ociworker.ops import fileactions as fileops
from ociworker.solver.scheduler import Job, Result

#: path, device, inode, size, mtime_ns, ctime_ns: a file's identity for its hash
FileKey = tuple[str, int, int, int, int, int]
#: a file's times must be this much older than its hashing for the hash to be kept
#: beyond the process: one written in the same clock tick as it was hashed could
#: change again without moving its times (the "racy git" case)
SETTLED_NS = 2_000_000_000


class FileHashMemo(Protocol):
    """File hashes kept beyond the process (``cachedb.filehashes``)."""

    def under(self, directory: str) -> dict[FileKey, str]:
        """Every hash kept for a file below ``directory`` (one query for a context)."""
        ...

    def put_many(self, items: Iterable[tuple[FileKey, str]]) -> None: ...


def settled(key: FileKey, now_ns: int) -> bool:
    """Whether ``key``'s times are old enough for its hash to be kept."""
    return max(key[4], key[5]) < now_ns - SETTLED_NS


@dataclass(frozen=True)
class LocalContext:
    """A local source as the session hands it to the worker."""

    root: Path
    ignore: walk.Ignore | None


class ContextChecksums:
    """Checksums of what steps select from local contexts, with a memo of
    per-file hashes (kept while a file's inode, size and times are unchanged);
    ``stored``: a memo that outlives the process (``cachedb.filehashes``)."""

    def __init__(self, stored: FileHashMemo | None = None) -> None:
        self._memo: dict[FileKey, str] = {}
        self._stored = stored
        self._lock = threading.Lock()
        self._new: list[tuple[FileKey, str]] = []
        self._loaded: set[str] = set()  # context roots whose stored hashes are in _memo

    def content_checksum(self, ctx: LocalContext, copies: Sequence[Copy]) -> str:
        """Digest of the files that ``copies`` select from a local context (content,
        names, modes and link targets; not mtimes), reusing per-file hashes while the
        file's inode, size and times are unchanged."""
        src = walk.Source(ctx.root, ctx.ignore, is_context=True)
        self._load(ctx.root)
        h = hashlib.sha256()
        for copy in copies:
            h.update(b"\x00pattern\x00" + copy.src.encode())
            # the whole subtrees that decide what the copy takes (with --parents a
            # ** reaches below what the pattern names literally)
            for rel in fileops.source_roots(src, copy):
                try:
                    entries = list(walk.walk_selected(src, rel, follow=True))
                except NotFoundError:
                    h.update(b"\x00missing\x00" + rel.encode())
                    continue
                for path, st in entries:
                    h.update(f"\x00{path}\x00{stat.S_IMODE(st.st_mode):o}\x00".encode())
                    if stat.S_ISREG(st.st_mode):
                        h.update(self._file_hash(ctx.root, path, st).encode())
                    elif stat.S_ISLNK(st.st_mode):
                        link = os.readlink(secure_join(ctx.root, path, follow_last=False))
                        h.update(b"L" + link.encode())
                    elif stat.S_ISDIR(st.st_mode):
                        h.update(b"D")
        self._save()
        return "sha256:" + h.hexdigest()

    def _load(self, root: Path) -> None:
        """The stored hashes of the files below ``root``, in one query (a lookup per
        file would cost more than the rest of an unchanged rebuild's key)."""
        if self._stored is None:
            return
        key = str(root)
        with self._lock:
            if key in self._loaded:
                return
            self._loaded.add(key)
        self._memo.update(self._stored.under(key))

    def close(self) -> None:
        close = getattr(self._stored, "close", None)
        if close is not None:
            close()

    def _save(self) -> None:
        """Hand the hashes made since the last call to the stored memo, in one write."""
        if self._stored is None:
            return
        with self._lock:
            new, self._new = self._new, []
        now = time.time_ns()
        self._stored.put_many((k, d) for k, d in new if settled(k, now))

    def selected_files(self, ctx: LocalContext, copies: Sequence[Copy]) -> dict[str, str]:
        """The regular files (and links) ``copies`` select, each with the digest of
        its content (or link target): the names ``--explain-cache`` reports, for
        the same walk the key covered."""
        src = walk.Source(ctx.root, ctx.ignore, is_context=True)
        out: dict[str, str] = {}
        for copy in copies:
            for rel in fileops.source_roots(src, copy):
                try:
                    entries = list(walk.walk_selected(src, rel, follow=True))
                except NotFoundError:
                    continue
                for path, st in entries:
                    mode = f"{stat.S_IMODE(st.st_mode):o}"
                    if stat.S_ISREG(st.st_mode):
                        # 64 bits tell a changed file from an unchanged one; the
                        # key itself covers the whole digest (records stay small)
                        out[path] = f"{mode}:{self._file_hash(ctx.root, path, st)[:16]}"
                    elif stat.S_ISLNK(st.st_mode):
                        link = os.readlink(secure_join(ctx.root, path, follow_last=False))
                        out[path] = f"{mode}:L{link[:64]}"
        return out

    def _file_hash(self, root: Path, rel: str, st: os.stat_result) -> str:
        real = secure_join(root, rel, follow_last=True)
        key = (str(real), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        cached = self._memo.get(key)
        if cached is not None:
            return cached
        h = hashlib.sha256()
        with open(real, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        self._memo[key] = h.hexdigest()
        if self._stored is not None:
            with self._lock:
                self._new.append((key, h.hexdigest()))
        return h.hexdigest()


def local_context(job: Job, name: str) -> LocalContext:
    """The session's local source ``name``."""
    ctx = job.locals.get(name)
    if not isinstance(ctx, LocalContext):
        raise NotFoundError(f"no local source named {name!r} in this session")
    return ctx


def step_input(inputs: Sequence[Result], index: int, refusal: Callable[[int], str]) -> Result:
    """Input ``index`` of a step; ``refusal(count of inputs)`` is the error's
    text when the step has no such input (it says what named the input)."""
    if index >= len(inputs):
        raise UserError(refusal(len(inputs)))
    return inputs[index]


def root_parent(inputs: Sequence[Result]) -> str | None:
    """The committed snapshot a step's new snapshot starts from (input 0), or None."""
    if not inputs or inputs[0].kind == "none":
        return None
    if inputs[0].kind != "snapshot":
        raise UserError("a step's root must be a snapshot")
    return inputs[0].ref


async def context_keyed(
    checksums: ContextChecksums,
    vertex: Vertex,
    input_keys: Sequence[str],
    job: Job,
    selected: Callable[[OpSpec, int], list[Copy]],
) -> str:
    """The step's cache key, with each local-context input keyed by the content
    of the files the step selects from it (``selected(op, input index)``), not by
    the whole context: a change elsewhere in the context invalidates nothing,
    a change to a selected file does."""
    keys = list(input_keys)
    for i, inp in enumerate(vertex.inputs):
        ctx = _local_context(inp, job)
        if ctx is not None:
            keys[i] = await asyncio.to_thread(
                checksums.content_checksum, ctx, selected(vertex.op, i)
            )
    return digest_of({"op": vertex.op.to_json(), "inputs": keys})


def _local_context(inp: Vertex | None, job: Job) -> LocalContext | None:
    if inp is None or not isinstance(inp.op, SourceOp):
        return None
    if not inp.op.identifier.startswith("local://"):
        return None
    ctx = job.locals.get(inp.op.identifier.removeprefix("local://"))
    return ctx if isinstance(ctx, LocalContext) else None
