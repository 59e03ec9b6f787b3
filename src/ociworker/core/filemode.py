"""Symbolic file modes (``u+x,g-w``, ``a=rX``) for ``COPY/ADD --chmod``, with
chmod(1)'s rules as BuildKit v0.32 takes them (pure): each clause changes the
mode each copied file already has; an empty "who" means all of u, g and o; ``X``
is execute only for a directory or a file some execute bit is set on."""

from __future__ import annotations

import re

_CLAUSE = re.compile(r"^([ugoa]*)([-+=])([rwxXst]*)$")
_WHO = {"u": 0o4700, "g": 0o2070, "o": 0o1007}


def is_symbolic_mode(text: str) -> bool:
    """Whether ``text`` is a valid symbolic mode (comma-separated clauses)."""
    return bool(text) and all(_CLAUSE.match(c) for c in text.split(","))


def apply_symbolic_mode(text: str, mode: int, is_dir: bool) -> int:
    """``mode`` (permission bits) changed by the symbolic ``text``."""
    for clause in text.split(","):
        m = _CLAUSE.match(clause)
        if m is None:
            raise ValueError(f"invalid symbolic mode {text!r}")
        who, op, perms = m.groups()
        mask = 0
        for w in who or "a":
            mask |= 0o7777 if w == "a" else _WHO[w]
        bits = 0
        for p in perms:
            if p == "r":
                bits |= 0o444
            elif p == "w":
                bits |= 0o222
            elif p == "x" or (p == "X" and (is_dir or mode & 0o111)):
                bits |= 0o111
            elif p == "s":
                bits |= 0o6000
            elif p == "t":
                bits |= 0o1000
        bits &= mask
        if op == "+":
            mode |= bits
        elif op == "-":
            mode &= ~bits
        else:
            mode = (mode & ~mask) | bits
    return mode & 0o7777
