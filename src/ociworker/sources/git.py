"""Git sources: which strings name a git repository (read as BuildKit's
``gitutil.ParseGitRef`` reads them, plus ``file://``), and a commit of one
fetched into a checkout cached by commit, through the ``git`` command.

Layout under the fetcher's root (``<worker root>/git``)::

    repos/<sha256 of the URL>/   bare repositories, one per remote (credentials
                                 are no part of the key), holding what was fetched
    repos/<sha256>.init.lock     taken while one is created (ociworker.ready: done)
    checkouts/<commit>[.git]     the commit's files (with ``.git`` when kept);
                                 written whole under a temporary name, then renamed
    home/                        git's HOME: no user or system config applies

Credentials never reach git's command line, its config, a path or a log: a
URL's user and password are taken out of it and handed, with a token secret,
to ``GIT_ASKPASS`` through the environment; every text shown is redacted.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import os
import shutil
import stat
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ociworker.core.gitref import (
    FULL_SHA_RE,
    SHORT_SHA_RE,
    TOKEN_SECRET,
    TOKEN_USER,
    GitRef,
    redact,
)
from ociworker.core.session import Secrets
from ociworker.errors import (
    DigestMismatchError,
    NotFoundError,
    UnsafePathError,
    UserError,
    WorldError,
)


@dataclass(frozen=True)
class GitAuth:
    """What git may authenticate with: a user and password (or token) for
    http(s), an ssh agent socket for ssh."""

    username: str = field(default="", repr=False)
    password: str = field(default="", repr=False)
    ssh_socket: str = ""


async def auth_for(ref: GitRef, secrets: Secrets, ssh_socket: str = "") -> GitAuth:
    """The URL's own credentials, else the ``GIT_AUTH_TOKEN.<host>`` (or
    ``GIT_AUTH_TOKEN``) secret, sent as BuildKit sends it (x-access-token)."""
    if ref.username or ref.password:
        return GitAuth(ref.username, ref.password, ssh_socket)
    for secret_id in (f"{TOKEN_SECRET}.{ref.host}", TOKEN_SECRET):
        token = await secrets.get_secret(secret_id)
        if token:
            return GitAuth(TOKEN_USER, token.decode().strip(), ssh_socket)
    return GitAuth(ssh_socket=ssh_socket)


_ASKPASS = """#!/bin/sh
# git asks "Username for ...:" then "Password for ...:"; the values are in the
# environment of this git process only, never in a file or on a command line
case "$1" in
  Username*) printf '%s\\n' "$OCIWORKER_GIT_USERNAME" ;;
  *) printf '%s\\n' "$OCIWORKER_GIT_PASSWORD" ;;
esac
"""


#: git's advice after a failed remote read: says nothing about this failure
_ADVICE = frozenset(
    {"Please make sure you have the correct access rights", "and the repository exists."}
)


def _reason(detail: str, status: int | None) -> str:
    """The telling part of git's stderr: its last line but the generic advice,
    after ssh's refusal when there is one (it says which user and why)."""
    lines = [line.strip() for line in detail.splitlines()]
    lines = [line for line in lines if line and line not in _ADVICE]
    if not lines:
        return f"exit status {status}"
    denied = [line for line in lines if "Permission denied" in line]
    return "; ".join(dict.fromkeys([*denied[:1], lines[-1]]))


def _ssh_hint(detail: str, auth: GitAuth) -> str:
    if "Permission denied (publickey" in detail and not auth.ssh_socket:
        return " (no ssh agent was lent to the build: give --ssh default)"
    return ""


@dataclass(frozen=True)
class Resolved:
    """A ref resolved to a commit; ``refname`` is what to fetch (None: a commit)."""

    commit: str
    refname: str | None
    #: the annotated tag object the ref names (its commit is ``commit``)
    tag: str | None = None

    def check(self, checksum: str, shown: str) -> None:
        """``ADD --checksum=HEX GIT_URL``: as BuildKit, ``checksum`` must be (a
        prefix of) the commit's name or the annotated tag's; else the error names
        what was wanted and what the ref names."""
        want = checksum.lower()
        if self.commit.startswith(want) or (self.tag is not None and self.tag.startswith(want)):
            return
        got = f"{self.tag} or {self.commit}" if self.tag else self.commit
        raise DigestMismatchError(f"{shown}: expected checksum to match {checksum}, got {got}")


