"""The handler of ``DiffOp`` (BuildKit's DiffOp): the changes from lower to
upper as a snapshot of its own (no parent). Its files are what upper added or
changed; its recorded layer is the comparer's blob, whiteouts included, so an
image of it or a merge over it also deletes what upper removed from lower."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Sequence

from ociworker.core.graph import Vertex
from ociworker.core.mounts import Mount
from ociworker.errors import UserError
from ociworker.exporter.layercache import SOURCE
from ociworker.ops.layered import LAYER_OPTS, LayeredHandler, snapshot_of
from ociworker.snapshot import access
from ociworker.solver.scheduler import Job, Result


class DiffHandler(LayeredHandler):
    async def run(self, vertex: Vertex, inputs: Sequence[Result], job: Job) -> Result:
        if len(inputs) != 2:
            raise UserError(f"diff takes two inputs (lower, upper), not {len(inputs)}")
        lower = snapshot_of(inputs[0], "diff")
        upper = snapshot_of(inputs[1], "diff")
        if upper is None:
            raise UserError("diff: the upper filesystem is scratch (nothing to take changes from)")
        d = self.deps
        async with contextlib.AsyncExitStack() as stack:
            upper_mounts = await self._view(stack, upper)
            lower_mounts = await self._view(stack, lower) if lower is not None else ()
            layer = await self.comparer().compare(lower_mounts, upper_mounts, LAYER_OPTS)

        async def edit(mounts: Sequence[Mount]) -> None:
            await d.applier.apply(layer.descriptor, mounts)

        name = await access.new_snapshot(d.snapshots, None, edit)
        # The blob with its whiteouts is this snapshot's layer, whatever the
        # compression an export asks for (as a pulled layer's): a diff of the
        # snapshot from nothing would lose the deletions.
        d.layers.put_layer(name, SOURCE, layer)
        return Result("snapshot", name)

    async def _view(self, stack: contextlib.AsyncExitStack, name: str) -> Sequence[Mount]:
        key = f"diff-{uuid.uuid4().hex}"
        mounts = await self.deps.snapshots.view(key, name)
        stack.push_async_callback(self.deps.snapshots.remove, key)
        return mounts
