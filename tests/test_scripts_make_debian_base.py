"""scripts/make_debian_base.py: a root filesystem tree becomes a reproducible layer.

The tree here is a small stand-in for a debootstrap: what the layer must say about it
(names, order, owners, modes, link targets, hard links, clamped mtimes) is read back with
tarfile and compared with what the test made on disk.
"""

from __future__ import annotations

import importlib.util
import io
import os
import sys
import tarfile
from pathlib import Path
from types import ModuleType

_SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
EPOCH = 1_000_000_000


def _load() -> ModuleType:
    # (the script puts its own folder on sys.path for its sibling make_base_image)
    spec = importlib.util.spec_from_file_location(
        "make_debian_base", _SCRIPTS / "make_debian_base.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


mdb = _load()


def _tree(root: Path) -> None:
    (root / "etc/apt").mkdir(parents=True)
    (root / "etc/apt/sources.list.d").mkdir()
    (root / "etc/apt/sources.list.d/debian.sources").write_text("Types: deb\n")
    (root / "usr/bin").mkdir(parents=True)
    (root / "usr/bin/perl").write_bytes(b"\x7fELF perl")
    os.link(root / "usr/bin/perl", root / "usr/bin/perl5.36")
    (root / "usr/bin/perl").chmod(0o755)
    (root / "bin").symlink_to("usr/bin")
    (root / "tmp").mkdir()
    (root / "tmp").chmod(0o1777)
    (root / "etc/shadow").write_text("root:*:1::::::\n")
    (root / "etc/shadow").chmod(0o640)
    if os.geteuid() == 0:
        os.chown(root / "etc/shadow", 0, 42)
    # one file older than the epoch keeps its mtime; the rest are newer and are clamped
    os.utime(root / "etc/apt/sources.list.d/debian.sources", (EPOCH - 50, EPOCH - 50))


def _members(data: bytes) -> list[tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return tar.getmembers()


def test_the_layer_lists_the_tree_sorted_with_clamped_mtimes(tmp_path: Path) -> None:
    _tree(tmp_path)
    members = _members(mdb.build_layer_tar(tmp_path, EPOCH))
    names = [m.name for m in members]
    # every path, parents first, siblings in byte order (tar --sort=name)
    assert names == [
        "bin",
        "etc",
        "etc/apt",
        "etc/apt/sources.list.d",
        "etc/apt/sources.list.d/debian.sources",
        "etc/shadow",
        "tmp",
        "usr",
        "usr/bin",
        "usr/bin/perl",
        "usr/bin/perl5.36",
    ]
    by = {m.name: m for m in members}
    assert by["bin"].issym() and by["bin"].linkname == "usr/bin"
    assert by["usr/bin/perl"].isreg() and by["usr/bin/perl"].mode == 0o755
    assert by["usr/bin/perl5.36"].islnk() and by["usr/bin/perl5.36"].linkname == "usr/bin/perl"
    assert by["tmp"].isdir() and by["tmp"].mode == 0o1777
    assert by["etc/shadow"].mode == 0o640
    if os.geteuid() == 0:
        assert (by["etc/shadow"].uid, by["etc/shadow"].gid) == (0, 42)
    assert all(m.uname == "" and m.gname == "" for m in members)
    assert by["etc/apt/sources.list.d/debian.sources"].mtime == EPOCH - 50
    assert {m.mtime for n, m in by.items() if not n.endswith("debian.sources")} == {EPOCH}


def test_same_tree_same_digest_whatever_the_mtimes(tmp_path: Path) -> None:
    _tree(tmp_path)
    first = mdb.build_image(mdb.build_layer_tar(tmp_path, EPOCH), "amd64", EPOCH, "test")
    # touching every path newer than the epoch (clamped) changes nothing in the image
    for path in tmp_path.rglob("*"):
        if not path.is_symlink() and path.stat().st_mtime > EPOCH:
            os.utime(path)
    again = mdb.build_image(mdb.build_layer_tar(tmp_path, EPOCH), "amd64", EPOCH, "test")
    assert first.manifest.digest == again.manifest.digest
    (tmp_path / "etc/shadow").write_text("root:*:2::::::\n")
    changed = mdb.build_image(mdb.build_layer_tar(tmp_path, EPOCH), "amd64", EPOCH, "test")
    assert changed.manifest.digest != first.manifest.digest
