"""The native snapshotter: every active snapshot is a full copy of its parent."""

from __future__ import annotations

import os

from ociworker.core.mounts import Mount
from ociworker.fs.tree import copy_tree
from ociworker.snapshot.dirstore import DirSnapshotter, Row


class NativeSnapshotter(DirSnapshotter):
    """Each active snapshot is a full copy of its parent's tree; mounts are binds.

    Works on any filesystem and without overlayfs; costs a copy per ``prepare``
    (cheap with reflinks). A view binds the committed parent's tree read-only
    instead of copying it: committed trees never change.
    """

    def _populate(self, row: Row, chain: list[Row]) -> None:
        fs = self.fs_of(row.id)
        if row.kind == "active" and chain:
            copy_tree(self.fs_of(chain[0].id), fs)
        else:
            fs.mkdir()
            fs.chmod(0o755)

    def _mounts_of(self, row: Row, chain: list[Row]) -> list[Mount]:
        if row.kind == "view":
            source = self.fs_of(chain[0].id) if chain else self.fs_of(row.id)
            return [Mount(type="bind", source=os.fspath(source), options=("rbind", "ro"))]
        return [Mount(type="bind", source=os.fspath(self.fs_of(row.id)), options=("rbind", "rw"))]
