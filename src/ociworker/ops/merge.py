"""The handler of ``MergeOp`` (BuildKit's MergeOp): every layer of each later
input's chain applied in order, whiteouts included, over the first input's
chain (scratch: over nothing). As in BuildKit the layers stay apart: each
applied layer is a snapshot of its own, recorded with the very blob it came
from, so the merged image reuses the inputs' blobs (a registry mounts them)
instead of a new squashed one. Two inputs built on the same base apply that
base's layers again, which restores what the first input deleted from it:
BuildKit's semantics, and why ``merge(base, diff(base, a), diff(base, b))`` is
the idiom for independent changes."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

from ociworker.core.graph import Vertex
from ociworker.core.mounts import Mount
from ociworker.core.oci import Layer
from ociworker.exporter.chain import layer_cache_key
from ociworker.exporter.layercache import SOURCE
from ociworker.ops.layered import LAYER_OPTS, LayeredHandler, snapshot_of
from ociworker.snapshot import access
from ociworker.solver.scheduler import SCRATCH, Job, Result


class MergeHandler(LayeredHandler):
    async def run(self, vertex: Vertex, inputs: Sequence[Result], job: Job) -> Result:
        names = [snapshot_of(r, "merge") for r in inputs]
        top = names[0] if names else None
        layers = self.chain_layers()
        d = self.deps
        for name in names[1:]:
            if name is None:
                continue  # scratch adds nothing
            chain = await layers.chain(name)
            for i, below in enumerate(chain):
                layer = await layers.layer_of(chain, i, LAYER_OPTS)
                top = await access.new_snapshot(d.snapshots, top, _applying(self, layer))
                # the blob it came from is this snapshot's layer: a pulled (or a
                # diff's) one is exported as it came, a built one in the
                # compression it was made in (another compression diffs again)
                pulled = d.layers.get_layer(below, SOURCE) is not None
                d.layers.put_layer(top, SOURCE if pulled else layer_cache_key(LAYER_OPTS), layer)
        return Result("snapshot", top) if top is not None else SCRATCH


def _applying(handler: MergeHandler, layer: Layer) -> Callable[[Sequence[Mount]], Awaitable[None]]:
    async def edit(mounts: Sequence[Mount]) -> None:
        await handler.deps.applier.apply(layer.descriptor, mounts)

    return edit
