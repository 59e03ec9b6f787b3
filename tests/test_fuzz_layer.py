"""Property tests for layer apply (diff/apply.py).

* Round trip: a random tree (dirs, files, symlinks, hardlinks; odd names,
  long names, every mode bit, owners, times) written as a tar by ``tarfile``
  in a random order, applied onto an empty directory, reads back as the tree.
* Whiteouts: a second layer of ``.wh.`` and ``.wh..wh..opq`` entries plus new
  entries, over a random first layer, leaves what the OCI image spec's layer
  rules say (computed here on dicts, never by reading the applier).
* Hostile layers: random names built from ``..``, ``.``, ``/`` and symlink and
  hardlink targets pointing out of the root are either applied inside the root
  or refused with our error; a sentinel directory beside the root never
  changes and nothing appears next to the root.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import posixpath
import stat
import tarfile
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from ociworker.diff import apply_tar_stream
from ociworker.errors import OciworkerError

pytestmark = pytest.mark.stress


@dataclass(frozen=True)
class Node:
    kind: str  # "dir" | "file" | "sym"
    mode: int = 0
    mtime: int = 0
    data: bytes = b""
    target: str = ""
    uid: int = 0
    gid: int = 0
    link: str = ""  # for a hardlink: the path it shares an inode with


Tree = dict[str, Node]

NAME = st.one_of(
    st.sampled_from(["a", "b", "c", "d e", "é", "x.tar", "-", "..a", ".hidden"]),
    st.text(alphabet="abz09._-", min_size=1, max_size=8).filter(
        lambda s: s not in (".", "..") and not s.startswith(".wh.")
    ),
    st.integers(100, 255).map(lambda n: "L" * n),  # past ustar's 100 bytes: PAX names
)
MODE = st.integers(0, 0o7777)
TIME = st.integers(0, 2_000_000_000)
OWNER = st.integers(0, 70_000)


@st.composite
def trees(draw: st.DrawFn, max_entries: int = 12) -> Tree:
    tree: Tree = {}
    dirs = [""]
    for _ in range(draw(st.integers(0, max_entries))):
        parent = draw(st.sampled_from(dirs))
        path = posixpath.join(parent, draw(NAME))
        if any(p == path or p.startswith(path + "/") for p in tree):
            continue
        kind = draw(st.sampled_from(["dir", "file", "file", "sym", "hard"]))
        files = [p for p, n in tree.items() if n.kind == "file" and not n.link]
        if kind == "hard" and files:
            src = draw(st.sampled_from(files))
            tree[path] = Node("file", tree[src].mode, tree[src].mtime, tree[src].data, link=src)
            continue
        owner = {"uid": draw(OWNER), "gid": draw(OWNER)}
        if kind == "dir":
            # a dir the root cannot write into still has to receive its children
            tree[path] = Node("dir", draw(MODE) & 0o7777, draw(TIME), **owner)
            dirs.append(path)
        elif kind == "sym":
            target = draw(st.sampled_from(["a", "../b", "/etc/passwd", "x/../../y", "."]))
            tree[path] = Node("sym", 0o777, draw(TIME), target=target, **owner)
        else:
            data = draw(st.binary(max_size=300))
            tree[path] = Node("file", draw(MODE), draw(TIME), data, **owner)
    return tree


def _info(path: str, node: Node) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(path + ("/" if node.kind == "dir" else ""))
    ti.mode, ti.mtime, ti.uid, ti.gid = node.mode, node.mtime, node.uid, node.gid
    if node.link:
        ti.type, ti.linkname = tarfile.LNKTYPE, node.link
    elif node.kind == "dir":
        ti.type = tarfile.DIRTYPE
    elif node.kind == "sym":
        ti.type, ti.linkname = tarfile.SYMTYPE, node.target
    else:
        ti.size = len(node.data)
    return ti


def tar_of(entries: list[tuple[str, Node | None]]) -> io.BytesIO:
    """A layer tar; ``None`` entries are raw names with no body (whiteouts)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for path, node in entries:
            if node is None:
                tf.addfile(tarfile.TarInfo(path))
                continue
            ti = _info(path, node)
            body = io.BytesIO(node.data) if ti.isreg() else None
            tf.addfile(ti, body)
    buf.seek(0)
    return buf


