"""Reading a build's definition on the caller's side: the Dockerfile and the
``.dockerignore`` patterns of its context. The frontend takes their text, never
paths, so the CLI and the daemon's client read them here (the daemon gets the
bytes from its client and reads nothing).
"""

from __future__ import annotations

import sys
from pathlib import Path

from ociworker.core.build import BuildDefinition
from ociworker.errors import DockerfileError, NotFoundError
from ociworker.fs.ignore import IGNORE_FILE, parse_ignore


def read_ignore_file(context: Path, dockerfile: Path | None) -> tuple[str, ...]:
    """Read the ignore patterns for a build.

    ``<Dockerfile name>.dockerignore`` next to the Dockerfile wins (so
    ``app.Dockerfile`` can have ``app.Dockerfile.dockerignore``); otherwise
    ``<context>/.dockerignore``; with neither, nothing is ignored. A relative
    ``dockerfile`` is taken relative to the context.
    """
    candidates: list[Path] = []
    if dockerfile is not None:
        df = dockerfile if dockerfile.is_absolute() else context / dockerfile
        candidates.append(df.with_name(df.name + IGNORE_FILE))
    candidates.append(context / IGNORE_FILE)
    for candidate in candidates:
        try:
            data = candidate.read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            continue
        return parse_ignore(data.decode("utf-8", errors="replace"))
    return ()


def read_dockerfile(context: Path, dockerfile: Path | None) -> tuple[str, Path]:
    """The Dockerfile's text and path (``-f`` relative to the cwd, else to the
    context; default ``<context>/Dockerfile``). It sits beside
    ``read_ignore_file`` because both are read on the client's side, before a
    remote worker sees anything."""
    path = dockerfile or context / "Dockerfile"
    if not path.is_absolute() and dockerfile is not None and not path.exists():
        path = context / path
    try:
        return path.read_text(encoding="utf-8"), path
    except FileNotFoundError:
        raise NotFoundError(f"failed to read dockerfile: open {path}: no such file") from None
    except UnicodeDecodeError as exc:
        raise DockerfileError(f"{path} is not UTF-8 text: {exc}") from None


#: ``-f -``: the Dockerfile comes from stdin, as with buildx
STDIN = Path("-")


def read_stdin_dockerfile() -> str:
    data = sys.stdin.buffer.read()
    if not data.strip():
        raise DockerfileError("the Dockerfile read from stdin (-f -) is empty")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DockerfileError(f"the Dockerfile read from stdin is not UTF-8 text: {exc}") from None


def read_definition(context: Path, dockerfile: Path | None) -> BuildDefinition:
    """The Dockerfile's text and name and the ignore patterns that go with it."""
    if not context.is_dir():
        raise NotFoundError(f"build context {context} is not a directory")
    if dockerfile == STDIN:
        # No file beside it to name an ignore file: the context's own applies.
        return BuildDefinition(
            read_stdin_dockerfile(), "Dockerfile", read_ignore_file(context, None)
        )
    text, path = read_dockerfile(context, dockerfile)
    return BuildDefinition(text, path.name, read_ignore_file(context, path))
