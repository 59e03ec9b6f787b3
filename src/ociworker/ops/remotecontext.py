"""A build context the worker fetches itself (the client sends none): a git
repository (``URL#REF:SUBDIR``) or an HTTP(S) tarball. Either ends as a local
directory that the build uses as a ``LocalContext``, so its steps are keyed by
the files they take, as for a directory the client sent: a rebuild of the same
commit is all cached, a new commit re-runs only what its changed files reach.

The Dockerfile is read from the fetched context here (``-f`` is a path inside
it), because the caller has no copy of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import posixpath
import shutil
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from ociworker.core.build import BuildDefinition
from ociworker.core.gitref import GitRef, is_git_url, parse_git_ref, redact
from ociworker.core.progress import EventSink, ProgressStep
from ociworker.core.session import Secrets, SSHAgents
from ociworker.errors import (
    DockerfileError,
    NotFoundError,
    UnsafePathError,
    UserError,
)
from ociworker.fs.ignore import IGNORE_FILE, parse_ignore
from ociworker.ops.runmount.ssh import AgentSocket, agent_sockets
from ociworker.ops.untar import extract_archive, is_tar_archive
from ociworker.sources.git import GitAuth, GitFetcher, auth_for, subdir_of
from ociworker.sources.http import HttpFetcher


@dataclass(frozen=True)
class RemoteContext:
    root: Path
    #: None when the caller did not want it read (it has the Dockerfile: -f -)
    definition: BuildDefinition | None


@contextlib.asynccontextmanager
async def git_auth(
    ref: GitRef, secrets: Secrets, ssh: SSHAgents, scratch: Path
) -> AsyncIterator[GitAuth]:
    """What git may authenticate with for ``ref``: for ssh, a socket proxied
    to the session's default agent while the fetch runs."""
    if ref.scheme == "ssh" and ssh.has_agent("default"):
        async with agent_sockets(scratch, ssh, [AgentSocket("default")]) as paths:
            yield await auth_for(ref, secrets, str(paths[0]))
    else:
        yield await auth_for(ref, secrets)


async def open_remote_context(
    url: str,
    *,
    git: GitFetcher,
    store: Path,
    scratch: Path,
    dockerfile: str | None,
    keep_git_dir: bool,
    secrets: Secrets,
    ssh: SSHAgents,
    events: EventSink,
    http: HttpFetcher,
    want_definition: bool = True,
) -> RemoteContext:
    """Fetch the context ``url`` names and read its Dockerfile (``dockerfile``
    inside the context; default ``Dockerfile``) when ``want_definition``."""
    if is_git_url(url):
        ref = parse_git_ref(url)
        with ProgressStep(events, f"[internal] load git source {ref.shown}"):
            async with git_auth(ref, secrets, ssh, scratch) as auth:
                resolved = await git.resolve(ref, auth)
                checkout = await git.checkout(ref, resolved, auth, keep_git_dir=keep_git_dir)
            root = subdir_of(checkout, ref.subdir, ref.shown)
        if not want_definition:
            return RemoteContext(root, None)
        return RemoteContext(root, read_context_definition(root, dockerfile, ref.shown))
    if not url.startswith(("http://", "https://")):
        raise UserError(f"unsupported build context URL {redact(url)!r}")
    shown = redact(url)
    with ProgressStep(events, f"[internal] load remote build context {shown}"):
        ctx = await _tarball_context(url, shown, store, dockerfile, http)
    return ctx if want_definition else RemoteContext(ctx.root, None)


