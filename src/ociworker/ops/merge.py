"""The handler of ``MergeOp`` (BuildKit's MergeOp): a new snapshot on the first
input (scratch: on nothing), with every layer of each later input's chain
applied in order, whiteouts included. Unlike BuildKit, whose merge keeps each
input's layers apart, the applied layers become the one layer of the new
snapshot. Two inputs built on the same base apply that base's layers again: a
no-op for the files, as in BuildKit's merge of independent layers."""

from __future__ import annotations

from collections.abc import Sequence

from ociworker.core.graph import Vertex
from ociworker.core.mounts import Mount
from ociworker.ops.layered import LAYER_OPTS, LayeredHandler, snapshot_of
from ociworker.snapshot import access
from ociworker.solver.scheduler import SCRATCH, Job, Result


class MergeHandler(LayeredHandler):
    async def run(self, vertex: Vertex, inputs: Sequence[Result], job: Job) -> Result:
        names = [snapshot_of(r, "merge") for r in inputs]
        # On the first input (its chain stays the image's lower layers), even when
        # nothing is applied over it: one merge step is one layer, as the graph
        # API's history says.
        base = names[0] if names else None
        rest = [n for n in names[1:] if n is not None]
        if base is None and not rest:
            return SCRATCH
        layers = self.chain_layers()
        d = self.deps

        async def edit(mounts: Sequence[Mount]) -> None:
            for top in rest:
                chain = await layers.chain(top)
                for i in range(len(chain)):
                    layer = await layers.layer_of(chain, i, LAYER_OPTS)
                    await d.applier.apply(layer.descriptor, mounts)

        return Result("snapshot", await access.new_snapshot(d.snapshots, base, edit))
