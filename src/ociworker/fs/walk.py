"""Selecting files from a tree the way COPY does: Go ``filepath.Match`` wildcards one
component at a time, ``.dockerignore`` rules, and a sorted walk that never leaves
the root. COPY (``ops.fileactions``), the context checksum and context sync
(``session.filesync``) all walk through here, so they agree on what a context holds.
"""

from __future__ import annotations

import functools
import os
import posixpath
import re
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from ociworker.errors import NotFoundError, UserError
from ociworker.fs.paths import clean, secure_join


class Ignore(Protocol):
    """.dockerignore rules (frontend.dockerfile.dockerignore.IgnoreMatcher)."""

    def excluded(self, path: str) -> bool: ...

    def can_skip_dir(self, path: str) -> bool: ...


@dataclass(frozen=True)
class Source:
    """A tree to copy from: a local context dir or a mounted snapshot."""

    root: Path
    ignore: Ignore | None = None  # only local contexts have one
    is_context: bool = False

    def excluded(self, rel: str) -> bool:
        return self.ignore is not None and bool(rel) and self.ignore.excluded(rel)


def has_wildcards(pattern: str) -> bool:
    """True when ``pattern`` holds an unescaped ``*``, ``?`` or ``[`` (BuildKit's rule)."""
    i = 0
    while i < len(pattern):
        ch = pattern[i]
        if ch == "\\":
            i += 2
            continue
        if ch in "*?[":
            return True
        i += 1
    return False


@functools.lru_cache(maxsize=512)
def _component_regex(pattern: str) -> re.Pattern[str]:
    """One path component of a Go ``filepath.Match`` pattern as a regex: ``*`` and ``?``
    never cross '/', but match a leading dot; ``[^...]`` negates; ``\\`` escapes."""
    out: list[str] = []
    i, n = 0, len(pattern)
    while i < n:
        ch = pattern[i]
        i += 1
        if ch == "*":
            out.append("[^/]*")
        elif ch == "?":
            out.append("[^/]")
        elif ch == "\\" and i < n:
            out.append(re.escape(pattern[i]))
            i += 1
        elif ch == "[":
            cls: list[str] = []
            if i < n and pattern[i] == "^":
                cls.append("^")
                i += 1
            start = i
            while i < n and (pattern[i] != "]" or i == start):
                if pattern[i] == "\\" and i + 1 < n:
                    cls.append(re.escape(pattern[i + 1]))
                    i += 2
                    continue
                cls.append("-" if pattern[i] == "-" else re.escape(pattern[i]))
                i += 1
            if i >= n:
                raise UserError(f"invalid source pattern {pattern!r}: unclosed '['")
            i += 1
            out.append("[" + "".join(cls) + "]")
        else:
            out.append(re.escape(ch))
    return re.compile("".join(out))


def match_component(pattern: str, name: str) -> bool:
    return _component_regex(pattern).fullmatch(name) is not None


def match_sources(src: Source, pattern: str, allow_wildcard: bool) -> list[str]:
    """Paths (relative to the source root, '/'-separated, no leading '/') that
    ``pattern`` names. Wildcards are matched one component at a time, each
    directory resolved inside the root, so a symlinked dir cannot widen the search.
    A literal path is returned as it is, whether it exists or not."""
    cleaned = clean(pattern).lstrip("/")
    if not cleaned:
        return [""]
    if not allow_wildcard or not has_wildcards(cleaned):
        return [cleaned]
    found = [""]
    for part in cleaned.split("/"):
        nxt: list[str] = []
        for base in found:
            if not has_wildcards(part):
                nxt.append(posixpath.join(base, part) if base else part)
                continue
            try:
                names = sorted(os.listdir(secure_join(src.root, base)))
            except (FileNotFoundError, NotADirectoryError):
                continue
            for name in names:
                if match_component(part, name):
                    rel = posixpath.join(base, name) if base else name
                    if not src.excluded(rel):
                        nxt.append(rel)
        found = nxt
    return [f for f in found if os.path.lexists(secure_join(src.root, f, follow_last=False))]


def not_found(src: Source, rel: str) -> NotFoundError:
    hint = ""
    if src.excluded(rel) and os.path.lexists(secure_join(src.root, rel, follow_last=False)):
        hint = " (it exists but is excluded by .dockerignore)"
    where = "build context" if src.is_context else "source"
    return NotFoundError(f'failed to compute cache key: "/{rel}": not found in {where}{hint}')


def walk_selected(
    src: Source,
    rel: str,
    follow: bool,
    exclude: Ignore | None = None,
    prune: Callable[[str], bool] | None = None,
) -> Iterator[tuple[str, os.stat_result]]:
    """(relative path, lstat) of ``rel`` and everything below it that is not excluded,
    in sorted order, directories before their contents. Never follows symlinks
    below ``rel``; follows ``rel`` itself when ``follow`` (as COPY does).

    ``exclude`` (COPY --exclude) and ``prune`` see paths relative to ``rel``;
    ``prune(sub)`` true means nothing below the directory ``sub`` is wanted."""
    top = secure_join(src.root, rel, follow_last=follow)
    try:
        st = os.stat(top) if follow else os.lstat(top)
    except FileNotFoundError:
        raise not_found(src, rel) from None
    if src.excluded(rel) and not stat.S_ISDIR(st.st_mode):
        raise not_found(src, rel)
    yield rel, st
    if stat.S_ISDIR(st.st_mode):
        yield from _walk_dir(src, top, rel, "", exclude, prune)


def _walk_dir(
    src: Source,
    dirpath: Path,
    rel: str,
    sub: str,
    exclude: Ignore | None,
    prune: Callable[[str], bool] | None,
) -> Iterator[tuple[str, os.stat_result]]:
    try:
        entries = sorted(os.scandir(dirpath), key=lambda e: e.name)
    except FileNotFoundError:
        return
    for e in entries:
        child = posixpath.join(rel, e.name) if rel else e.name
        child_sub = posixpath.join(sub, e.name) if sub else e.name
        ignored = src.excluded(child)
        dropped = exclude is not None and exclude.excluded(child_sub)
        is_dir = e.is_dir(follow_symlinks=False)
        if ignored or dropped:
            # An exception pattern ("!x") may still re-include something below.
            if (
                is_dir
                and not (ignored and src.ignore is not None and src.ignore.can_skip_dir(child))
                and not (dropped and exclude is not None and exclude.can_skip_dir(child_sub))
                and not (prune is not None and prune(child_sub))
            ):
                yield from _walk_dir(src, Path(e.path), child, child_sub, exclude, prune)
            continue
        st = e.stat(follow_symlinks=False)
        yield child, st
        if stat.S_ISDIR(st.st_mode) and not (prune is not None and prune(child_sub)):
            yield from _walk_dir(src, Path(e.path), child, child_sub, exclude, prune)
