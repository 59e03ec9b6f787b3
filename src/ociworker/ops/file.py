"""The handler of ``FileOp``: COPY/ADD, mkdir, mkfile and rm done in-process on a
new snapshot of input 0, mounted through the ``Mounter`` (no container)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from pathlib import Path

from ociworker.core.graph import Copy, FileOp, Mkdir, Mkfile, OpSpec, Rm, Vertex
from ociworker.core.mounts import Mount
from ociworker.fs import walk
from ociworker.ops import fileactions as fileops
from ociworker.ops.context import (
    local_context,
    root_parent,
    step_input,
)
from ociworker.ops.parts import StepDeps, StepHandler
from ociworker.snapshot import access
from ociworker.solver.scheduler import Job, Result

#: a file step needs nothing more than any snapshot-making step
FileDeps = StepDeps


class FileHandler(StepHandler[FileDeps]):
    deps_type = FileDeps

    @staticmethod
    def selected(op: OpSpec, index: int) -> list[Copy]:
        """The step's copies from input ``index``."""
        assert isinstance(op, FileOp)
        return [a for a in op.actions if isinstance(a, Copy) and a.src_input == index]

    async def run(self, vertex: Vertex, inputs: Sequence[Result], job: Job) -> Result:
        op = vertex.op
        assert isinstance(op, FileOp)

        async def edit(mounts: Sequence[Mount]) -> None:
            async with contextlib.AsyncExitStack() as stack:
                dest = await stack.enter_async_context(self.deps.mounter.mounted(mounts))
                sources: dict[int, walk.Source] = {}
                for a in op.actions:
                    if isinstance(a, Copy) and a.src_input not in sources:
                        sources[a.src_input] = await self._source(stack, inputs, a.src_input, job)
                await asyncio.to_thread(_apply_actions, dest, op, sources)

        parent = root_parent(inputs)
        return Result("snapshot", await access.new_snapshot(self.deps.snapshots, parent, edit))

    async def _source(
        self, stack: contextlib.AsyncExitStack, inputs: Sequence[Result], i: int, job: Job
    ) -> walk.Source:
        r = step_input(inputs, i, lambda n: f"copy names input {i}, but the step has {n}")
        if r.kind == "dir":
            ctx = local_context(job, r.ref)
            return walk.Source(ctx.root, ctx.ignore, is_context=True)
        d = self.deps
        name = r.ref if r.kind == "snapshot" else None
        root = await stack.enter_async_context(access.view(d.snapshots, d.mounter, name, d.scratch))
        return walk.Source(root)


def _apply_actions(dest: Path, op: FileOp, sources: dict[int, walk.Source]) -> None:
    for a in op.actions:
        if isinstance(a, Copy):
            fileops.do_copy(dest, sources[a.src_input], a, op.cwd)
        elif isinstance(a, Mkdir):
            fileops.do_mkdir(dest, a, op.cwd)
        elif isinstance(a, Mkfile):
            fileops.do_mkfile(dest, a, op.cwd)
        elif isinstance(a, Rm):
            fileops.do_rm(dest, a, op.cwd)