def ordered(tree: Tree, order: list[int]) -> list[tuple[str, Node | None]]:
    """The tree's entries in a random order, except that a hardlink comes after
    the file it links to (a tar cannot link to what it has not written yet)."""
    items = sorted(tree.items())
    shuffled = [items[i] for i in order if i < len(items)]
    shuffled += [it for it in items if it not in shuffled]
    plain = [(p, n) for p, n in shuffled if not n.link]
    links = [(p, n) for p, n in shuffled if n.link]
    return [*plain, *links]


def read_tree(root: Path) -> Tree:
    out: Tree = {}
    inodes: dict[tuple[int, int], str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in sorted(dirnames + filenames):
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, root)
            st_ = os.lstat(full)
            owner = {"uid": st_.st_uid, "gid": st_.st_gid}
            if stat.S_ISDIR(st_.st_mode):
                out[rel] = Node("dir", stat.S_IMODE(st_.st_mode), int(st_.st_mtime), **owner)
            elif stat.S_ISLNK(st_.st_mode):
                target = os.readlink(full)
                out[rel] = Node("sym", 0o777, int(st_.st_mtime), target=target, **owner)
            else:
                data = Path(full).read_bytes()
                key = (st_.st_dev, st_.st_ino)
                first = inodes.setdefault(key, rel)
                out[rel] = Node(
                    "file",
                    stat.S_IMODE(st_.st_mode),
                    int(st_.st_mtime),
                    data,
                    **owner,
                    link=first if first != rel else "",
                )
    return out


def _canonical(tree: Tree) -> dict[str, tuple[object, ...]]:
    """Hardlink groups as sets of paths (which member is "first" is arbitrary)."""
    groups: dict[str, set[str]] = {}
    for path, node in tree.items():
        if node.kind == "file":
            root = node.link or path
            while tree[root].link:
                root = tree[root].link
            groups.setdefault(root, set()).add(path)
    group_of = {p: frozenset(g) for g in groups.values() for p in g}
    out: dict[str, tuple[object, ...]] = {}
    for path, n in tree.items():
        if n.kind == "file":
            src = tree[n.link] if n.link else n
            # a hardlink entry has no metadata of its own: it is its target's inode
            out[path] = ("file", src.mode, src.mtime, src.data, src.uid, src.gid, group_of[path])
        else:
            out[path] = (n.kind, n.mode, n.mtime, n.target, n.uid, n.gid)
    return out


@contextmanager
def world() -> Iterator[Path]:
    """A root inside a scratch dir with a sentinel beside it that must not change
    (the tests run as root, so cleanup needs no chmod of 0o000 dirs)."""
    with tempfile.TemporaryDirectory(prefix="fuzz-layer-") as tmp:
        base = Path(tmp)
        root = base / "r" / "root"
        root.mkdir(parents=True)
        outside = base / "outside"
        (outside / "sub").mkdir(parents=True)
        (outside / "secret").write_bytes(b"secret")
        before = _fingerprint(base, skip=root)
        try:
            yield root
        finally:
            assert _fingerprint(base, skip=root) == before


def _fingerprint(base: Path, skip: Path) -> dict[str, tuple[int, str]]:
    out: dict[str, tuple[int, str]] = {}
    for dirpath, dirnames, filenames in os.walk(base):
        if Path(dirpath) == skip:
            dirnames[:] = []
            continue
        for name in dirnames + filenames:
            p = Path(dirpath, name)
            if p == skip:
                continue  # the root's own mode is the layer's to set
            st_ = os.lstat(p)
            digest = hashlib.sha256(p.read_bytes()).hexdigest() if stat.S_ISREG(st_.st_mode) else ""
            out[str(p.relative_to(base))] = (st_.st_mode, digest)
    return out


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="owners are only kept by root")


@needs_root
@given(trees(), st.permutations(range(12)))
def test_a_random_tree_round_trips(tree: Tree, order: list[int]) -> None:
    with world() as root:
        apply_tar_stream(tar_of(ordered(tree, order)), root)
        assert _canonical(read_tree(root)) == _canonical(tree)


def _lower_paths(tree: Tree, path: str) -> set[str]:
    return {p for p in tree if p == path or p.startswith(path + "/")}


