"""The overlayfs snapshotter: each snapshot's own tree is an overlay upperdir.

Mounts (others depend on exactly this shape):

- active, no parent: ``bind`` of its ``fs`` (``rbind``, ``rw``);
- active with parents: ``overlay`` with ``lowerdir`` (nearest parent first),
  ``upperdir=<dir>/fs`` and ``workdir=<dir>/work``;
- view of one committed layer: ``bind`` of that layer's ``fs`` (``rbind``, ``ro``);
- view of two or more layers: ``overlay`` with only ``lowerdir`` (read-only).

Deep chains. overlayfs takes at most 500 lower layers, and the mount(2) data is
one page; ``mount_all`` already retries with paths relative to
``<root>/snapshots`` (about 8 bytes a layer), which covers a few hundred. Past
that, the chain is cut at checkpoints: every ``FLATTEN_EVERY``-th committed
layer (counting from the base) can carry ``<dir>/flat``, a merged copy of the
whole chain up to and including it, built once by mounting that chain
read-only and copying it out with ``cp -a`` (whiteouts are already applied by
the kernel there). A deep chain is then mounted as the layers above the nearest
checkpoint plus that checkpoint's flat copy, so no mount has more than
``FLATTEN_EVERY + 1`` lowers. Flat copies are cached (a committed chain never
changes), shared by every descendant, and deleted with their snapshot, which
cannot be removed while it has children. Each layer's own ``fs`` is untouched,
so layer diffs are unaffected. Building a flat copy needs mount privileges,
like the rest of this snapshotter.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import uuid
from pathlib import Path

from ociworker.core.mounts import Mount
from ociworker.errors import ConfigError, HostError
from ociworker.fs.mount import (
    FUSE_OVERLAY,
    MAX_OVERLAY_LOWERS,
    mount_all,
    overlay_data_fits,
    unmount,
)
from ociworker.fs.tree import copy_tree, rmtree
from ociworker.snapshot.dirstore import DirSnapshotter, Row

#: distance between flattening checkpoints; small enough that this many
#: relative lowerdirs always fit in a page, large enough to copy rarely
FLATTEN_EVERY = 128


class OverlaySnapshotter(DirSnapshotter):
    #: the mount type of overlay mounts (``FuseOverlaySnapshotter``: fuse-overlayfs)
    mount_type = "overlay"

    def __init__(self, root: Path, *, userxattr: bool = False) -> None:
        """``userxattr``: overlayfs keeps its whiteout and opaque marks in
        ``user.overlay.*`` xattrs, as it must in a user namespace (a rootless
        worker), where the ``trusted.*`` ones are the host root's alone."""
        super().__init__(root)
        self._extra: tuple[str, ...] = ("userxattr",) if userxattr else ()
        # These characters separate overlay options and lowerdirs; refusing
        # them is simpler and safer than escaping them for the kernel parser.
        if any(c in os.fspath(self.root) for c in ":,\\"):
            raise ConfigError(
                f"overlay snapshotter root {self.root} must not contain ':', ',' or '\\'"
            )

    def _populate(self, row: Row, chain: list[Row]) -> None:
        fs = self.fs_of(row.id)
        fs.mkdir()
        fs.chmod(0o755)
        if row.kind == "active" and chain:
            (self.dir_of(row.id) / "work").mkdir()

    def _mounts_of(self, row: Row, chain: list[Row]) -> list[Mount]:
        fs = os.fspath(self.fs_of(row.id))
        if row.kind == "active":
            if not chain:
                return [Mount(type="bind", source=fs, options=("rbind", "rw"))]
            upper = (
                f"upperdir={fs}",
                f"workdir={self.dir_of(row.id) / 'work'}",
                *self._extra,
            )
            lowers = self._lowers(chain, upper)
            return [
                Mount(
                    type=self.mount_type,
                    source="overlay",
                    options=("lowerdir=" + ":".join(lowers), *upper),
                )
            ]
        if not chain:
            return [Mount(type="bind", source=fs, options=("rbind", "ro"))]
        if len(chain) == 1:
            return [
                Mount(
                    type="bind", source=os.fspath(self.fs_of(chain[0].id)), options=("rbind", "ro")
                )
            ]
        lowers = self._lowers(chain, self._extra)
        return [
            Mount(
                type=self.mount_type,
                source="overlay",
                options=("lowerdir=" + ":".join(lowers), *self._extra),
            )
        ]

    def _lowers(self, chain: list[Row], extra: tuple[str, ...]) -> list[str]:
        """Lower dirs (nearest first) for committed ``chain``, flattening if needed."""
        plain = [os.fspath(self.fs_of(r.id)) for r in chain]
        candidate = Mount(
            type=self.mount_type,
            source="overlay",
            options=("lowerdir=" + ":".join(plain), *extra),
        )
        if len(plain) <= MAX_OVERLAY_LOWERS and overlay_data_fits(candidate):
            return plain
        depth = len(chain)
        checkpoint = ((depth - 1) // FLATTEN_EVERY) * FLATTEN_EVERY
        if checkpoint == 0:
            raise HostError(
                f"cannot mount {depth} overlay layers under {self.root}: "
                "the layer paths are too long even for flattening"
            )
        above = depth - checkpoint
        return [*plain[:above], os.fspath(self._flat(chain[above:]))]

    def _flat(self, chain: list[Row]) -> Path:
        """The cached merged copy of committed ``chain`` (its top first)."""
        target = self.dir_of(chain[0].id) / "flat"
        if target.is_dir():
            return target
        lowers = self._lowers(chain, self._extra)
        building = self.dir_of(chain[0].id) / f"flat.tmp-{uuid.uuid4().hex}"
        try:
            if len(lowers) == 1:
                copy_tree(Path(lowers[0]), building)
            else:
                mnt = Path(tempfile.mkdtemp(dir=self.tmp_dir, prefix="flat-"))
                try:
                    mount_all(
                        [
                            Mount(
                                type=self.mount_type,
                                source="overlay",
                                options=("lowerdir=" + ":".join(lowers), *self._extra),
                            )
                        ],
                        mnt,
                    )
                    try:
                        copy_tree(mnt, building)
                    finally:
                        unmount(mnt)
                finally:
                    mnt.rmdir()
            try:
                os.rename(building, target)
            except OSError:
                # Another process published the same copy first; both are equal.
                if not target.is_dir():
                    raise
        finally:
            with contextlib.suppress(FileNotFoundError):
                rmtree(building)
        return target


class FuseOverlaySnapshotter(OverlaySnapshotter):
    """The overlay layout mounted by ``fuse-overlayfs`` (in user space): the
    rootless fallback where the kernel's overlayfs cannot mount in a user
    namespace (Linux < 5.11). Its upper dirs mark deletions its own way, so the
    differ compares the mounted trees rather than reading them."""

    mount_type = FUSE_OVERLAY

    def __init__(self, root: Path) -> None:
        super().__init__(root)  # no userxattr: fuse-overlayfs keeps its own marks
