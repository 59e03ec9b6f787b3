"""The git fetcher and the git source's cache key, on a repository made here
with the ``git`` command (file://): what they resolve is checked against what
``git rev-parse`` says, and a second checkout of a commit fetches nothing."""

from __future__ import annotations

import os
import subprocess
import typing
from pathlib import Path

import pytest

from ociworker.core.gitref import parse_git_ref
from ociworker.core.graph import SourceOp
from ociworker.errors import DigestMismatchError, NotFoundError, UnsafePathError, UserError
from ociworker.ops.gitsource import GitSources
from ociworker.snapshot.base import Mounter, Snapshotter
from ociworker.solver.scheduler import Job
from ociworker.sources.git import GitAuth, GitFetcher, subdir_of

ENV = {
    **os.environ,
    "GIT_AUTHOR_NAME": "t",
    "GIT_AUTHOR_EMAIL": "t@example.com",
    "GIT_COMMITTER_NAME": "t",
    "GIT_COMMITTER_EMAIL": "t@example.com",
    "GIT_CONFIG_NOSYSTEM": "1",
}


def _git(cwd: Path, *args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=cwd, env=ENV, capture_output=True, text=True, check=True
    ).stdout.strip()


def _commit(work: Path, name: str, text: str) -> str:
    (work / name).write_text(text)
    _git(work, "add", "-A")
    _git(work, "commit", "-q", "-m", name)
    return _git(work, "rev-parse", "HEAD")


@pytest.fixture
def work(tmp_path: Path) -> Path:
    w = tmp_path / "work"
    w.mkdir()
    _git(w, "init", "-q", "-b", "main")
    _commit(w, "a.txt", "one\n")
    os.symlink("../../../..", w / "up")
    _commit(w, "b.txt", "two\n")
    return w


async def test_resolve_and_checkout_are_cached_by_commit(work: Path, tmp_path: Path) -> None:
    fetcher = GitFetcher(tmp_path / "git")
    ref = parse_git_ref(f"file://{work}#main")
    resolved = await fetcher.resolve(ref, GitAuth())
    assert resolved.commit == _git(work, "rev-parse", "main")
    checkout = await fetcher.checkout(ref, resolved, GitAuth())
    assert (checkout / "a.txt").read_text() == "one\n"
    assert not (checkout / ".git").exists()
    fetched = fetcher.fetches
    assert await fetcher.checkout(ref, resolved, GitAuth()) == checkout
    assert fetcher.fetches == fetched

    kept = await fetcher.checkout(ref, resolved, GitAuth(), keep_git_dir=True)
    assert _git(kept, "rev-parse", "HEAD") == resolved.commit
    # the kept .git names no path of the worker's cache
    assert not (kept / ".git" / "FETCH_HEAD").exists()

    first = _git(work, "rev-parse", "main~1")
    short = await fetcher.resolve(parse_git_ref(f"file://{work}#{first[:7]}"), GitAuth())
    assert short.commit == first


async def test_missing_ref_and_escaping_subdir(work: Path, tmp_path: Path) -> None:
    fetcher = GitFetcher(tmp_path / "git")
    with pytest.raises(NotFoundError, match=f"'nope' not found in file://{work}"):
        await fetcher.resolve(parse_git_ref(f"file://{work}#nope"), GitAuth())
    ref = parse_git_ref(f"file://{work}#main:up")
    checkout = await fetcher.checkout(ref, await fetcher.resolve(ref, GitAuth()), GitAuth())
    with pytest.raises(UnsafePathError, match="outside the repository"):
        subdir_of(checkout, "up", ref.shown)


async def test_git_source_key_is_the_commit_subdir_and_keep_git_dir(
    work: Path, tmp_path: Path
) -> None:
    sources = GitSources(
        GitFetcher(tmp_path / "git"),
        typing.cast(Snapshotter, None),  # keys take no snapshot
        typing.cast(Mounter, None),
        tmp_path,
    )

    async def key(url: str, keep: bool = False, job: str = "j") -> str:
        op = SourceOp("git://" + url, (("git.keepgitdir", "true" if keep else "false"),))
        return await sources.cache_key(op, Job(id=job))

    url = f"file://{work}#main"
    commit = _git(work, "rev-parse", "main")
    same = await key(url)
    assert await key(f"file://{work}#{commit}", job="j2") == same
    assert await key(url, keep=True) != same
    assert await key(url + ":sub") != same
    _commit(work, "c.txt", "three\n")
    assert await key(url, job="j3") != same


async def test_a_fetcher_that_refuses_file_urls(work: Path, tmp_path: Path) -> None:
    fetcher = GitFetcher(tmp_path / "git", allow_file=False)
    commit = _git(work, "rev-parse", "main")
    for frag in ("main", commit):
        with pytest.raises(UserError, match="file:// URLs would read the worker's own disk"):
            await fetcher.resolve(parse_git_ref(f"file://{work}#{frag}"), GitAuth())


async def test_annotated_tag_resolves_to_its_commit_and_checksums_pin_it(
    work: Path, tmp_path: Path
) -> None:
    """An annotated tag is keyed by its commit (``git rev-parse TAG^{commit}``);
    ``ADD --checksum`` takes the commit, a prefix of it, or the tag object, and
    a wrong one fails before any key exists, naming what was wanted and got."""
    _git(work, "tag", "-a", "-m", "rel", "v1")
    commit, tag = _git(work, "rev-parse", "v1^{commit}"), _git(work, "rev-parse", "v1")
    assert commit != tag
    fetcher = GitFetcher(tmp_path / "git")
    resolved = await fetcher.resolve(parse_git_ref(f"file://{work}#v1"), GitAuth())
    assert (resolved.commit, resolved.tag) == (commit, tag)
    sources = GitSources(
        fetcher, typing.cast(Snapshotter, None), typing.cast(Mounter, None), tmp_path
    )

    async def key(checksum: str, job: str) -> str:
        op = SourceOp(
            f"git://file://{work}#v1",
            (("git.keepgitdir", "false"), ("git.checksum", checksum)),
        )
        return await sources.cache_key(op, Job(id=job))

    # the checksum pins the source; it is no part of the key (BuildKit's cache matches)
    assert await key(commit, "a") == await key(commit[:7], "b") == await key(tag, "c")
    wrong = _git(work, "rev-parse", "main~1")
    with pytest.raises(DigestMismatchError) as exc:
        await key(wrong, "d")
    assert f"expected checksum to match {wrong}, got {tag} or {commit}" in str(exc.value)
