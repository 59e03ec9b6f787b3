"""Pushing an image to a registry (``type=registry``, ``type=image,push=true``,
``--push``), in the order a registry needs: every blob (layers, config), then the
manifest that names them.

Each blob is asked for first (HEAD): one the registry has is not sent again. A
blob known to be in another repository of the same registry (pulled from it, or
pushed to it before) is mounted from there
(``POST ...?mount=DIGEST&from=REPO``) instead of uploaded; a large one goes up in
chunks; an upload the network cut short is tried again (``RegistryClient``).
Progress is BuildKit's: a ``pushing layers`` step with one line per blob, then
``pushing manifest for NAME@DIGEST``. A push runs after the build's other
outputs are written, so a refused push leaves them (and the image store's
names) as they are.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Literal, Protocol

from ociworker.content.store import ContentStore
from ociworker.core.digest import Digest
from ociworker.core.oci import Descriptor
from ociworker.core.progress import EventSink, Info, ProgressStep, format_bytes
from ociworker.core.reference import Reference, parse_reference
from ociworker.errors import RegistryAuthError, RegistryError
from ociworker.exporter.image import ImageResult

#: what a blob's upload did (``RegistryClient.upload_blob``)
BlobPush = Literal["exists", "mounted", "uploaded"]

#: blobs uploaded at once (containerd's pusher default is 3; BuildKit's 4)
PUSH_CONCURRENCY = 4


class Pusher(Protocol):
    """The registry as a push sees it (``RegistryClient`` with the job's credentials)."""

    async def upload_blob(
        self,
        ref: Reference | str,
        desc: Descriptor,
        store: ContentStore,
        *,
        mount_from: Reference | str | None = None,
    ) -> BlobPush: ...

    async def mount_blob(
        self, ref: Reference | str, desc: Descriptor, mount_from: Reference | str | None
    ) -> BlobPush | None: ...

    async def push_manifest(self, ref: Reference | str, media_type: str, data: bytes) -> Digest: ...


#: copies a blob into the content store from where it is known to be
FetchBlob = Callable[[Descriptor], Awaitable[None]]


class BlobSources(Protocol):
    """Which repository of a registry holds a blob (``LayerCache``): pulled
    blobs are recorded by the source op, pushed ones here."""

    def source_of(self, digest: str, registry: str) -> str | None: ...

    def put_source(self, digest: str, repository: str) -> None: ...


async def push_image(
    registry: Pusher,
    content: ContentStore,
    sources: BlobSources | None,
    image: ImageResult,
    names: Sequence[str],
    events: EventSink,
    fetch: FetchBlob | None = None,
) -> None:
    """Push ``image`` under each of ``names``; RegistryError names the image.
    ``fetch`` brings a blob the content store lacks (a layer of an imported
    cache) when the registry can neither mount it nor has it already."""
    for name in names:
        ref = parse_reference(name)
        try:
            await _push_one(registry, content, sources, image, ref, events, fetch)
        except RegistryAuthError as exc:
            raise RegistryAuthError(
                f"failed to push {ref}: {exc} (check the credentials for {ref.domain}: "
                f"docker login {ref.domain})"
            ) from exc
        except RegistryError as exc:
            raise RegistryError(f"failed to push {ref}: {exc}") from exc


async def _push_one(
    registry: Pusher,
    content: ContentStore,
    sources: BlobSources | None,
    image: ImageResult,
    ref: Reference,
    events: EventSink,
    fetch: FetchBlob | None,
) -> None:
    blobs: dict[str, Descriptor] = {}
    for desc in (*(la.descriptor for la in image.layers), image.config):
        blobs.setdefault(desc.digest, desc)
    sem = asyncio.Semaphore(PUSH_CONCURRENCY)
    with ProgressStep(events, "pushing layers") as step:

        async def one(desc: Descriptor) -> None:
            src = sources.source_of(desc.digest, ref.domain) if sources is not None else None
            async with sem:
                how: BlobPush | None = None
                if fetch is not None and not content.has(desc.digest):
                    # registry to registry: mounted from the cache's repository
                    # when the registry allows, fetched here only when not
                    how = await registry.mount_blob(ref, desc, src)
                    if how is None:
                        await fetch(desc)
                if how is None:
                    how = await registry.upload_blob(ref, desc, content, mount_from=src)
            if sources is not None and how != "mounted":
                # the next push of this blob to another repository mounts it from here
                sources.put_source(desc.digest, f"{ref.domain}/{ref.path}")
            if how == "exists":
                line = f"{desc.digest}: already exists"
            elif how == "mounted":
                line = f"{desc.digest}: mounted from {src}"
            else:
                line = f"{desc.digest}: pushed {format_bytes(desc.size)}"
            events(Info(line, step.digest))

        try:
            # one failure stops the other uploads
            async with asyncio.TaskGroup() as tg:
                for desc in blobs.values():
                    tg.create_task(one(desc))
        except ExceptionGroup as group:
            raise group.exceptions[0] from None
    manifest = image.manifest
    data = await asyncio.to_thread(content.read, manifest.digest)
    with ProgressStep(events, f"pushing manifest for {ref}@{manifest.digest}"):
        await registry.push_manifest(ref, manifest.media_type, data)
