"""What a frontend is: one small Protocol (pure).

A frontend turns a build's declaration into a graph (BuildKit's
``Frontend.Solve``). It reads its inputs only through the ``FrontendInputs``
it is given: the definition file's bytes (what ``-f``, ``FILE`` or stdin
named) and a ``ContextReader`` that returns a file of the build context,
bounded in size and confined to the context (no ``..``, no symlink out, no
file the ``.dockerignore`` hides). It returns a value: the graph's target
vertex and an image config. It runs nothing; the worker validates and solves
what it returns, so a frontend cannot touch the host.

Third-party frontends are found through the ``ociworker.frontends`` entry-point
group (``ociworker.plugins``): the entry's name is the frontend's name, its
object a ``Frontend`` or a callable returning one.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from ociworker.core.graph import Vertex

#: the most a frontend may read of one context file
MAX_READ_BYTES = 16 << 20


class ContextReader(Protocol):
    def read(self, path: str) -> bytes:
        """The bytes of the context file ``path`` (relative to the context);
        ``NotFoundError`` when there is none, ``UnsafePathError`` for a path
        that leaves the context, ``UserError`` past ``MAX_READ_BYTES``."""
        ...


@dataclass(frozen=True)
class FrontendInputs:
    #: the definition file's bytes and its name
    definition: bytes
    filename: str
    context: ContextReader
    #: BuildKit's frontend options: ``build-arg:NAME``, ``target``, and what
    #: the caller passed (SolveRequest.frontend_opts)
    opts: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class FrontendResult:
    #: the vertex to export (None: an empty filesystem)
    target: Vertex | None
    #: the image config (OCI: architecture, os, config{Env, Cmd, ...}); the
    #: worker fills what is missing (platform, rootfs, history)
    image_config: Mapping[str, Any] = field(default_factory=dict)


class Frontend(Protocol):
    def solve(self, inputs: FrontendInputs) -> FrontendResult: ...