@st.composite
def layer_pairs(draw: st.DrawFn) -> tuple[Tree, list[tuple[str, Node | None]], Tree]:
    """(lower tree, upper layer entries, the expected result)."""
    lower = draw(trees())
    lower = {p: n for p, n in lower.items() if not n.link}  # keep the model to one inode each
    dirs = [""] + [p for p, n in lower.items() if n.kind == "dir"]
    added: Tree = {}
    for _ in range(draw(st.integers(0, 4))):
        parent = draw(st.sampled_from(dirs))
        path = posixpath.join(parent, draw(NAME))
        if path in added or any(a.startswith(path + "/") for a in added):
            continue
        if lower.get(path, Node("file")).kind == "dir":
            continue  # a dir over a dir merges; the model keeps to replacements
        added[path] = Node("file", draw(MODE), draw(TIME), draw(st.binary(max_size=20)))
    touched = {q for a in added for q in _ancestors(a)} | set(added)
    whiteouts: list[str] = []
    opaque: list[str] = []
    for path in draw(st.lists(st.sampled_from(sorted(lower) or ["nothing"]), max_size=3)):
        if path in touched:
            continue
        if lower.get(path, Node("file")).kind == "dir" and draw(st.booleans()):
            opaque.append(path)
        else:
            whiteouts.append(path)
    if draw(st.booleans()):
        whiteouts.append(posixpath.join(draw(st.sampled_from(dirs)), "never-was"))

    expected = dict(lower)
    for w in whiteouts:
        for p in _lower_paths(lower, w):
            expected.pop(p, None)
    for d in opaque:
        for p in _lower_paths(lower, d) - {d}:
            expected.pop(p, None)
    for path, node in added.items():
        for p in _lower_paths(lower, path):
            expected.pop(p, None)
        expected[path] = node

    entries: list[tuple[str, Node | None]] = [
        *(
            (posixpath.join(posixpath.dirname(w), ".wh." + posixpath.basename(w)), None)
            for w in whiteouts
        ),
        *((posixpath.join(d, ".wh..wh..opq"), None) for d in opaque),
        *added.items(),
    ]
    order = draw(st.permutations(range(len(entries))))
    return lower, [entries[i] for i in order], expected


def _ancestors(path: str) -> list[str]:
    out = []
    while "/" in path:
        path = posixpath.dirname(path)
        out.append(path)
    return out


@needs_root
@given(layer_pairs())
def test_whiteouts_follow_the_image_spec(
    case: tuple[Tree, list[tuple[str, Node | None]], Tree],
) -> None:
    lower, upper, expected = case
    with world() as root:
        apply_tar_stream(tar_of(sorted(lower.items())), root)
        apply_tar_stream(tar_of(upper), root)
        # A dir's mtime moves when an entry is added or removed below it (the
        # upper layer has no entry for it): compare dirs without their times.
        got, want = (
            {p: (v[:2] + v[3:] if v[0] == "dir" else v) for p, v in _canonical(t).items()}
            for t in (read_tree(root), expected)
        )
        assert got == want, (upper, sorted(set(got) ^ set(want)))


HOSTILE_SEGMENTS = ["..", ".", "", "a", "b", ".wh.a", ".wh..wh..opq", ".wh..."]


@st.composite
def hostile_entries(draw: st.DrawFn) -> list[tuple[tarfile.TarInfo, bytes]]:
    out = []
    for _ in range(draw(st.integers(1, 10))):
        name = "/".join(draw(st.lists(st.sampled_from(HOSTILE_SEGMENTS), min_size=1, max_size=5)))
        if draw(st.booleans()):
            name = "/" + name
        ti = tarfile.TarInfo(name)
        kind = draw(st.sampled_from(["reg", "dir", "sym", "hard"]))
        targets = ["..", "../..", "/", "../outside", "../../outside/secret", "a", "a/../..", "/.."]
        data = b""
        if kind == "reg":
            data = draw(st.binary(max_size=8))
            ti.size = len(data)
        elif kind == "dir":
            ti.type = tarfile.DIRTYPE
        elif kind == "sym":
            ti.type, ti.linkname = tarfile.SYMTYPE, draw(st.sampled_from(targets))
        else:
            ti.type, ti.linkname = tarfile.LNKTYPE, draw(st.sampled_from([*targets, "a", "b/a"]))
        ti.mode = 0o755
        out.append((ti, data))
    return out


@given(hostile_entries())
@example([(tarfile.TarInfo("../../outside/secret"), b"")])
def test_hostile_names_never_leave_the_root(entries: list[tuple[tarfile.TarInfo, bytes]]) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for ti, data in entries:
            tf.addfile(ti, io.BytesIO(data) if data else None)
    buf.seek(0)
    # refused by name is fine; what matters is that nothing leaked
    with world() as root, contextlib.suppress(OciworkerError):
        apply_tar_stream(buf, root)
