"""The handler of ``HttpSourceOp`` (``ADD URL``): a snapshot holding the one
downloaded file, as BuildKit's http source makes it (mode 0600, owned by root,
mtime from Last-Modified or the epoch).

The cache key asks the server first (a conditional request: nothing is
downloaded when the recorded ETag / Last-Modified still hold) and is made of
the content's digest, the file's name and mtime: an unchanged remote file
keeps the steps after it cached, a changed one re-runs them.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ociworker.content.store import ContentStore
from ociworker.core.digest import digest_of
from ociworker.core.graph import HttpSourceOp, Vertex
from ociworker.core.mounts import Mount
from ociworker.fs.paths import secure_join
from ociworker.ops.parts import HandlerBase
from ociworker.snapshot import access
from ociworker.snapshot.base import Mounter, Snapshotter
from ociworker.solver.scheduler import Job, Result
from ociworker.sources.http import Fetched, HttpFetcher

#: BuildKit's http source writes the file with this mode unless told otherwise
DEFAULT_PERM = 0o600
#: resolved downloads remembered between a step's cache key and its run
_KEPT = 256


@dataclass(frozen=True)
class HttpDeps:
    content: ContentStore
    snapshots: Snapshotter
    mounter: Mounter
    #: where the per-URL records (ETag, Last-Modified, digest) live; None: none kept
    http_state: Path | None = None


class HttpHandler(HandlerBase[HttpDeps]):
    deps_type = HttpDeps

    def __init__(self, deps: HttpDeps) -> None:
        super().__init__(deps)
        self.fetcher = HttpFetcher(deps.content, deps.http_state, None)
        #: what the cache key resolved, for the run that follows it
        self._resolved: dict[tuple[str, str], Fetched] = {}

    async def _resolve(self, op: HttpSourceOp) -> Fetched:
        return await self.fetcher.fetch(op.url, op.filename, op.checksum)

    async def cache_key(self, vertex: Vertex, input_keys: Sequence[str], job: Job) -> str:
        op = vertex.op
        assert isinstance(op, HttpSourceOp)
        got = await self._resolve(op)
        self._resolved[(job.id, vertex.digest)] = got
        while len(self._resolved) > _KEPT:
            # a cache hit never runs the step, so its entry is never popped: the
            # oldest go (a run that misses its entry just asks the server again)
            del self._resolved[next(iter(self._resolved))]
        # The content, not the URL's text alone: a changed remote file is a new key.
        return digest_of(
            {
                "op": op.to_json(),
                "content": got.digest,
                "filename": got.filename,
                "mtime": got.mtime,
            }
        )

    async def run(self, vertex: Vertex, inputs: Sequence[Result], job: Job) -> Result:
        op = vertex.op
        assert isinstance(op, HttpSourceOp)
        got = self._resolved.pop((job.id, vertex.digest), None) or await self._resolve(op)
        d = self.deps
        blob = d.content.blob_path(got.digest)

        async def edit(mounts: Sequence[Mount]) -> None:
            async with d.mounter.mounted(mounts) as root:
                await asyncio.to_thread(_write_file, root, got, blob)

        return Result("snapshot", await access.new_snapshot(d.snapshots, None, edit))


def _write_file(root: Path, got: Fetched, blob: Path) -> None:
    out = secure_join(root, got.filename, follow_last=False)
    with contextlib.suppress(FileNotFoundError):
        out.unlink()
    shutil.copyfile(blob, out)
    os.chmod(out, DEFAULT_PERM)
    os.chown(out, 0, 0)
    mtime = got.mtime if got.mtime is not None else 0.0
    os.utime(out, (mtime, mtime))
