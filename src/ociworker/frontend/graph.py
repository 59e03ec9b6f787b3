"""The ``graph.v1`` frontend: the definition file is a serialized graph (pure)."""

from __future__ import annotations

from ociworker.core.definition import decode
from ociworker.frontend.base import FrontendInputs, FrontendResult


class GraphFrontend:
    """Reads a ``graph.v1`` definition (protobuf or JSON, ``core.definition``),
    every check of ``decode`` made before the worker sees a vertex."""

    def solve(self, inputs: FrontendInputs) -> FrontendResult:
        d = decode(inputs.definition)
        return FrontendResult(d.target, d.image_config or {})
