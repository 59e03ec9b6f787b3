"""Which handler runs which op: the registration table and the solver's resolver.

To add an op type, write ``ops/<name>.py`` with its handler: a subclass of
``parts.HandlerBase`` naming its small deps dataclass (``deps_type``, whose
fields are named after the ``OpParts`` they take) with ``cache_key`` and ``run``
for a vertex; and add one line to ``HANDLERS`` below mapping the op's class to
the handler's ``from_parts``. Nothing else changes: the worker builds every
registered handler from the same ``OpParts``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from ociworker.core.graph import DiffOp, ExecOp, FileOp, HttpSourceOp, MergeOp, SourceOp, Vertex
from ociworker.errors import UnsupportedError
from ociworker.ops.diff import DiffHandler
from ociworker.ops.exec import ExecHandler
from ociworker.ops.file import FileHandler
from ociworker.ops.http import HttpHandler
from ociworker.ops.merge import MergeHandler
from ociworker.ops.parts import OpParts
from ociworker.ops.source import SourceHandler
from ociworker.solver.scheduler import OpHandler

#: op class -> how to build its handler from the worker's parts
HANDLERS: Mapping[type, Callable[[OpParts], OpHandler]] = {
    SourceOp: SourceHandler.from_parts,
    ExecOp: ExecHandler.from_parts,
    FileOp: FileHandler.from_parts,
    HttpSourceOp: HttpHandler.from_parts,
    MergeOp: MergeHandler.from_parts,
    DiffOp: DiffHandler.from_parts,
}


class OpResolver:
    """The solver's ``Resolver``: the handler registered for the vertex's op type."""

    def __init__(self, handlers: Mapping[type, OpHandler]) -> None:
        self._handlers = dict(handlers)

    @classmethod
    def from_parts(
        cls, parts: OpParts, registry: Mapping[type, Callable[[OpParts], OpHandler]] = HANDLERS
    ) -> OpResolver:
        return cls({op: make(parts) for op, make in registry.items()})

    def handler(self, vertex: Vertex) -> OpHandler:
        found = self._handlers.get(type(vertex.op))
        if found is None:
            raise UnsupportedError(
                f"no handler for op type {type(vertex.op).__name__} "
                f"(step {vertex.name or vertex.digest}); register one in ociworker.ops.registry"
            )
        return found
