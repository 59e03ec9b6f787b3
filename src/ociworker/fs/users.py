"""Resolve a Dockerfile ``USER`` string against the rootfs's own passwd/group files.

The rules are those of runc's ``user.GetExecUser`` (which BuildKit uses): a
numeric user or group needs no entry, a name must have one; the first matching
entry wins; supplementary groups come from ``/etc/group`` membership only when
the group was not given explicitly, and (BuildKit v0.32) the primary gid is
always among them. The parsing half is pure (text in, value out)
so it is unit-tested without a rootfs; ``resolve_user`` reads the files through
``secure_join`` so a symlinked ``/etc/passwd`` can never reach the host's.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ociworker.errors import UnsafePathError, UserError
from ociworker.fs.paths import secure_join

_MAX_ID = 2**31 - 1


@dataclass(frozen=True)
class ExecUser:
    uid: int = 0
    gid: int = 0
    additional_gids: tuple[int, ...] = ()
    home: str = "/"


@dataclass(frozen=True)
class PasswdEntry:
    name: str
    uid: int
    gid: int
    home: str


@dataclass(frozen=True)
class GroupEntry:
    name: str
    gid: int
    members: tuple[str, ...]


def _parse_id(text: str) -> int | None:
    # str.isdigit would accept non-ASCII digits and int() accepts "1_000" and
    # spaces; an id is plain ASCII decimal or it is a name.
    if not text or not text.isascii() or not text.isdigit():
        return None
    return int(text)


def _fields(text: str) -> list[list[str]]:
    rows = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        rows.append(line.split(":"))
    return rows


def parse_passwd(text: str) -> list[PasswdEntry]:
    """Entries of an ``/etc/passwd`` text; malformed lines are skipped, as libc does."""
    out = []
    for f in _fields(text):
        if len(f) < 4:
            continue
        uid, gid = _parse_id(f[2]), _parse_id(f[3])
        if uid is None or gid is None:
            continue
        home = f[5] if len(f) > 5 else ""
        out.append(PasswdEntry(name=f[0], uid=uid, gid=gid, home=home))
    return out


def parse_group(text: str) -> list[GroupEntry]:
    """Entries of an ``/etc/group`` text; malformed lines are skipped."""
    out = []
    for f in _fields(text):
        if len(f) < 3:
            continue
        gid = _parse_id(f[2])
        if gid is None:
            continue
        members = tuple(m for m in (f[3].split(",") if len(f) > 3 else []) if m)
        out.append(GroupEntry(name=f[0], gid=gid, members=members))
    return out


def _check_range(what: str, value: int) -> int:
    if value > _MAX_ID:
        raise UserError(f"{what} {value} is out of range (max {_MAX_ID})")
    return value


def exec_user(spec: str, passwd: str | None, group: str | None) -> ExecUser:
    """Resolve ``spec`` (``""``, ``user``, ``uid``, ``user:group``, ``uid:gid``...).

    ``passwd``/``group`` are the file texts, or None when the file is absent.
    """
    user_arg, _, group_arg = spec.partition(":")
    uid_arg = _parse_id(user_arg)
    gid_arg = _parse_id(group_arg)
    users = parse_passwd(passwd) if passwd is not None else []
    groups = parse_group(group) if group is not None else []

    uid, gid, home = 0, 0, "/"
    matched_name = ""
    if user_arg == "":
        match = next((u for u in users if u.uid == 0), None)
    elif uid_arg is not None:
        match = next((u for u in users if u.uid == uid_arg), None)
    else:
        match = next((u for u in users if u.name == user_arg), None)

    if match is not None:
        matched_name, uid, gid = match.name, match.uid, match.gid
        home = match.home or "/"
    elif user_arg != "":
        if uid_arg is None:
            raise UserError(f"unable to find user {user_arg}: no matching entries in passwd file")
        uid = _check_range("uid", uid_arg)

    sgids: tuple[int, ...] = ()
    if group_arg != "":
        if gid_arg is not None:
            gmatch = next((g for g in groups if g.gid == gid_arg), None)
        else:
            gmatch = next((g for g in groups if g.name == group_arg), None)
        if gmatch is not None:
            gid = gmatch.gid
        elif gid_arg is None:
            raise UserError(f"unable to find group {group_arg}: no matching entries in group file")
        else:
            gid = _check_range("gid", gid_arg)
    elif matched_name:
        # Supplementary groups only in the implicit form: "user:group" means
        # exactly that group, as in runc.
        sgids = tuple(g.gid for g in groups if matched_name in g.members)
    if uid_arg is not None and gid_arg is not None:
        sgids = ()  # BuildKit's fast path for "uid:gid": no group file is read
    # BuildKit v0.32 (executor/oci WithUIDGID -> ensureAdditionalGids, as containerd
    # 1.7): the primary gid is always a supplementary one too, first unless listed
    if gid not in sgids:
        sgids = (gid, *sgids)
    return ExecUser(uid=uid, gid=gid, additional_gids=sgids, home=home)


def _read_in_root(root: Path, path: str) -> str | None:
    # Like runc, a file that cannot be read (absent, a directory, a symlink
    # loop) counts as absent: numeric ids still work, names then fail clearly.
    try:
        target = secure_join(root, path)
        with open(target, encoding="utf-8", errors="replace") as f:
            return f.read()
    except (OSError, UnsafePathError):
        return None


def resolve_user(rootfs: str | os.PathLike[str], spec: str) -> ExecUser:
    """``exec_user`` with ``/etc/passwd`` and ``/etc/group`` read from ``rootfs``."""
    root = Path(rootfs)
    return exec_user(spec, _read_in_root(root, "/etc/passwd"), _read_in_root(root, "/etc/group"))
