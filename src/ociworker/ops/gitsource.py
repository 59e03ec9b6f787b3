"""``git://URL#REF:SUBDIR`` sources (``ADD GIT_URL /dst``): keyed by the commit
the ref names now (``git ls-remote``, no pack data), so a rebuild of the same
commit runs nothing and fetches nothing; run, the commit's files (from the
fetcher's checkout cache) become a snapshot."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

from ociworker.core.digest import digest_of
from ociworker.core.gitref import GitRef, parse_git_ref
from ociworker.core.graph import SourceOp
from ociworker.core.mounts import Mount
from ociworker.errors import UserError
from ociworker.ops.remotecontext import git_auth
from ociworker.snapshot import access
from ociworker.snapshot.base import Mounter, Snapshotter
from ociworker.solver.scheduler import Job, Result
from ociworker.sources.git import GitFetcher, Resolved, subdir_of

_MEMO = 1024


def git_ref_of(op: SourceOp) -> GitRef:
    return parse_git_ref(op.identifier.removeprefix("git://"))


class GitSources:
    def __init__(
        self, fetcher: GitFetcher, snapshots: Snapshotter, mounter: Mounter, scratch: Path
    ) -> None:
        self.fetcher = fetcher
        self.snapshots = snapshots
        self.mounter = mounter
        self.scratch = scratch
        #: (job, identifier) -> the commit its cache key was computed with, so
        #: the run checks out exactly that commit even if the ref moved since;
        #: a cache hit never runs, so the oldest entries are dropped past a bound
        self._resolved: OrderedDict[tuple[str, str], Resolved] = OrderedDict()

    async def _resolve(self, op: SourceOp, job: Job) -> Resolved:
        key = (job.id, op.identifier)
        found = self._resolved.get(key)
        if found is None:
            ref = git_ref_of(op)
            async with git_auth(ref, job.secrets, job.ssh, self.scratch) as auth:
                found = await self.fetcher.resolve(ref, auth)
            checksum = op.attr("git.checksum")
            if checksum:
                # before the key: a cached result of another commit is never used
                found.check(checksum, ref.shown)
            self._resolved[key] = found
            while len(self._resolved) > _MEMO:
                self._resolved.popitem(last=False)
        return found

    async def cache_key(self, op: SourceOp, job: Job) -> str:
        ref = git_ref_of(op)
        resolved = await self._resolve(op, job)
        return digest_of(
            {
                "git": ref.key,
                "commit": resolved.commit,
                "subdir": ref.subdir,
                "keepgitdir": op.attr("git.keepgitdir") == "true",
            }
        )

    async def run(self, op: SourceOp, job: Job) -> Result:
        ref = git_ref_of(op)
        resolved = await self._resolve(op, job)
        self._resolved.pop((job.id, op.identifier), None)
        keep = op.attr("git.keepgitdir") == "true"
        async with git_auth(ref, job.secrets, job.ssh, self.scratch) as auth:
            checkout = await self.fetcher.checkout(ref, resolved, auth, keep_git_dir=keep)
        src = subdir_of(checkout, ref.subdir, ref.shown)

        async def fill(mounts: Sequence[Mount]) -> None:
            async with self.mounter.mounted(mounts) as dest:
                await asyncio.to_thread(_copy_tree, src, dest)

        return Result("snapshot", await access.new_snapshot(self.snapshots, None, fill))


def _copy_tree(src: Path, dest: Path) -> None:
    try:
        shutil.copytree(src, dest, symlinks=True, dirs_exist_ok=True)
    except shutil.Error as exc:
        raise UserError(f"cannot copy the git checkout: {exc}") from None
    with contextlib.suppress(OSError):
        shutil.copystat(src, dest)
