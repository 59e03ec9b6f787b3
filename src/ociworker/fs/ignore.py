""".dockerignore: parsing and path matching with moby/patternmatcher semantics.

Rules (the same as ``docker build`` and BuildKit):

* a line starting with ``#`` is a comment; blank lines are skipped; surrounding
  whitespace is trimmed;
* patterns are lexically cleaned (``./a/../b`` -> ``b``) and a leading ``/`` is
  dropped, so every pattern is relative to the context root;
* ``*`` matches within one path element, ``?`` one character other than ``/``,
  ``[...]`` a character class, ``**`` any number of elements (also none);
  ``\\`` escapes the next character;
* a pattern that matches a directory also matches everything below it;
* ``!pattern`` re-includes what earlier patterns excluded; the last matching
  pattern decides.

All matching is pure; ``session.context`` reads a build's file, and
``read_dir_ignore`` a named directory context's.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ociworker.errors import DockerfileError

__all__ = ["IGNORE_FILE", "IgnoreMatcher", "parse_ignore", "read_dir_ignore"]

IGNORE_FILE = ".dockerignore"
# Characters that end the literal prefix of a pattern: past them, we can no
# longer tell by string comparison which paths the pattern might reach.
_WILDCARDS = frozenset("*?[\\")


def _clean(path: str) -> str:
    # Go's filepath.Clean: "" -> ".", no trailing slash, ".." resolved lexically.
    if not path:
        return "."
    out = posixpath.normpath(path)
    if out.startswith("//"):
        out = "/" + out.lstrip("/")
    return out


def parse_ignore(text: str) -> tuple[str, ...]:
    """The patterns of a .dockerignore file, normalised, in file order."""
    if text.startswith("\ufeff"):
        text = text[1:]
    patterns: list[str] = []
    for line in text.splitlines():
        # only a "#" in the very first column starts a comment
        if line.startswith("#"):
            continue
        pattern = line.strip()
        if not pattern:
            continue
        invert = pattern.startswith("!")
        if invert:
            pattern = pattern[1:].strip()
        if pattern:
            pattern = _clean(pattern)
            if len(pattern) > 1 and pattern.startswith("/"):
                pattern = pattern[1:]
        patterns.append("!" + pattern if invert else pattern)
    return tuple(patterns)


@dataclass(frozen=True)
class _Pattern:
    text: str
    exclusion: bool
    kind: str  # "exact" | "prefix" | "suffix" | "regex"
    regex: re.Pattern[str] | None
    literal_prefix: str  # text before the first wildcard

    def match(self, path: str) -> bool:
        if self.kind == "exact":
            return path == self.text
        if self.kind == "prefix":
            return path.startswith(self.text[:-2])
        if self.kind == "suffix":
            suffix = self.text[2:]
            if path.endswith(suffix):
                return True
            # "**/foo" also matches "foo" at the root
            return suffix.startswith("/") and path == suffix[1:]
        assert self.regex is not None
        return self.regex.fullmatch(path) is not None


def _bad(pattern: str, why: str) -> DockerfileError:
    return DockerfileError(f"invalid .dockerignore pattern {pattern!r}: {why}")


def _validate(pattern: str) -> None:
    """Reject what Go's filepath.Match calls a bad pattern."""
    i = 0
    n = len(pattern)

    def class_char(j: int) -> int:
        # one (possibly escaped) character of a class; returns the next index
        if j >= n or pattern[j] in "-]":
            raise _bad(pattern, "expected a character in '[...]'")
        if pattern[j] == "\\":
            j += 1
            if j >= n:
                raise _bad(pattern, "trailing \\ escapes nothing")
        return j + 1

    while i < n:
        ch = pattern[i]
        if ch == "\\":
            if i + 1 >= n:
                raise _bad(pattern, "trailing \\ escapes nothing")
            i += 2
        elif ch == "[":
            i += 1
            if i < n and pattern[i] == "^":
                i += 1
            ranges = 0
            while True:
                if i < n and pattern[i] == "]" and ranges > 0:
                    i += 1
                    break
                if i >= n:
                    raise _bad(pattern, "expected ']' to close '['")
                lo_end = class_char(i)
                if lo_end < n and pattern[lo_end] == "-":
                    i = class_char(lo_end + 1)
                    lo, hi = pattern[lo_end - 1], pattern[i - 1]
                    # Go's filepath.Match accepts a reversed range, but the
                    # regexp patternmatcher compiles the pattern to refuses it,
                    # so docker fails the build; say so here, not in re's words.
                    if lo > hi:
                        raise _bad(pattern, f"character range {lo}-{hi} is out of order")
                else:
                    i = lo_end
                ranges += 1
        else:
            i += 1


