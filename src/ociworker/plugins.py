"""The frontend registry: built-in frontends and those installed as plugins.

``dockerfile.v0`` (BuildKit's name; alias ``dockerfile``) and ``graph.v1``
are built in. A package adds one with an entry point in the group
``ociworker.frontends``: its name is the frontend's name, its object a
``frontend.base.Frontend`` or a callable (a class) that returns one::

    [project.entry-points."ociworker.frontends"]
    "lines.v1" = "lines_frontend:LinesFrontend"

The Dockerfile frontend keeps its own path in the controller (it resolves
base images in rounds and builds the image history from the Dockerfile);
every other frontend is called through ``Frontend.solve``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ociworker.errors import ConfigError

if TYPE_CHECKING:
    from importlib.metadata import EntryPoint

    from ociworker.frontend.base import Frontend

GROUP = "ociworker.frontends"
DOCKERFILE = "dockerfile.v0"
GRAPH = "graph.v1"
_ALIASES = {"dockerfile": DOCKERFILE}


@dataclass(frozen=True)
class Chosen:
    """A frontend picked by name: the Dockerfile's (``frontend`` None) or another."""

    name: str
    frontend: Frontend | None


def _plugins() -> dict[str, EntryPoint]:
    # imported here: reading every installed distribution's metadata is for
    # builds that name a frontend, not for every start of the CLI
    import importlib.metadata

    return {ep.name: ep for ep in importlib.metadata.entry_points(group=GROUP)}


def names() -> list[str]:
    """Every frontend name this process knows (built-ins first)."""
    plugins = sorted(n for n in _plugins() if n not in (DOCKERFILE, GRAPH, *_ALIASES))
    return [DOCKERFILE, GRAPH, *plugins]


def known(name: str) -> bool:
    name = _ALIASES.get(name, name)
    return name in (DOCKERFILE, GRAPH) or name in _plugins()


def get(name: str) -> Chosen:
    """The frontend called ``name`` (or an alias); ``ConfigError`` naming the
    registered ones when there is none, or when its plugin cannot be loaded."""
    name = _ALIASES.get(name or DOCKERFILE, name or DOCKERFILE)
    if name == DOCKERFILE:
        return Chosen(DOCKERFILE, None)
    if name == GRAPH:
        # loaded when asked for: it brings the protobuf runtime, which a Dockerfile
        # build (the common case) never needs
        from ociworker.frontend.graph import GraphFrontend

        return Chosen(GRAPH, GraphFrontend())
    ep = _plugins().get(name)
    if ep is None:
        raise ConfigError(
            f"unknown frontend {name!r} (registered: {', '.join(names())}; "
            f"plugins register in the entry-point group {GROUP!r})"
        )
    try:
        obj = ep.load()
        # a class (or factory) is called; an object with solve() is the frontend
        frontend = obj() if isinstance(obj, type) or not hasattr(obj, "solve") else obj
    except Exception as exc:  # a broken plugin is the build's error, not a crash
        raise ConfigError(f"frontend {name!r} ({ep.value}) could not be loaded: {exc}") from None
    if not callable(getattr(frontend, "solve", None)):
        raise ConfigError(f"frontend {name!r} ({ep.value}) has no solve(inputs) method")
    return Chosen(name, frontend)
