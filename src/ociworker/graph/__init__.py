"""``ociworker.graph``: declare images in Python, as BuildKit's Go ``llb``
package does, without writing a Dockerfile.

A ``State`` is a filesystem and its image config. Start from ``image(ref)``,
``scratch()``, ``local(name)``, ``git(url, ref)`` or ``http(url)``; every
method returns a new state (nothing changes in place, so one state can be the
base of many)::

    from ociworker import graph as g

    base = g.image("127.0.0.1:5000/busybox:latest")
    app = (
        base.copy(g.local(), "message.txt", "/message.txt")
        .run("wc -c /message.txt > /size", mounts=[g.cache("/var/cache/app")])
        .with_cmd(["cat", "/size"])
    )
    g.build(app, tags=["app:dev"], outputs=["type=oci,dest=app.tar"])

Each step lowers to exactly the vertex the Dockerfile frontend makes for the
same instruction, so a Python build and the equivalent Dockerfile build share
their cache records, step by step, and make the same image.
``definition(state, "pb" | "json")`` writes the graph for ``ociworker build
--frontend graph.v1``; ``merge`` and ``diff`` say what a Dockerfile cannot.
"""

from __future__ import annotations

from ociworker.graph.build import (
    ImageResolver,
    RegistryResolver,
    build,
    build_async,
    definition,
    definition_async,
    plan,
)
from ociworker.graph.lower import image_refs, lower
from ociworker.graph.state import (
    BindMount,
    CacheMount,
    Mount,
    SecretMount,
    SSHMount,
    State,
    TmpfsMount,
    bind,
    cache,
    diff,
    git,
    http,
    image,
    local,
    merge,
    scratch,
    secret,
    ssh,
    tmpfs,
)

__all__ = [
    "BindMount",
    "CacheMount",
    "ImageResolver",
    "Mount",
    "RegistryResolver",
    "SSHMount",
    "SecretMount",
    "State",
    "TmpfsMount",
    "bind",
    "build",
    "build_async",
    "cache",
    "definition",
    "definition_async",
    "diff",
    "git",
    "http",
    "image",
    "image_refs",
    "local",
    "lower",
    "merge",
    "plan",
    "scratch",
    "secret",
    "ssh",
    "tmpfs",
]
