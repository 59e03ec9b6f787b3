"""Every path of a build request checked before anything runs.

The CLI calls ``check_build_paths`` right after it has made the ``BuildRequest``
and before it opens the worker or contacts a daemon, so a typo in a path fails
in milliseconds with one message naming the flag and the path, instead of a
traceback after the build (or a directory created where none was meant).

The rules are buildx's where it has them: it creates no parent of ``--iidfile``,
``--metadata-file`` or a file output (``os.Create``); it refuses a file output
whose dest is a directory ("destination file ... is a directory"); BuildKit
creates a ``local`` dest with its parents (``MkdirAll``); a context that is no
directory is "unable to prepare context". The state dir (``--root``) is created
here when missing, parents too, as buildkitd does with its root.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from ociworker.core.build import BuildRequest
from ociworker.core.outputs import DIR_TYPES, FILE_TYPES, OutputSpec, check_outputs
from ociworker.errors import ConfigError


def check_build_paths(
    req: BuildRequest,
    *,
    root: Path | None,
    stdout_is_tty: bool | None = None,
    euid: int | None = None,
) -> None:
    """Refuse ``req`` if one of its paths cannot work (ConfigError naming the flag
    and the path); on success, ``root`` exists.

    ``root``: the embedded worker's state dir, None when a daemon runs the build
    (its root is its own business). ``stdout_is_tty`` (default: whether this
    process's stdout is a terminal) refuses an archive on a terminal, as buildx
    does; ``euid`` (default: this process's) is for tests.
    """
    if root is not None:
        # First: for any other user the embedded worker cannot run at all,
        # whatever the other paths are.
        _check_user(root, os.geteuid() if euid is None else euid)
    check_outputs(req.outputs, req.tags)
    if not req.context_url:  # a fetched context (and its -f) is the worker's to check
        _check_context(req.context)
        if req.frontend == "graph.v1":
            pass  # the CLI read the definition file (PATH) already
        elif req.dockerfile is None:
            _check_default_dockerfile(req.context / "Dockerfile")
        elif str(req.dockerfile) != "-":
            _check_dockerfile(req.context, req.dockerfile)
    for out in req.outputs:
        _check_output(out, _stdout_is_tty() if stdout_is_tty is None else stdout_is_tty)
    _check_distinct(req)
    for flag, path in (("--iidfile", req.iidfile), ("--metadata-file", req.metadata_file)):
        if path is not None:
            _check_file_dest(flag, path)
    if root is not None:
        # Last: the only check that creates something, so a bad flag above
        # leaves no new state dir behind.
        check_root(root)


def check_worker_root(root: Path, *, euid: int | None = None) -> None:
    """For the embedded worker's other commands (``du``, ``prune``): this user
    may run it, and ``root`` is a writable directory (created if missing)."""
    _check_user(root, os.geteuid() if euid is None else euid)
    check_root(root)


def _check_user(root: Path, euid: int) -> None:
    if euid != 0:
        # Mounting overlayfs and running runc need root: a user's CLI enters a user
        # namespace of its own first (ociworker.rootless), so this is a worker made
        # some other way (an API caller) without one.
        raise ConfigError(
            f"--root {root}: the embedded worker must run as root (this is uid {euid}); "
            "run the build as root (e.g. with sudo), or on an ociworker daemon with --addr"
        )


def check_root(root: Path) -> None:
    """The embedded worker's state dir (as root): a writable directory, created
    with its parents if missing."""
    if os.path.lexists(root) and not root.exists():
        raise ConfigError(f"--root {root} is a symlink to nothing: give a directory")
    if root.exists() and not root.is_dir():
        raise ConfigError(f"--root {root} is not a directory: give a directory for the state")
    if not root.exists():
        _make_dirs(root)
    if not os.access(root, os.W_OK | os.X_OK):
        raise ConfigError(
            f"--root {root} is not writable (read-only filesystem?): "
            "give a writable directory for the state"
        )


def _make_dirs(root: Path) -> None:
    """Create ``root`` and its missing parents; on failure remove those created."""
    missing = list(_up_to_existing(root))
    made: list[Path] = []
    try:
        for p in reversed(missing):
            try:
                p.mkdir(mode=0o700 if p == root else 0o755)
            except FileExistsError:
                if p.is_dir() and not p.is_symlink():
                    continue  # a build starting at the same moment made it: it serves
                raise
            made.append(p)
    except OSError as e:
        for p in reversed(made):
            # not empty: a concurrent start made its own dirs in it, keep them
            with contextlib.suppress(OSError):
                p.rmdir()
        reason = e.strerror or str(e)
        raise ConfigError(
            f"--root {root} cannot be created ({reason}): give a directory on a "
            "writable filesystem for the state"
        ) from None


def _up_to_existing(path: Path) -> Iterator[Path]:
    """``path`` and its parents, up to (not including) the first that exists."""
    p = path.absolute()
    while not os.path.lexists(p) and p != p.parent:
        yield p
        p = p.parent


def _check_context(context: Path) -> None:
    if str(context) == "-":
        return  # stdin: read by the CLI itself
    if not context.exists():
        raise ConfigError(f'unable to prepare context: path "{context}" not found')
    if not context.is_dir():
        raise ConfigError(f'unable to prepare context: path "{context}" is not a directory')


def _check_dockerfile(context: Path, dockerfile: Path) -> None:
    # The same resolution as session.context.read_dockerfile: relative to the
    # cwd, else to the context.
    path = dockerfile
    if not path.is_absolute() and not path.exists():
        path = context / path
    if not path.exists():
        raise ConfigError(f"-f {dockerfile}: no such file (looked for {path})")
    if not path.is_file():
        raise ConfigError(f"-f {dockerfile}: {path} is not a regular file")
    if not os.access(path, os.R_OK):
        raise ConfigError(f"-f {dockerfile}: {path} is not readable")


def _check_default_dockerfile(path: Path) -> None:
    if str(path.parent) == "-":
        return  # the context comes from stdin
    # BuildKit's words for a context without a Dockerfile
    if not path.exists():
        raise ConfigError(f"failed to read dockerfile: open {path}: no such file or directory")
    if not path.is_file():
        raise ConfigError(f"failed to read dockerfile: {path} is not a regular file")


def _check_output(out: OutputSpec, stdout_is_tty: bool) -> None:
    dest = out.get("dest")
    if not dest:
        return
    if dest == "-":
        if stdout_is_tty:
            raise ConfigError(
                f"output {out}: output file is required for {out.type} exporter, refusing "
                "to write to a terminal: redirect stdout or give dest=FILE"
            )
        return
    path = Path(dest)
    flag = f"output {out}"
    if out.type in FILE_TYPES:
        _check_file_dest(flag, path, what="destination file")
    elif out.type in DIR_TYPES:
        if path.exists() and not path.is_dir():
            raise ConfigError(f"{flag}: {dest} exists and is not a directory")
        if not path.exists():
            # Created at export with its parents (BuildKit's MkdirAll); what
            # would stop that is a file on the way or a directory we cannot write.
            parent = next((p for p in path.absolute().parents if os.path.lexists(p)), Path("/"))
            if not parent.is_dir():
                raise ConfigError(f"{flag}: cannot create {dest}: {parent} is not a directory")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise ConfigError(f"{flag}: cannot create {dest}: {parent} is not writable")


def _check_file_dest(flag: str, path: Path, *, what: str = "") -> None:
    """A file that is replaced by a rename: not a directory, in an existing,
    writable directory."""
    label = f"{flag} {path}" if not what else f"{flag}: {what} {path}"
    if path.is_dir():
        raise ConfigError(f"{label} is a directory")
    parent = path.absolute().parent
    if not parent.exists():
        raise ConfigError(f"{label}: directory {parent} does not exist (create it first)")
    if not parent.is_dir():
        raise ConfigError(f"{label}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"{label}: directory {parent} is not writable")


def _check_distinct(req: BuildRequest) -> None:
    """No two outputs (nor --iidfile / --metadata-file) on one real path:
    ``check_outputs`` compares them as written, this through symlinks and ``..``."""
    seen: dict[str, str] = {}
    named = [(f"output {out}", out.get("dest")) for out in req.outputs]
    for flag, path in (("--iidfile", req.iidfile), ("--metadata-file", req.metadata_file)):
        named.append((flag, str(path) if path is not None else ""))
    for name, dest in named:
        if not dest or dest == "-":
            continue
        real = os.path.realpath(dest)
        if real in seen:
            raise ConfigError(f"{seen[real]} and {name} both write to {dest}")
        seen[real] = name


def _stdout_is_tty() -> bool:
    try:
        return sys.stdout is not None and sys.stdout.isatty()
    except ValueError:  # closed
        return False
