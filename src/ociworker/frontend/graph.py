"""The ``graph.v1`` frontend: the definition file is a serialized graph (pure)."""

from __future__ import annotations

from ociworker.definition import decode
from ociworker.frontend.base import FrontendInputs, FrontendResult


class GraphFrontend:
    """Reads a ``graph.v1`` definition (protobuf or JSON, ``ociworker.definition``),
    every check of ``decode`` made before the worker sees a vertex."""

    def solve(self, inputs: FrontendInputs) -> FrontendResult:
        data = inputs.definition
        if data.startswith(b"#"):
            # a JSON definition picked by its "# syntax=graph.v1" line: JSON
            # has no comments, so the directive line goes (protobuf never
            # starts with "#": that is field 4 with the group wire type)
            data = data.partition(b"\n")[2]
        d = decode(data)
        return FrontendResult(d.target, d.image_config or {})