def read_context_definition(root: Path, dockerfile: str | None, shown: str) -> BuildDefinition:
    """The Dockerfile at ``dockerfile`` inside ``root`` (no way out of it, even
    through a symlink) and the ignore patterns beside it or at the root."""
    root = Path(os.path.realpath(root))
    rel = posixpath.normpath(dockerfile or "Dockerfile")
    if rel.startswith("/") or rel == ".." or rel.startswith("../"):
        raise UnsafePathError(f"context {shown}: Dockerfile {dockerfile!r} is outside the context")
    path = Path(os.path.realpath(root / rel))
    if not path.is_relative_to(root):
        raise UnsafePathError(f"context {shown}: Dockerfile {dockerfile!r} is outside the context")
    try:
        text = path.read_text(encoding="utf-8")
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        raise NotFoundError(f"context {shown}: no Dockerfile at {rel!r}") from None
    except UnicodeDecodeError as exc:
        raise DockerfileError(f"{rel} in {shown} is not UTF-8 text: {exc}") from None
    patterns: tuple[str, ...] = ()
    for candidate in (path.with_name(path.name + IGNORE_FILE), root / IGNORE_FILE):
        real = Path(os.path.realpath(candidate))
        if real.is_relative_to(root) and real.is_file():
            patterns = parse_ignore(real.read_bytes().decode("utf-8", errors="replace"))
            break
    return BuildDefinition(text, path.name, patterns)


async def _tarball_context(
    url: str, shown: str, store: Path, dockerfile: str | None, http: HttpFetcher
) -> RemoteContext:
    """A tarball (plain, gzip, bzip2, xz: told by its first bytes) extracted
    safely; anything else is the Dockerfile itself, with an empty context (as
    BuildKit reads an http context). Fetched as ``ADD URL`` is (the same
    ETag / Last-Modified record): an unchanged remote answers 304, and its
    extraction, kept by digest, is used again."""
    got = await http.fetch(url)
    blob = http.blob_path(got.digest)
    store.mkdir(parents=True, exist_ok=True)
    dest = store / got.digest.removeprefix("sha256:")
    if not dest.is_dir():
        if await asyncio.to_thread(is_tar_archive, blob):
            await asyncio.to_thread(extract_context_tar, blob, dest, shown)
        else:
            return await asyncio.to_thread(_dockerfile_only, blob, store, shown)
    return RemoteContext(dest, read_context_definition(dest, dockerfile, shown))


def extract_context_tar(archive: Path, dest: Path, shown: str) -> None:
    """Extract a context tarball into ``dest`` (made whole under a temporary
    name); an entry that climbs out (``../``) refuses the whole archive."""
    tmp = dest.with_name(f".tmp-{uuid.uuid4().hex}")
    tmp.mkdir(mode=0o755)
    try:
        try:
            extract_archive(archive, tmp, "/")
        except UserError as exc:
            msg = str(exc).removeprefix("ADD: ")
            raise type(exc)(f"build context {shown}: {msg}") from None
        try:
            os.rename(tmp, dest)
        except OSError:
            if not dest.is_dir():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def unpack_stdin_context(data: bytes, tmp: Path) -> tuple[Path, Path | None]:
    """``build -``: a tar on stdin (plain or compressed) is the context, else
    stdin is a Dockerfile and the context is empty (as ``docker build -``).
    The context dir and, for a Dockerfile, its path (outside the context)."""
    ctx = tmp / "context"
    archive = tmp / "stdin"
    archive.write_bytes(data)
    try:
        if is_tar_archive(archive):
            extract_context_tar(archive, ctx, "from stdin")
            return ctx, None
    finally:
        archive.unlink()
    if not data.strip():
        raise UserError("the build context read from stdin (-) is empty")
    ctx.mkdir()
    dockerfile = tmp / "Dockerfile"
    dockerfile.write_bytes(data)
    return ctx, dockerfile


def _dockerfile_only(part: Path, store: Path, shown: str) -> RemoteContext:
    try:
        text = part.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(
            f"build context {shown} is neither a tar archive nor a Dockerfile (UTF-8 text)"
        ) from None
    empty = store / "empty"
    empty.mkdir(exist_ok=True)
    return RemoteContext(empty, BuildDefinition(text, "Dockerfile", ()))
