"""One suite of checks that every snapshotter must pass (real ones and fakes).

Use it from pytest by parametrising over ``CHECKS``::

    @pytest.mark.parametrize("name", sorted(CHECKS))
    async def test_suite(name, tmp_path):
        await CHECKS[name](SuiteContext(factory=MySnapshotter, base=tmp_path))

Checks only go through the ``Snapshotter``/``SnapshotCatalog`` Protocols and
the ``Mount`` values. With ``real_mounts=False`` (no root) a single bind mount
is accessed through its source dir and an overlay upper through ``upperdir``,
which is what a mount would show; anything else needs ``real_mounts=True``
and raises ``UnsupportedError`` otherwise, so the caller can skip. A fake that
keeps only the bookkeeping (``contents=False``) is held to every check that
reads or writes no files; the others raise ``UnsupportedError`` the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from ociworker.core.mounts import Mount, is_bind
from ociworker.errors import NotFoundError, UnsupportedError, UserError
from ociworker.fs.mount import mounted
from ociworker.snapshot.base import Kind, SnapshotCatalog, SnapshotInfo, Snapshotter


class FullSnapshotter(Snapshotter, SnapshotCatalog, Protocol):
    pass


@dataclass(frozen=True)
class SuiteContext:
    factory: Callable[[Path], FullSnapshotter]
    base: Path  # an empty scratch dir owned by this check
    real_mounts: bool = False
    #: True when each snapshot holds a full copy of its parents (native): its
    #: usage then honestly includes the parents' bytes
    copies_parents: bool = False
    #: files the implementation keeps at the top of its root whatever it holds
    #: (e.g. its database); excluded from the "nothing left behind" check
    bookkeeping: frozenset[str] = frozenset({"metadata.db", "metadata.db-wal", "metadata.db-shm"})
    #: False when the snapshots hold no files at all (in-memory fakes): checks
    #: that read or write contents then raise UnsupportedError
    contents: bool = True

    @property
    def root(self) -> Path:
        return self.base / "root"

    @property
    def scratch(self) -> Path:
        p = self.base / "scratch"
        p.mkdir(exist_ok=True)
        return p

    def open(self) -> FullSnapshotter:
        return self.factory(self.root)


def _expect(cond: bool, msg: str) -> None:
    if not cond:
        raise AssertionError(msg)


async def _raises(exc: type[BaseException], aw: Awaitable[object], what: str) -> BaseException:
    try:
        await aw
    except exc as e:
        return e
    raise AssertionError(f"{what}: expected {exc.__name__}")


@contextlib.asynccontextmanager
async def access(ctx: SuiteContext, mounts: Sequence[Mount]) -> AsyncIterator[Path]:
    """The tree that ``mounts`` show, mounted for real or read through the source."""
    _need_contents(ctx)
    if ctx.real_mounts:
        async with mounted(mounts, ctx.scratch) as path:
            yield path
        return
    if len(mounts) == 1 and is_bind(mounts[0]) and not mounts[0].target:
        yield Path(mounts[0].source)
        return
    raise UnsupportedError("this check needs real mounts (root)")


def _need_contents(ctx: SuiteContext) -> None:
    if not ctx.contents:
        raise UnsupportedError("this check reads or writes files; these snapshots hold none")


def writable_dir(mounts: Sequence[Mount]) -> Path:
    """Where to write into an active snapshot without mounting it."""
    (m,) = mounts
    upper = m.option("upperdir")
    if m.type in ("overlay", "fuse-overlayfs") and upper is not None:
        return Path(upper)
    _expect(is_bind(m) and not m.readonly, f"not a writable mount: {m}")
    return Path(m.source)


async def _tree(ctx: SuiteContext, mounts: Sequence[Mount]) -> dict[str, str]:
    """Relative path -> file text (or "<dir>") of what ``mounts`` show."""
    async with access(ctx, mounts) as path:
        return await asyncio.to_thread(_read_tree, path)


def _read_tree(path: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(path):
        rel = os.path.relpath(dirpath, path)
        for d in dirnames:
            out[os.path.normpath(os.path.join(rel, d))] = "<dir>"
        for f in filenames:
            out[os.path.normpath(os.path.join(rel, f))] = Path(dirpath, f).read_text()
    return out


def _files_on_disk(ctx: SuiteContext) -> set[str]:
    out: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(ctx.root):
        rel = os.path.relpath(dirpath, ctx.root)
        for name in dirnames + filenames:
            p = os.path.normpath(os.path.join(rel, name))
            if p not in ctx.bookkeeping:
                out.add(p)
    return out


async def _layer(
    ctx: SuiteContext,
    s: FullSnapshotter,
    name: str,
    parent: str | None,
    edit: Callable[[Path], None],
) -> None:
    """Commit ``name`` on ``parent`` after ``edit`` ran on the mounted active tree."""
    key = f"active-{name}"
    mounts = await s.prepare(key, parent)
    async with access(ctx, mounts) as path:
        await asyncio.to_thread(edit, path)
    await s.commit(name, key)


def _write(rel: str, text: str) -> Callable[[Path], None]:
    def edit(root: Path) -> None:
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)

    return edit


# --- checks ------------------------------------------------------------------


async def check_chain_and_views(ctx: SuiteContext) -> None:
    s = ctx.open()
    await _layer(ctx, s, "sha256:l1", None, _write("etc/a", "1"))
    await _layer(ctx, s, "sha256:l2", "sha256:l1", _write("b", "2"))
    await _layer(ctx, s, "sha256:l3", "sha256:l2", _write("etc/a", "3"))
    want = {
        "sha256:l1": {"etc": "<dir>", "etc/a": "1"},
        "sha256:l2": {"etc": "<dir>", "etc/a": "1", "b": "2"},
        "sha256:l3": {"etc": "<dir>", "etc/a": "3", "b": "2"},
    }
    for name, tree in want.items():
        got = await _tree(ctx, await s.view(f"view-{name}", name))
        _expect(got == tree, f"view of {name}: {got} != {tree}")
        vm = await s.mounts(f"view-{name}")
        _expect(all(_read_only(m) for m in vm), f"view mounts must be read-only: {vm}")
    empty = await _tree(ctx, await s.view("empty", None))
    _expect(empty == {}, f"view of nothing is not empty: {empty}")
    info = await s.stat("sha256:l3")
    _expect(
        info is not None and info.kind == "committed" and info.parent == "sha256:l2",
        f"stat: {info}",
    )


async def check_active_writes_isolated(ctx: SuiteContext) -> None:
    s = ctx.open()
    await _layer(ctx, s, "base", None, _write("f", "base"))
    m1 = await s.prepare("one", "base")
    m2 = await s.prepare("two", "base")
    async with access(ctx, m1) as p:
        await asyncio.to_thread(_write("f", "changed"), p)
        await asyncio.to_thread(_write("new", "x"), p)
    _expect(await _tree(ctx, await s.view("v", "base")) == {"f": "base"}, "parent changed")
    _expect(await _tree(ctx, m2) == {"f": "base"}, "sibling sees writes")
    _expect(await _tree(ctx, await s.mounts("one")) == {"f": "changed", "new": "x"}, "lost writes")


async def check_delete_hides_in_child_only(ctx: SuiteContext) -> None:
    s = ctx.open()

    def base(root: Path) -> None:
        (root / "d").mkdir()
        (root / "d" / "f").write_text("f")
        (root / "g").write_text("g")
        (root / "keep").write_text("k")

    def delete(root: Path) -> None:
        (root / "d" / "f").unlink()
        (root / "d").rmdir()
        (root / "g").unlink()

    await _layer(ctx, s, "base", None, base)
    await _layer(ctx, s, "child", "base", delete)
    await _layer(ctx, s, "grandchild", "child", _write("d/new", "n"))
    child = await _tree(ctx, await s.view("vc", "child"))
    _expect(child == {"keep": "k"}, f"deleted files visible in child: {child}")
    grand = await _tree(ctx, await s.view("vg", "grandchild"))
    _expect(grand == {"keep": "k", "d": "<dir>", "d/new": "n"}, f"grandchild: {grand}")
    parent = await _tree(ctx, await s.view("vb", "base"))
    _expect(parent == {"d": "<dir>", "d/f": "f", "g": "g", "keep": "k"}, f"parent: {parent}")


def _read_only(m: Mount) -> bool:
    # An overlay without an upperdir is read-only by construction.
    overlay = m.type in ("overlay", "fuse-overlayfs")
    return m.readonly or (overlay and m.option("upperdir") is None)


def _info(key: str, kind: Kind, parent: str | None) -> SnapshotInfo:
    return SnapshotInfo(key, kind, parent)


async def check_commit_consumes_key(ctx: SuiteContext) -> None:
    s = ctx.open()
    await s.prepare("k", None)
    _expect((await s.stat("k")) == _info("k", "active", None), "stat of active")
    await s.commit("n", "k")
    _expect(await s.stat("k") is None, "key still there after commit")
    _expect((await s.stat("n")) == _info("n", "committed", None), "stat of committed")
    await _raises(NotFoundError, s.mounts("k"), "mounts of a committed key")
    await _raises(NotFoundError, s.commit("n2", "k"), "second commit of a key")
    await _raises(UserError, s.mounts("n"), "mounts of a committed name")
    await s.view("v", "n")
    await _raises(NotFoundError, s.commit("n3", "v"), "commit of a view")


async def check_errors(ctx: SuiteContext) -> None:
    s = ctx.open()
    await s.prepare("k", None)
    await _raises(FileExistsError, s.prepare("k", None), "prepare of an existing key")
    await _raises(FileExistsError, s.view("k", None), "view with an existing key")
    await _raises(NotFoundError, s.prepare("x", "missing"), "prepare on a missing parent")
    await _raises(NotFoundError, s.prepare("x", "k"), "prepare on an active parent")
    await _raises(NotFoundError, s.remove("missing"), "remove of a missing key")
    await _raises(NotFoundError, s.mounts("missing"), "mounts of a missing key")
    await _raises(NotFoundError, s.usage("missing"), "usage of a missing key")
    await s.prepare("k2", None)
    await _raises(FileExistsError, s.commit("k2", "k"), "commit onto an existing key")
    _expect(await s.stat("x") is None, "failed prepare left a key")


async def check_stat_walk_usage(ctx: SuiteContext) -> None:
    s = ctx.open()
    await _layer(ctx, s, "big", None, _write("blob", "x" * 200_000))
    await _layer(ctx, s, "small", "big", _write("tiny", "y"))
    await s.prepare("act", "small")
    await s.view("vw", "big")
    walked = {i.key: i for i in await s.walk()}
    _expect(
        walked
        == {
            "big": _info("big", "committed", None),
            "small": _info("small", "committed", "big"),
            "act": _info("act", "active", "small"),
            "vw": _info("vw", "view", "big"),
        },
        f"walk: {walked}",
    )
    big = await s.usage("big")
    small = await s.usage("small")
    _expect(big >= 200_000, f"usage of big: {big}")
    act = await s.usage("act")
    if ctx.copies_parents:
        _expect(small >= big and act >= small, f"usage of copies: {big}, {small}, {act}")
    else:
        _expect(small < 100_000, f"usage of small counts its parent: {small}")
        _expect(act < 100_000, f"usage of an untouched active counts parents: {act}")


async def check_remove_leaves_nothing(ctx: SuiteContext) -> None:
    s = ctx.open()
    await s.walk()  # let the implementation create its bookkeeping
    baseline = _files_on_disk(ctx)
    await _layer(ctx, s, "a", None, _write("x/y", "1"))
    await _layer(ctx, s, "b", "a", _write("x/z", "2"))
    await s.prepare("act", "b")
    await s.view("vw", "a")
    e = await _raises(UserError, s.remove("a"), "remove of a parent")
    _expect(not isinstance(e, NotFoundError), f"wrong error for a parent: {e!r}")
    _expect((await s.stat("a")) is not None, "failed remove removed")
    for key in ("act", "vw", "b", "a"):
        await s.remove(key)
    _expect(list(await s.walk()) == [], "walk after removing all")
    left = _files_on_disk(ctx) - baseline
    _expect(not left, f"left on disk: {sorted(left)}")


async def check_survives_reopen(ctx: SuiteContext) -> None:
    s = ctx.open()
    await _layer(ctx, s, "a", None, _write("f", "1"))
    await s.prepare("act", "a")
    del s
    s2 = ctx.open()
    _expect((await s2.stat("a")) == _info("a", "committed", None), "committed lost on reopen")
    _expect((await s2.stat("act")) == _info("act", "active", "a"), "active lost on reopen")
    _expect(await _tree(ctx, await s2.view("v", "a")) == {"f": "1"}, "content lost on reopen")


async def check_concurrent_commits(ctx: SuiteContext) -> None:
    # Two objects on one root stand in for two processes.
    s1, s2 = ctx.open(), ctx.open()
    await s1.prepare("k1", None)
    await s2.prepare("k2", None)
    results = await asyncio.gather(
        s1.commit("same", "k1"), s2.commit("same", "k2"), return_exceptions=True
    )
    errors = [r for r in results if isinstance(r, BaseException)]
    _expect(len(errors) == 1, f"want exactly one failure: {results}")
    _expect(isinstance(errors[0], FileExistsError), f"loser got {errors[0]!r}")
    loser = "k2" if results[0] is None else "k1"
    _expect((await s1.stat(loser)) == _info(loser, "active", None), "loser key lost")
    await s1.remove(loser)


async def check_crash_before_commit(ctx: SuiteContext) -> None:
    _need_contents(ctx)
    s = ctx.open()
    await s.walk()
    baseline = _files_on_disk(ctx)
    mounts = await s.prepare("crashed", None)
    await asyncio.to_thread(_write("half", "written"), writable_dir(mounts))
    del s  # the process "dies" without committing
    s2 = ctx.open()
    _expect((await s2.stat("crashed")) == _info("crashed", "active", None), "crashed key lost")
    await s2.mounts("crashed")
    await s2.remove("crashed")
    _expect(_files_on_disk(ctx) - baseline == set(), "crashed key left files")


async def check_hostile_keys(ctx: SuiteContext) -> None:
    s = ctx.open()
    keys = ["../../escape", "/abs/path", "a/b/../c", "sha256:" + "f" * 64, "with\nnewline", ""]
    parent: str | None = None
    for i, k in enumerate(keys):
        await _layer(ctx, s, k, parent, _write(f"f{i}", str(i)))
        parent = k
    _expect(not (ctx.base / "escape").exists(), "a key escaped the root")
    _expect(not Path("/abs/path").exists(), "a key escaped the root")
    want = {f"f{i}": str(i) for i in range(len(keys))}
    _expect(await _tree(ctx, await s.view("v", parent)) == want, "chain of odd keys")


async def check_bookkeeping_and_remove_order(ctx: SuiteContext) -> None:
    # What stat_walk_usage and remove_leaves_nothing check of the bookkeeping,
    # without any files, so snapshotters that hold none are held to it too.
    s = ctx.open()
    for name, parent in (("a", None), ("b", "a")):
        await s.prepare(f"k-{name}", parent)
        await s.commit(name, f"k-{name}")
    await s.prepare("act", "b")
    await s.view("vw", "a")
    await s.view("empty", None)
    walked = {i.key: i for i in await s.walk()}
    want = {
        "a": _info("a", "committed", None),
        "b": _info("b", "committed", "a"),
        "act": _info("act", "active", "b"),
        "vw": _info("vw", "view", "a"),
        "empty": _info("empty", "view", None),
    }
    _expect(walked == want, f"walk: {walked}")
    # (key, whether a child still blocks its removal), in this order.
    steps = [
        ("a", True),
        ("b", True),
        ("act", False),
        ("b", False),
        ("a", True),  # a view is a child too
        ("vw", False),
        ("a", False),
        ("empty", False),
    ]
    for key, blocked in steps:
        if blocked:
            e = await _raises(UserError, s.remove(key), f"remove of parent {key}")
            _expect(not isinstance(e, NotFoundError), f"wrong error for parent {key}: {e!r}")
            _expect(await s.stat(key) == want[key], f"failed remove of {key} changed it")
        else:
            await s.remove(key)
            _expect(await s.stat(key) is None, f"{key} still there after remove")
    _expect(list(await s.walk()) == [], "walk after removing all")


async def check_reopen_keeps_bookkeeping(ctx: SuiteContext) -> None:
    # survives_reopen and crash_before_commit without any files.
    s = ctx.open()
    await s.prepare("k", None)
    await s.commit("a", "k")
    await s.prepare("act", "a")
    await s.view("vw", "a")
    del s
    s2 = ctx.open()
    _expect((await s2.stat("a")) == _info("a", "committed", None), "committed lost on reopen")
    _expect((await s2.stat("act")) == _info("act", "active", "a"), "active lost on reopen")
    _expect((await s2.stat("vw")) == _info("vw", "view", "a"), "view lost on reopen")
    _expect(not any(map(_read_only, await s2.mounts("act"))), "active not writable on reopen")
    _expect(all(map(_read_only, await s2.mounts("vw"))), "view not read-only on reopen")
    await s2.commit("b", "act")
    _expect((await s2.stat("b")) == _info("b", "committed", "a"), "commit after reopen")
    await _raises(FileExistsError, s2.prepare("vw", None), "prepare of a key from before")


async def check_view_is_read_only(ctx: SuiteContext) -> None:
    if not ctx.real_mounts:
        raise UnsupportedError("read-only is only enforced by real mounts")
    s = ctx.open()
    await _layer(ctx, s, "a", None, _write("f", "1"))
    await _layer(ctx, s, "b", "a", _write("g", "2"))
    for key, parent in (("v1", "a"), ("v2", "b")):
        async with access(ctx, await s.view(key, parent)) as p:
            await _raises(OSError, asyncio.to_thread(_write("new", "x"), p), f"write in {key}")


async def _deep_chain(ctx: SuiteContext, depth: int) -> None:
    _need_contents(ctx)
    s = ctx.open()
    parent: str | None = None
    for i in range(depth):
        key, name = f"k{i}", f"layer-{i}"
        mounts = await s.prepare(key, parent)
        # Written without mounting: one mount per layer would dominate the run time.
        (writable_dir(mounts) / f"f{i}").write_text("")
        await s.commit(name, key)
        parent = name
    got = await _tree(ctx, await s.view("top", parent))
    _expect(got == {f"f{i}": "" for i in range(depth)}, f"{depth}-deep view: {len(got)} files")
    mounts = await s.prepare("child", parent)
    async with access(ctx, mounts) as p:
        await asyncio.to_thread(_write("f0", "changed"), p)
        n = len(await asyncio.to_thread(os.listdir, p))
    _expect(n == depth, f"{depth}-deep active: {n} files")


async def check_deep_chain_200(ctx: SuiteContext) -> None:
    await _deep_chain(ctx, 200)


async def check_deep_chain_600(ctx: SuiteContext) -> None:
    await _deep_chain(ctx, 600)


Check = Callable[[SuiteContext], Awaitable[None]]

CHECKS: dict[str, Check] = {
    "chain_and_views": check_chain_and_views,
    "active_writes_isolated": check_active_writes_isolated,
    "delete_hides_in_child_only": check_delete_hides_in_child_only,
    "commit_consumes_key": check_commit_consumes_key,
    "errors": check_errors,
    "bookkeeping_and_remove_order": check_bookkeeping_and_remove_order,
    "reopen_keeps_bookkeeping": check_reopen_keeps_bookkeeping,
    "stat_walk_usage": check_stat_walk_usage,
    "remove_leaves_nothing": check_remove_leaves_nothing,
    "survives_reopen": check_survives_reopen,
    "concurrent_commits": check_concurrent_commits,
    "crash_before_commit": check_crash_before_commit,
    "hostile_keys": check_hostile_keys,
    "view_is_read_only": check_view_is_read_only,
    "deep_chain_200": check_deep_chain_200,
    "deep_chain_600": check_deep_chain_600,
}
