"""``type=layers``: each final-stage step's layer blob and descriptor, written
while the build runs (``exporter.target.write_layer`` gives the layout).

Every ``layers`` output of a build shares one ``LayerStreamer``: each layer is
diffed once, written to every output, then announced once (``LayerCommitted``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass

from ociworker.core.graph import DiffOp, MergeOp, SourceOp, Vertex
from ociworker.core.oci import (
    ANNOTATION_STEP_INDEX,
    ANNOTATION_UNCOMPRESSED,
    ANNOTATION_VERTEX_DIGEST,
    ANNOTATION_VERTEX_NAME,
    Descriptor,
)
from ociworker.core.outputs import OutputSpec
from ociworker.core.progress import LayerCommitted
from ociworker.errors import UserError
from ociworker.exporter.base import ExportParts, ExportResult, OutputExport, SolveWatch
from ociworker.exporter.chain import chain_name, is_empty
from ociworker.solver.scheduler import Result


@dataclass(frozen=True)
class LayersExport(OutputExport):
    def watch(self, solve: SolveWatch) -> None:
        solve.stream(LayerStreamer, lambda: LayerStreamer(solve)).add(self.output)

    async def export(self, result: ExportResult, parts: ExportParts) -> None:
        return None  # written step by step while the build ran


class LayerStreamer:
    """Writes the layer of each step of the final stage's chain to the ``layers``
    outputs as soon as the step's snapshot is known, while the build goes on.

    The chain is the target vertex and its input 0 (the root a RUN or COPY edits)
    down to the base image or scratch; step index 1 is the lowest step built on
    the base. Base image layers are not written (they come from a registry
    already), nor those a merge or diff step brings (the graph API's: they are
    other steps' blobs); a step that changed nothing makes no layer (BuildKit drops it from
    the image too). A cache hit skips its inputs entirely, so the hit writes the
    layers of the steps below it as well.
    """

    def __init__(self, solve: SolveWatch) -> None:
        self._solve = solve
        self._parts = solve.parts
        self._outs: list[OutputSpec] = []
        steps: list[Vertex] = []
        v = solve.target
        # A merge or diff step ends the chain as a base image does: its layers
        # are other steps' blobs, several snapshots for one step.
        while v is not None and not isinstance(v.op, SourceOp | MergeOp | DiffOp):
            steps.append(v)
            v = v.inputs[0] if v.inputs else None
        steps.reverse()
        self._steps = steps
        self._index = {s.digest: i for i, s in enumerate(steps, 1)}
        self._claimed: set[int] = set()
        self._tasks: list[asyncio.Task[None]] = []

    def add(self, out: OutputSpec) -> None:
        self._outs.append(out)

    def on_result(self, vertex: Vertex, result: Result) -> None:
        index = self._index.get(vertex.digest)
        name = chain_name(result)  # a snapshot, or an imported result's blobs
        if index is None or name is None or index in self._claimed:
            return
        self._claimed.add(index)
        task = asyncio.get_running_loop().create_task(self._write_from(index, name))
        task.add_done_callback(self._done)
        self._tasks.append(task)

    def _done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        error = task.exception()
        if error is not None:
            self._solve.failed(error)

    async def wait(self) -> None:
        """Wait for every layer write; the first failure cancels the rest."""
        try:
            for task in self._tasks:
                await task
        except BaseException:
            await self.cancel()
            raise

    async def cancel(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _write_from(self, index: int, ref: str) -> None:
        chain = await self._parts.layers.chain(ref)
        base = len(chain) - index
        if base < 0:
            raise UserError(f"internal: step {index} has only {len(chain)} snapshots below it")
        # Steps below a cache hit were never visited: nobody else will write them.
        below = [i for i in range(1, index) if i not in self._claimed]
        self._claimed.update(below)
        await asyncio.gather(*(self._write(chain, base, i) for i in [*below, index]))

    async def _write(self, chain: Sequence[str], base: int, index: int) -> None:
        layer = await self._parts.layers.layer_of(chain, base + index - 1, self._solve.opts)
        if is_empty(layer):
            return
        step = self._steps[index - 1]
        d = layer.descriptor
        annotations = {
            **dict(d.annotations),
            ANNOTATION_UNCOMPRESSED: layer.diff_id,
            ANNOTATION_STEP_INDEX: str(index),
            ANNOTATION_VERTEX_DIGEST: step.digest,
            ANNOTATION_VERTEX_NAME: step.name,
        }
        desc = Descriptor(d.media_type, d.digest, d.size, tuple(sorted(annotations.items())))
        committed = LayerCommitted(desc)
        for out in self._outs:

            def write(out: OutputSpec = out) -> None:
                with self._parts.content.open(desc.digest) as blob:
                    self._parts.target.layer(out, committed, blob)

            await asyncio.to_thread(write)
        # After the write: whoever sees the event finds the files in place.
        self._parts.events(committed)