def _compile(text: str, exclusion: bool) -> _Pattern:
    """Translate one cleaned pattern, choosing the cheapest way to match it.

    As in patternmatcher: a pattern of literals is compared as a string, a
    literal ending in "**" by prefix, "**" followed by literals by suffix,
    anything else by regular expression.
    """
    _validate(text)
    out: list[str] = []
    kind = "exact"
    in_class = False
    i = 0
    n = len(text)
    while i < n:
        token_start = i
        ch = text[i]
        i += 1
        if in_class:
            if ch == "]":
                in_class = False
                out.append("]")
            elif ch == "\\":
                out.append(re.escape(text[i]))
                i += 1
            elif ch in "[&~|":
                # literal inside a class; escaped so Python's re sees no set ops
                out.append("\\" + ch)
            else:
                out.append(ch)
        elif ch == "*":
            if i < n and text[i] == "*":
                i += 1
                if i < n and text[i] == "/":
                    i += 1  # "**/" is "**" that also ate the "/"
                if i >= n:
                    if kind == "exact":
                        kind = "prefix"
                    else:
                        out.append(".*")
                        kind = "regex"
                else:
                    out.append("(?:.*/)?")
                    kind = "regex"
                if token_start == 0:
                    kind = "suffix"
            else:
                out.append("[^/]*")
                kind = "regex"
        elif ch == "?":
            out.append("[^/]")
            kind = "regex"
        elif ch == "\\":
            out.append(re.escape(text[i]))  # _validate guarantees a next char
            i += 1
            kind = "regex"
        elif ch == "[":
            in_class = True
            out.append("[")
            if i < n and text[i] == "^":
                out.append("^")
                i += 1
            kind = "regex"
        else:
            out.append(re.escape(ch))

    literal: list[str] = []
    for ch in text:
        if ch in _WILDCARDS:
            break
        literal.append(ch)
    return _Pattern(
        text=text,
        exclusion=exclusion,
        kind=kind,
        regex=re.compile("".join(out)) if kind == "regex" else None,
        literal_prefix="".join(literal),
    )


class IgnoreMatcher:
    """Decides which context paths a list of .dockerignore patterns excludes."""

    def __init__(self, patterns: Sequence[str]) -> None:
        self._patterns: list[_Pattern] = []
        for raw in patterns:
            text = raw.strip()
            if not text:
                continue
            exclusion = text.startswith("!")
            if exclusion:
                text = text[1:]
                if not text:
                    raise DockerfileError(
                        'illegal exclusion pattern: "!" must be followed by a path'
                    )
            self._patterns.append(_compile(_clean(text), exclusion))
        self._has_exclusions = any(p.exclusion for p in self._patterns)

    @property
    def patterns(self) -> tuple[str, ...]:
        return tuple(("!" if p.exclusion else "") + p.text for p in self._patterns)

    def excluded(self, path: str) -> bool:
        """True when ``path`` (relative to the context, "/"-separated) is ignored.

        A path is ignored when the last pattern matching it or one of its parent
        directories is not an exception.
        """
        path = _normalise(path)
        if path == ".":
            return False
        parents = path.split("/")[:-1]
        ancestors = ["/".join(parents[: i + 1]) for i in range(len(parents))]
        matched = False
        for pattern in self._patterns:
            # An inclusion only matters while not excluded, an exception only
            # while excluded.
            if pattern.exclusion != matched:
                continue
            hit = pattern.match(path) or any(pattern.match(a) for a in ancestors)
            if hit:
                matched = not pattern.exclusion
        return matched

    def can_skip_dir(self, path: str) -> bool:
        """True when ``path`` is excluded and nothing below it can be re-included.

        This lets a context walker skip a whole directory. It is conservative:
        an exception whose fixed text prefix is compatible with ``path/``
        (including any exception starting with a wildcard) keeps the directory
        walked.
        """
        if not self.excluded(path):
            return False
        if not self._has_exclusions:
            return True
        dir_slash = _normalise(path) + "/"
        for pattern in self._patterns:
            if not pattern.exclusion:
                continue
            lit = pattern.literal_prefix
            if lit.startswith(dir_slash) or dir_slash.startswith(lit):
                return False
        return True


def _normalise(path: str) -> str:
    path = _clean(path)
    while path.startswith("/"):
        path = path[1:]
    return path or "."


def read_dir_ignore(root: Path) -> IgnoreMatcher | None:
    """The rules of a named directory context (``--build-context NAME=DIR``):
    ``DIR/.dockerignore`` only, as BuildKit's named local context reads it (no
    Dockerfile-specific file there); None when it has none."""
    try:
        data = (root / IGNORE_FILE).read_bytes()
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        return None
    patterns = parse_ignore(data.decode("utf-8", errors="replace"))
    return IgnoreMatcher(patterns) if patterns else None
