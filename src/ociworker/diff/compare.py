"""Comparer: the changes between two snapshots, as an OCI layer blob.

Two strategies, as in containerd and BuildKit:

* overlay fast path: when ``upper`` is an active overlay snapshot stacked on
  exactly the layers of ``lower``, its upperdir *is* the change set. Walk it,
  turning overlay whiteouts (char device 0:0) into ``.wh.<name>`` and opaque
  directories into ``<dir>/.wh..wh..opq``; a directory the kernel only copied
  up (same metadata in the lower layers) is written only if something below
  it is, as the double walk does.
* double walk: otherwise compare the merged lower tree with the upper tree
  file by file (stat, xattrs, link targets; contents only when mtimes are
  ambiguous) and emit adds, changes and whiteouts for deletions.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import stat
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ociworker.content.store import ContentStore
from ociworker.core.mounts import Mount
from ociworker.core.oci import Layer
from ociworker.diff.base import CompressionOpts
from ociworker.diff.tarutil import (
    CHUNK,
    LayerBlobWriter,
    LayerTarWriter,
    is_overlay_xattr,
    map_os_error,
    mounted,
    parse_mounts,
    read_xattrs,
    remove_scratch,
    scan_sorted,
)
from ociworker.errors import UserError

__all__ = ["LayerComparer", "write_dir_layer"]


class _NeedsDoubleWalk(Exception):
    """The upperdir uses overlay features (redirect_dir, metacopy) whose changes
    are not visible in the upperdir alone."""


class LayerComparer:
    """``Comparer`` over overlay and bind (native) snapshot mounts.

    ``scratch_dir`` is where temporary mount points are made (it should live
    with the caller's state, not in a shared /tmp); None means the system
    temp dir.
    """

    def __init__(self, store: ContentStore, *, scratch_dir: Path | None = None) -> None:
        self._store = store
        self._scratch = scratch_dir

    async def compare(
        self, lower: Sequence[Mount], upper: Sequence[Mount], opts: CompressionOpts
    ) -> Layer:
        return await asyncio.to_thread(self.compare_sync, lower, upper, opts)

    def compare_sync(
        self, lower: Sequence[Mount], upper: Sequence[Mount], opts: CompressionOpts
    ) -> Layer:
        lv = parse_mounts(lower)
        uv = parse_mounts(upper)
        if uv.kind == "empty":
            raise UserError("compare: the upper snapshot has no mounts")
        if uv.kind == "dir" and lv.kind == "empty":
            return write_dir_layer(self._store, Path(uv.layers[0]), opts)
        # The change set is one directory when upper is lower plus one layer on
        # top: the upperdir of an active snapshot, or the top lowerdir of a
        # read-only view of a committed one (what export diffs).
        top: str | None = None
        if uv.fstype != "overlay":
            pass  # fuse-overlayfs's own deletion marks: compare the mounted trees
        elif uv.kind == "overlay" and uv.upper and uv.layers == lv.all_dirs():
            top = uv.upper
        elif uv.kind == "overlay" and not uv.upper and uv.layers[1:] == lv.all_dirs():
            top = uv.layers[0]
        if top is not None:
            change_set = top
            lower_layers = lv.all_dirs()
            try:
                return _write_layer(
                    self._store,
                    opts,
                    lambda w: _walk_upperdir(w, change_set, lower_layers, uv.userxattr),
                    userxattr=uv.userxattr,
                )
            except _NeedsDoubleWalk:
                pass
        with self._scratch_dir() as scratch, contextlib.ExitStack() as stack:
            lower_dir = stack.enter_context(mounted(lv, scratch))
            upper_dir = stack.enter_context(mounted(uv, scratch))
            userxattr = uv.userxattr or lv.userxattr
            return _write_layer(
                self._store,
                opts,
                lambda w: _double_walk(w, lower_dir, upper_dir, userxattr),
                userxattr=userxattr,
            )

    @contextlib.contextmanager
    def _scratch_dir(self) -> Iterator[str]:
        if self._scratch is not None:
            self._scratch.mkdir(parents=True, exist_ok=True)
        d = tempfile.mkdtemp(prefix="diff-", dir=self._scratch)
        try:
            yield d
        finally:
            remove_scratch(d)


def write_dir_layer(store: ContentStore, root_dir: Path, opts: CompressionOpts) -> Layer:
    """The whole tree under ``root_dir`` as one layer (a base layer)."""
    root = os.fspath(root_dir)
    return _write_layer(store, opts, lambda w: _walk_plain(w, root), userxattr=False)


# --- writing ----------------------------------------------------------------------


def _write_layer(
    store: ContentStore,
    opts: CompressionOpts,
    walk: Callable[[LayerTarWriter], None],
    *,
    userxattr: bool,
) -> Layer:
    sink = LayerBlobWriter(store, opts)
    try:
        tw = LayerTarWriter(sink, userxattr=userxattr, epoch=opts.epoch)
        try:
            walk(tw)
        except OSError as e:
            raise map_os_error("cannot read snapshot", e) from e
        tw.close()
        return sink.finish()
    finally:
        sink.abort()


def _walk_sorted(root: str) -> Iterator[tuple[str, str, os.stat_result]]:
    """(relative path, absolute path, lstat) of everything below ``root``, sorted,
    each directory before its contents; iterative, so depth costs no recursion."""
    stack: list[tuple[str, str, Iterator[tuple[str, os.stat_result]]]] = [
        ("", root, iter(scan_sorted(root)))
    ]
    while stack:
        rel_dir, abs_dir, it = stack[-1]
        item = next(it, None)
        if item is None:
            stack.pop()
            continue
        name, st = item
        rel = os.path.join(rel_dir, name)
        path = os.path.join(abs_dir, name)
        yield rel, path, st
        if stat.S_ISDIR(st.st_mode):
            stack.append((rel, path, iter(scan_sorted(path))))


def _walk_plain(w: LayerTarWriter, root: str) -> None:
    for rel, path, st in _walk_sorted(root):
        w.add(rel, path, st, read_xattrs(path))


def _walk_upperdir(
    w: LayerTarWriter, upper: str, lower_layers: Sequence[str], userxattr: bool
) -> None:
    """The change set in ``upper`` (on top of ``lower_layers``, nearest first).

    The kernel copies a directory up, with the metadata it has below, when
    something beneath it is touched or a mount point is made in it. Such a
    directory is not a change by itself: as in the double walk (and BuildKit's
    overlay differ) it is written only if something below it is. Only
    directories are looked up below; every other entry of an upperdir is a change.
    """
    prefix = "user.overlay." if userxattr else "trusted.overlay."
    opaque_key = prefix + "opaque"
    # Either feature means the upperdir holds pointers into lower layers
    # instead of the data; only a double walk sees the real tree.
    unsupported = (prefix + "redirect", prefix + "metacopy")
    stack = [_UpperFrame("", upper, tuple(lower_layers), iter(scan_sorted(upper)))]

    def flush() -> None:
        for f in stack:
            if f.pending is not None:
                w.add(f.rel, f.path, f.pending, f.xattrs)
                f.pending = None

    while stack:
        top = stack[-1]
        item = next(top.items, None)
        if item is None:
            stack.pop()
            continue
        name, st = item
        rel = os.path.join(top.rel, name)
        path = os.path.join(top.path, name)
        if _is_whiteout(st):
            flush()
            w.add_whiteout(rel)
            continue
        xattrs = read_xattrs(path)
        if any(k in xattrs for k in unsupported):
            raise _NeedsDoubleWalk(rel)
        if not stat.S_ISDIR(st.st_mode):
            flush()
            w.add(rel, path, st, xattrs)
            continue
        # "x" marks a dir holding xwhiteouts (composefs lowers); only "y" is opaque
        opaque = xattrs.get(opaque_key) == b"y"
        below: tuple[str, ...] = ()
        same = False
        if not opaque and top.lower:
            below, found = _lower_dir(top.lower, name, opaque_key)
            if found is not None:
                lpath, lst = found
                same = not _differs(lpath, lst, path, st, xattrs, userxattr)
        frame = _UpperFrame(rel, path, below, iter(scan_sorted(path)))
        if same:
            frame.pending = st
            frame.xattrs = xattrs
        else:
            flush()
            w.add(rel, path, st, xattrs)
            if opaque:
                w.add_opaque(rel)
        stack.append(frame)


@dataclass
class _UpperFrame:
    rel: str
    path: str
    # the dirs merged into this one in the lower view, nearest first; () if none
    lower: tuple[str, ...]
    items: Iterator[tuple[str, os.stat_result]]
    # lstat of a dir only copied up, emitted only if something below it is
    pending: os.stat_result | None = None
    xattrs: dict[str, bytes] = field(default_factory=dict)


def _is_whiteout(st: os.stat_result) -> bool:
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def _lower_dir(
    parents: tuple[str, ...], name: str, opaque_key: str
) -> tuple[tuple[str, ...], tuple[str, os.stat_result] | None]:
    """``name`` in the lower view whose directory is merged from ``parents``
    (nearest first), with overlay's lookup rules: the nearest entry decides
    (its path and lstat, or None if absent or whited out); a directory merges
    with the directories of farther layers until an opaque one, a whiteout or
    a non-directory. Returns those directories (empty unless it is one)."""
    dirs: list[str] = []
    found: tuple[str, os.stat_result] | None = None
    for parent in parents:
        path = os.path.join(parent, name)
        try:
            st = os.lstat(path)
        except (FileNotFoundError, NotADirectoryError):
            continue
        if _is_whiteout(st) or not stat.S_ISDIR(st.st_mode):
            if found is None and not _is_whiteout(st):
                found = (path, st)
            break
        if found is None:
            found = (path, st)
        dirs.append(path)
        if _get_xattr(path, opaque_key) == b"y":
            break
    return tuple(dirs), found


def _get_xattr(path: str, name: str) -> bytes | None:
    try:
        return os.getxattr(path, name, follow_symlinks=False)
    except OSError as e:
        if e.errno in (errno.ENODATA, errno.ENOTSUP, errno.EPERM):
            return None
        raise


# --- double walk -------------------------------------------------------------------


@dataclass
class _Frame:
    rel: str
    lower: str | None  # None: everything below is new
    upper: str
    items: Iterator[tuple[str, os.stat_result | None, os.stat_result | None]]
    # an unchanged dir, emitted only if something below it changes
    pending: tuple[str, str, os.stat_result] | None = None
    xattrs: dict[str, bytes] = field(default_factory=dict)


def _merged(
    lower: str | None, upper: str
) -> Iterator[tuple[str, os.stat_result | None, os.stat_result | None]]:
    lo = dict(scan_sorted(lower)) if lower is not None else {}
    up = dict(scan_sorted(upper))
    names = sorted(lo.keys() | up.keys(), key=os.fsencode)
    for name in names:
        yield name, lo.get(name), up.get(name)


def _double_walk(w: LayerTarWriter, lower: str, upper: str, userxattr: bool) -> None:
    stack = [_Frame("", lower, upper, _merged(lower, upper))]

    def flush() -> None:
        for f in stack:
            if f.pending is not None:
                rel, path, st = f.pending
                w.add(rel, path, st, f.xattrs)
                f.pending = None

    while stack:
        top = stack[-1]
        item = next(top.items, None)
        if item is None:
            stack.pop()
            continue
        name, lst, ust = item
        rel = os.path.join(top.rel, name)
        upath = os.path.join(top.upper, name)
        if ust is None:
            flush()
            w.add_whiteout(rel)
            continue
        uxattrs = read_xattrs(upath)
        is_dir = stat.S_ISDIR(ust.st_mode)
        if lst is None or top.lower is None or stat.S_IFMT(lst.st_mode) != stat.S_IFMT(ust.st_mode):
            flush()
            w.add(rel, upath, ust, uxattrs)
            if is_dir:
                stack.append(_Frame(rel, None, upath, _merged(None, upath)))
            continue
        lpath = os.path.join(top.lower, name)
        changed = _differs(lpath, lst, upath, ust, uxattrs, userxattr)
        if changed:
            flush()
            w.add(rel, upath, ust, uxattrs)
        if is_dir:
            frame = _Frame(rel, lpath, upath, _merged(lpath, upath))
            if not changed:
                frame.pending = (rel, upath, ust)
                frame.xattrs = uxattrs
            stack.append(frame)


def _differs(
    lpath: str,
    lst: os.stat_result,
    upath: str,
    ust: os.stat_result,
    uxattrs: dict[str, bytes],
    userxattr: bool,
) -> bool:
    """Same rules as moby's statDifferent, plus xattrs, link targets and, when a
    filesystem may have truncated mtimes, contents."""
    if (lst.st_dev, lst.st_ino) == (ust.st_dev, ust.st_ino):
        return False
    if (
        lst.st_mode != ust.st_mode
        or lst.st_uid != ust.st_uid
        or lst.st_gid != ust.st_gid
        or lst.st_rdev != ust.st_rdev
    ):
        return True
    if _layer_xattrs(read_xattrs(lpath), userxattr) != _layer_xattrs(uxattrs, userxattr):
        return True
    mode = ust.st_mode
    if stat.S_ISDIR(mode):
        # a dir's size and mtime change with its children, which are compared anyway
        return False
    if lst.st_size != ust.st_size:
        return True
    if stat.S_ISLNK(mode):
        return os.readlink(lpath) != os.readlink(upath)
    lsec, lns = divmod(lst.st_mtime_ns, 1_000_000_000)
    usec, uns = divmod(ust.st_mtime_ns, 1_000_000_000)
    if lsec != usec:
        return True
    if lns == uns and lns != 0:
        return False
    if lns != uns and lns != 0 and uns != 0:
        return True
    # one side has no sub-second part (a copy through a coarse filesystem or
    # tar): only the bytes can tell
    return stat.S_ISREG(mode) and not _same_content(lpath, upath)


def _layer_xattrs(x: dict[str, bytes], userxattr: bool) -> dict[str, bytes]:
    return {k: v for k, v in x.items() if not is_overlay_xattr(k, userxattr)}


def _same_content(a: str, b: str) -> bool:
    with open(a, "rb", buffering=0) as fa, open(b, "rb", buffering=0) as fb:
        while True:
            ca = fa.read(CHUNK)
            cb = fb.read(CHUNK)
            if ca != cb:
                return False
            if not ca:
                return True
