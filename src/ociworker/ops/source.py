"""The handler of ``SourceOp``: ``docker-image://REF@DIGEST`` (from the content
store, else pulled) unpacked into snapshots, ``local://NAME`` contexts, and
``git://URL#REF`` repositories (``ops.gitsource``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ociworker.content.store import ContentStore
from ociworker.core.digest import check_digest
from ociworker.core.graph import SourceOp, Vertex
from ociworker.core.oci import Platform
from ociworker.diff.base import Applier
from ociworker.errors import UserError
from ociworker.exporter.layercache import SOURCE, LayerCache
from ociworker.ops.context import local_context
from ociworker.ops.gitsource import GitSources
from ociworker.ops.parts import HandlerBase
from ociworker.registry.client import RegistryClient
from ociworker.snapshot.base import Mounter, SnapshotCatalog, Snapshotter
from ociworker.solver.scheduler import SCRATCH, Job, Result, default_cache_key
from ociworker.sources.git import GitFetcher
from ociworker.sources.image import (
    ImagePuller,
    chain_ids,
    image_from_content,
    layer_snapshot_name,
    unpack,
)


@dataclass(frozen=True)
class SourceDeps:
    snapshots: Snapshotter
    catalog: SnapshotCatalog
    applier: Applier
    registry: RegistryClient
    puller: ImagePuller
    #: images whose blobs are all here are not pulled again
    content: ContentStore
    #: pulled layers are recorded as ``source``: exported as they came
    layers: LayerCache
    platform: Platform
    #: git sources: the fetcher, and what makes a snapshot of a checkout
    git: GitFetcher | None = None
    mounter: Mounter | None = None
    scratch: Path | None = None


class SourceHandler(HandlerBase[SourceDeps]):
    deps_type = SourceDeps

    _git: GitSources | None = None

    def _git_sources(self, op: SourceOp) -> GitSources:
        d = self.deps
        if self._git is None:
            if d.git is None or d.mounter is None or d.scratch is None:
                raise UserError(f"this worker has no git sources configured ({op.identifier})")
            self._git = GitSources(d.git, d.snapshots, d.mounter, d.scratch)
        return self._git

    async def cache_key(self, vertex: Vertex, input_keys: Sequence[str], job: Job) -> str:
        op = vertex.op
        if isinstance(op, SourceOp) and op.identifier.startswith("git://"):
            return await self._git_sources(op).cache_key(op, job)
        return default_cache_key(vertex, input_keys)

    async def run(self, vertex: Vertex, inputs: Sequence[Result], job: Job) -> Result:
        op = vertex.op
        assert isinstance(op, SourceOp)
        d = self.deps
        scheme, _, rest = op.identifier.partition("://")
        if scheme == "local":
            local_context(job, rest)
            return Result("dir", rest)
        if scheme == "git":
            return await self._git_sources(op).run(op, job)
        if scheme != "docker-image":
            raise UserError(f"unsupported source {op.identifier!r}")
        name, _, digest = rest.rpartition("@")
        image = image_from_content(d.content, name, check_digest(digest))
        if image is None:
            # The job's own credentials: under the daemon each client lends its own.
            registry = d.registry.with_credentials(job.credentials)
            image = await d.puller.pull(rest, d.platform, client=registry)
        top = await unpack(image, d.snapshots, d.applier, d.catalog)
        # pulled layers are exported as they came, never diffed again
        for layer, chain_id in zip(image.layers, chain_ids(image.diff_ids), strict=True):
            d.layers.put_layer(layer_snapshot_name(chain_id), SOURCE, layer)
            # where it came from: a push to that registry mounts it instead of uploading
            d.layers.put_source(layer.descriptor.digest, name)
        return Result("snapshot", top) if top else SCRATCH