#: a full fetch: every ref the remote advertises (pull request heads too), in
#: which a short commit id is then looked for
_ALL_REFS = ("+refs/*:refs/all/*",)


def _shallow_fetch(bare: Path) -> list[str]:
    return ["--git-dir", str(bare), "fetch", "-q", "--no-tags", "--depth", "1"]


class GitFetcher:
    """Resolves refs and fetches commits into checkouts cached by commit."""

    def __init__(self, root: Path, *, allow_file: bool = True) -> None:
        self.root = root
        #: file:// URLs read this host's disk: a daemon refuses them to its clients
        self.allow_file = allow_file
        #: upload-pack runs the fetcher made (a test or ``du`` may count them)
        self.fetches = 0

    # -- running git ------------------------------------------------------

    def _env(self, auth: GitAuth) -> dict[str, str]:
        home = self.root / "home"
        askpass = self.root / "askpass"
        if not askpass.exists():
            home.mkdir(parents=True, exist_ok=True)
            tmp = askpass.with_name(f".askpass-{uuid.uuid4().hex}")
            tmp.write_text(_ASKPASS)
            tmp.chmod(0o700)
            os.replace(tmp, askpass)
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(home),
            "GIT_CONFIG_NOSYSTEM": "1",
            "GIT_TERMINAL_PROMPT": "0",
            "GIT_ASKPASS": str(askpass),
            "OCIWORKER_GIT_USERNAME": auth.username,
            "OCIWORKER_GIT_PASSWORD": auth.password,
            "LC_ALL": "C",
            # a host key first seen is recorded; a changed one is refused
            "GIT_SSH_COMMAND": "ssh -o BatchMode=yes -o StrictHostKeyChecking=accept-new "
            f"-o UserKnownHostsFile={home / 'known_hosts'}",
        }
        if auth.ssh_socket:
            env["SSH_AUTH_SOCK"] = auth.ssh_socket
        return env

    async def _git(
        self,
        args: Sequence[str],
        auth: GitAuth,
        shown: str,
        *,
        cwd: Path | None = None,
        what: str = "",
        file_protocol: bool = False,
    ) -> str:
        cmd = ["git", "-c", "credential.helper="]
        # git refuses file:// for submodules since 2.38.1; a file:// remote's own
        # submodules are as trusted as the remote
        cmd += ["-c", f"protocol.file.allow={'always' if file_protocol else 'user'}"]
        cmd += list(args)
        try:
            proc = await asyncio.create_subprocess_exec(
                *cmd,
                cwd=cwd,
                env=self._env(auth),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
        except FileNotFoundError:
            raise WorldError("git sources need the git command, which is not installed") from None
        out, err = await proc.communicate()
        if proc.returncode != 0:
            # a lone user name is a token (https://TOKEN@host/...)
            hidden = [auth.password] if auth.password else [auth.username]
            detail = redact(err.decode(errors="replace").strip(), hidden)
            raise UserError(
                f"git {what or args[0]} {shown} failed: {_reason(detail, proc.returncode)}"
                + _ssh_hint(detail, auth)
            )
        return out.decode(errors="replace")

    @contextlib.asynccontextmanager
    async def _locked(self, path: Path) -> AsyncIterator[None]:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            await asyncio.to_thread(fcntl.flock, fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _bare(self, ref: GitRef) -> Path:
        return self.root / "repos" / hashlib.sha256(ref.key.encode()).hexdigest()

    async def _ensure_bare(self, ref: GitRef) -> Path:
        bare = self._bare(ref)
        # written last: a repository another step is still setting up is not ready
        ready = bare / "ociworker.ready"
        if ready.exists():
            return bare
        # Steps of one build (several ADDs of one remote) or two builds may
        # create it at once: two `git init`s of one dir race on its config.
        async with self._locked(bare.with_name(bare.name + ".init.lock")):
            if not ready.exists():
                bare.mkdir(parents=True, exist_ok=True)
                await self._git(
                    ["init", "-q", "--bare", str(bare)], GitAuth(), ref.shown, what="init"
                )
                # checkouts fetch a commit from here by its id
                await self._git(
                    ["--git-dir", str(bare), "config", "uploadpack.allowAnySHA1InWant", "true"],
                    GitAuth(),
                    ref.shown,
                    what="config",
                )
                ready.touch()
        return bare

    async def _has_commit(self, bare: Path, commit: str) -> str | None:
        proc = await asyncio.create_subprocess_exec(
            "git",
            "--git-dir",
            str(bare),
            "rev-parse",
            "--verify",
            "-q",
            f"{commit}^{{commit}}",
            env=self._env(GitAuth()),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
        )
        out, _ = await proc.communicate()
        return out.decode().strip() if proc.returncode == 0 else None

    # -- resolving and fetching ------------------------------------------

    async def resolve(self, ref: GitRef, auth: GitAuth) -> Resolved:
        """The commit ``ref.ref`` names now (``git ls-remote``: no pack data).
        A full commit id needs no remote; a short one is looked up in what was
        fetched before, else after fetching everything (as BuildKit does)."""
        if ref.scheme == "file" and not self.allow_file:
            raise UserError(
                f"git source {ref.shown}: file:// URLs would read the worker's own disk, "
                "which this daemon does not allow (serve the repository over git, http or ssh)"
            )
        name = ref.ref or "HEAD"
        if FULL_SHA_RE.match(name):
            return Resolved(name.lower(), None)
        # NAME^{} too: ls-remote lists an annotated tag's commit only when asked
        # (its pattern matches whole path components), and the commit is the key
        out = await self._git(["ls-remote", "--", ref.remote, name, name + "^{}"], auth, ref.shown)
        found: dict[str, str] = {}
        for line in out.splitlines():
            sha, _, refname = line.partition("\t")
            found[refname] = sha
        for candidate in (name, f"refs/tags/{name}", f"refs/heads/{name}"):
            peeled = found.get(candidate + "^{}")
            if peeled:
                return Resolved(peeled, candidate, tag=found.get(candidate))
            if candidate in found:
                return Resolved(found[candidate], candidate)
        if SHORT_SHA_RE.match(name):
            bare = await self._ensure_bare(ref)
            async with self._locked(bare / "ociworker.lock"):
                commit = await self._has_commit(bare, name)
                if commit is None:
                    await self._fetch_all(bare, ref, auth)
                    commit = await self._has_commit(bare, name)
            if commit is not None:
                await self._keep(bare, ref, commit)
                return Resolved(commit, None)
        raise NotFoundError(f"git ref {name!r} not found in {ref.shown}")

    async def _fetch_all(self, bare: Path, ref: GitRef, auth: GitAuth) -> None:
        args = ["--git-dir", str(bare), "fetch", "-q", "--no-tags"]
        if (bare / "shallow").exists():
            args.append("--unshallow")
        self.fetches += 1
        await self._git(
            [
                *args,
                "--",
                ref.remote,
                *_ALL_REFS,
            ],
            auth,
            ref.shown,
            what="fetch",
        )

    async def _keep(self, bare: Path, ref: GitRef, commit: str) -> None:
        # a ref of our own keeps the commit from git's garbage collection
        await self._git(
            ["--git-dir", str(bare), "update-ref", f"refs/ociworker/{commit}", commit],
            GitAuth(),
            ref.shown,
            what="update-ref",
        )

    async def fetch(self, ref: GitRef, resolved: Resolved, auth: GitAuth) -> Path:
        """The bare repository with ``resolved.commit`` in it: fetched shallow
        (the ref's tip, else the commit itself), else in full. Nothing is fetched
        when the commit is there already."""
        bare = await self._ensure_bare(ref)
        commit = resolved.commit
        async with self._locked(bare / "ociworker.lock"):
            if await self._has_commit(bare, commit):
                return bare
            tries = [resolved.refname] if resolved.refname else []
            tries.append(commit)
            for want in tries:
                self.fetches += 1
                with contextlib.suppress(UserError):
                    await self._git(
                        [
                            "--git-dir",
                            str(bare),
                            "fetch",
                            "-q",
                            "--no-tags",
                            "--depth",
                            "1",
                            "--",
                            ref.remote,
                            want,
                        ],
                        auth,
                        ref.shown,
                        what="fetch",
                    )
                if await self._has_commit(bare, commit):
                    break
            else:
                # a server that refuses a commit by id, or a ref that moved
                await self._fetch_all(bare, ref, auth)
                if not await self._has_commit(bare, commit):
                    raise NotFoundError(f"git commit {commit} not found in {ref.shown}")
            await self._keep(bare, ref, commit)
        return bare

    async def checkout(
        self, ref: GitRef, resolved: Resolved, auth: GitAuth, *, keep_git_dir: bool = False
    ) -> Path:
        """The commit's files (submodules checked out; ``.git`` only when
        ``keep_git_dir``), cached by commit: a second call fetches nothing."""
        commit = resolved.commit
        dest = self.root / "checkouts" / (commit + (".git" if keep_git_dir else ""))
        if dest.is_dir():
            # its mtime is its last use: prune and GC keep what a running build reads
            with contextlib.suppress(FileNotFoundError):
                os.utime(dest)
            return dest
        bare = await self.fetch(ref, resolved, auth)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.parent / f".tmp-{uuid.uuid4().hex}"
        file_proto = ref.scheme == "file"
        try:
            tmp.mkdir(mode=0o755)
            local = GitAuth()
            run = ["-C", str(tmp)]
            await self._git(["init", "-q", str(tmp)], local, ref.shown, what="init")
            # origin is the real remote (relative submodule URLs resolve against it)
            await self._git([*run, "remote", "add", "origin", ref.remote], local, ref.shown)
            await self._git(
                [*run, "fetch", "-q", "--no-tags", "--depth", "1", "--", f"file://{bare}", commit],
                local,
                ref.shown,
                what="fetch",
                file_protocol=True,
            )
            await self._git(
                [*run, "-c", "advice.detachedHead=false", "checkout", "-q", commit],
                local,
                ref.shown,
                what="checkout",
            )
            if (tmp / ".gitmodules").exists():
                await self._git(
                    [*run, "submodule", "update", "-q", "--init", "--recursive", "--depth", "1"],
                    auth,
                    ref.shown,
                    what="submodule update",
                    file_protocol=file_proto,
                )
            if not keep_git_dir:
                await asyncio.to_thread(_remove_git_dirs, tmp)
            else:
                # it names our cache's path, which is no business of the image
                (tmp / ".git" / "FETCH_HEAD").unlink(missing_ok=True)
            try:
                os.rename(tmp, dest)
            except OSError:
                if not dest.is_dir():
                    raise
                # another build made the same checkout first
        finally:
            if tmp.exists():
                await asyncio.to_thread(shutil.rmtree, tmp, ignore_errors=True)
        return dest


def _remove_git_dirs(root: Path) -> None:
    """Take out ``.git`` (the repository's, and each submodule's link file)."""
    for dirpath, dirnames, filenames in os.walk(root):
        if ".git" in dirnames:
            dirnames.remove(".git")
            shutil.rmtree(os.path.join(dirpath, ".git"))
        if ".git" in filenames:
            os.unlink(os.path.join(dirpath, ".git"))


def subdir_of(checkout: Path, subdir: str, shown: str) -> Path:
    """``checkout/subdir``, refused when it (through a symlink) leaves the checkout."""
    path = checkout / subdir if subdir else checkout
    real = Path(os.path.realpath(path))
    if not real.is_relative_to(os.path.realpath(checkout)):
        raise UnsafePathError(
            f"git context {shown}: subdirectory {subdir!r} is outside the repository"
        )
    try:
        mode = os.stat(real).st_mode
    except FileNotFoundError:
        raise NotFoundError(f"git context {shown}: no subdirectory {subdir!r}") from None
    if not stat.S_ISDIR(mode):
        raise UserError(f"git context {shown}: {subdir!r} is not a directory")
    return real
