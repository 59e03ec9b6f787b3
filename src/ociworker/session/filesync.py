"""Incremental context sync (PLACEHOLDER until the filesync branch lands).

This is the minimal engine the daemon's session transport is written against;
the filesync helper owns the real one with the same interface (``scan``,
``read_chunks``, ``ContextStore.begin`` -> transfer with ``wanted``,
``write``, ``finish``, ``bytes_received``). On merge, take theirs.

Client side: ``scan`` lists a context (sorted, symlinks as symlinks, ignore
rules applied). Worker side: ``ContextStore`` keeps the last synced copy per
key, so a second sync only asks for files whose metadata changed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import stat
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ociworker.errors import UnsafePathError
from ociworker.frontend.dockerfile.dockerignore import IgnoreMatcher
from ociworker.fsutil import check_relative_name

_CHUNK = 256 * 1024


@dataclass(frozen=True)
class FileStat:
    path: str
    mode: int
    size: int = 0
    mtime_ns: int = 0
    linkname: str = ""
    uid: int = 0
    gid: int = 0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> FileStat:
        return cls(
            path=str(d["path"]),
            mode=int(d["mode"]),
            size=int(d.get("size", 0)),
            mtime_ns=int(d.get("mtime_ns", 0)),
            linkname=str(d.get("linkname", "")),
            uid=int(d.get("uid", 0)),
            gid=int(d.get("gid", 0)),
        )


def scan(root: Path, ignore: IgnoreMatcher | None = None) -> list[FileStat]:
    out: list[FileStat] = []

    def walk(rel: str) -> None:
        with os.scandir(root / rel if rel else root) as it:
            entries = sorted(it, key=lambda e: e.name)
        for e in entries:
            path = f"{rel}/{e.name}" if rel else e.name
            st = e.stat(follow_symlinks=False)
            is_dir = stat.S_ISDIR(st.st_mode)
            if ignore is not None and ignore.excluded(path):
                if is_dir and not ignore.can_skip_dir(path):
                    walk(path)
                continue
            link = os.readlink(e.path) if stat.S_ISLNK(st.st_mode) else ""
            size = st.st_size if stat.S_ISREG(st.st_mode) else 0
            out.append(FileStat(path, st.st_mode, size, st.st_mtime_ns, link, st.st_uid, st.st_gid))
            if is_dir:
                walk(path)

    walk("")
    return out


def read_chunks(root: Path, path: str) -> Iterator[bytes]:
    check_relative_name(path)
    fd = os.open(root / path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as f:
        while chunk := f.read(_CHUNK):
            yield chunk


class ContextStore:
    def __init__(self, root_dir: Path) -> None:
        self.root_dir = root_dir
        root_dir.mkdir(parents=True, exist_ok=True)

    def begin(self, key: str, stats: list[FileStat]) -> Transfer:
        name = hashlib.sha256(key.encode()).hexdigest()
        return Transfer(self.root_dir / name, stats)


class Transfer:
    def __init__(self, dest: Path, stats: list[FileStat]) -> None:
        self.dest = dest
        self.bytes_received = 0
        self._manifest = dest.with_name(dest.name + ".json")
        old: dict[str, dict[str, Any]] = {}
        with contextlib.suppress(FileNotFoundError, ValueError):
            old = {d["path"]: d for d in json.loads(self._manifest.read_text())}
        self._manifest.unlink(missing_ok=True)  # half-synced until finish()
        self._stats = stats
        new = {s.path: s for s in stats}
        for s in stats:
            check_relative_name(s.path)
            if s.path in ("", "."):
                raise UnsafePathError("invalid path '.' in a context")
        dest.mkdir(exist_ok=True)
        # drop what is gone or changed type; then create dirs and links
        for p in sorted(old, reverse=True):
            cur = new.get(p)
            if cur is None or stat.S_IFMT(cur.mode) != stat.S_IFMT(int(old[p]["mode"])):
                _remove(dest / p)
        wanted: list[str] = []
        for s in stats:
            target = dest / s.path
            if not _inside(dest, target.parent):
                raise UnsafePathError(f"invalid path {s.path!r}: leaves the context")
            if stat.S_ISDIR(s.mode):
                target.mkdir(exist_ok=True)
                os.chmod(target, stat.S_IMODE(s.mode))
            elif stat.S_ISLNK(s.mode):
                _remove(target)
                os.symlink(s.linkname, target)
            elif stat.S_ISREG(s.mode):
                prev = old.get(s.path)
                same = prev is not None and FileStat.from_json(prev) == s and target.exists()
                if not same:
                    wanted.append(s.path)
        self.wanted = wanted
        self._open: dict[str, Any] = {}

    def write(self, path: str, chunk: bytes) -> None:
        if path not in self._wanted_set():
            raise UnsafePathError(f"file {path!r} was not asked for")
        f = self._open.get(path)
        if f is None:
            target = self.dest / path
            if not _inside(self.dest, target.parent):
                raise UnsafePathError(f"invalid path {path!r}: leaves the context")
            _remove(target)
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            f = self._open[path] = os.fdopen(fd, "wb")
        f.write(chunk)
        self.bytes_received += len(chunk)

    def _wanted_set(self) -> set[str]:
        s: set[str] | None = getattr(self, "_ws", None)
        if s is None:
            s = self._ws = set(self.wanted)
        return s

    def finish(self) -> Path:
        by_path = {s.path: s for s in self._stats}
        for path in self.wanted:
            f = self._open.pop(path, None)
            if f is not None:
                f.close()
            target = self.dest / path
            if not target.exists():
                target.touch()  # empty files send no chunk
            st = by_path[path]
            os.chmod(target, stat.S_IMODE(st.mode))
            os.utime(target, ns=(st.mtime_ns, st.mtime_ns), follow_symlinks=False)
        self._manifest.write_text(json.dumps([s.to_json() for s in self._stats]))
        return self.dest

    def close(self) -> None:
        for f in self._open.values():
            f.close()
        self._open.clear()

    def __enter__(self) -> Transfer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _inside(root: Path, p: Path) -> bool:
    r = os.path.realpath(root)
    q = os.path.realpath(p)
    return q == r or q.startswith(r + "/")


def _remove(p: Path) -> None:
    if p.is_symlink() or (p.exists() and not p.is_dir()):
        p.unlink()
    elif p.is_dir():
        shutil.rmtree(p)
