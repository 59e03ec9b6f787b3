from __future__ import annotations

import asyncio
import hashlib
import json
from pathlib import Path

import httpx
import pytest

from ociworker.content.store import ContentStore
from ociworker.core.digest import Digest
from ociworker.core.oci import DOCKER_FOREIGN_LAYER, OCI_MANIFEST, Layer, Platform
from ociworker.errors import DigestMismatchError, NotFoundError, RegistryError, UnsupportedError
from ociworker.registry.client import RegistryClient
from ociworker.snapshot.base import SnapshotInfo
from ociworker.sources.image import ImagePuller, PulledImage, chain_ids, unpack
from ociworker.testing.fake_registry import FakeRegistry, image, seed_image, sha
from ociworker.testing.fakes import MemoryApplier, MemorySnapshotter

AMD64 = Platform("linux", "amd64")
REG = "reg.test"


def test_chain_ids_follow_the_oci_definition() -> None:
    a, b, c = (Digest(sha(x)) for x in (b"a", b"b", b"c"))
    ab = "sha256:" + hashlib.sha256(f"{a} {b}".encode()).hexdigest()
    abc = "sha256:" + hashlib.sha256(f"{ab} {c}".encode()).hexdigest()
    assert chain_ids([a, b, c]) == [a, ab, abc]
    assert chain_ids([]) == []
    assert chain_ids([b, a])[1] != ab  # order matters


# --- pull ----------------------------------------------------------------------------


@pytest.fixture
def store(tmp_path: Path) -> ContentStore:
    return ContentStore(tmp_path / "content")


async def test_pull_fetches_everything_once(store: ContentStore) -> None:
    reg = FakeRegistry()
    layers = [b"one", b"two", b"three"]
    digest, manifest, config = seed_image(reg, "app", "v1", layers)
    async with RegistryClient(transport=reg.transport()) as c:
        img = await ImagePuller(c, store).pull(f"{REG}/app:v1", AMD64)
        assert img.reference == f"{REG}/app:v1"
        assert img.manifest.digest == digest
        assert img.config == json.loads(config)
        assert img.config_digest == sha(config)
        assert [la.diff_id for la in img.layers] == [sha(x) for x in layers]
        assert [la.descriptor.digest for la in img.layers] == [sha(x) for x in layers]
        for blob in (manifest, config, *layers):
            assert store.read(sha(blob)) == blob
        blob_gets = len(reg.requests("GET", "/blobs/"))
        assert blob_gets == 4

        again = await ImagePuller(c, store).pull(f"{REG}/app:v1", AMD64)
    assert again == img
    assert len(reg.requests("GET", "/blobs/")) == blob_gets  # cached by digest


async def test_pull_downloads_layers_concurrently_within_limit(store: ContentStore) -> None:
    reg = FakeRegistry()
    seed_image(reg, "app", "v1", [f"layer {i}".encode() for i in range(6)])
    in_flight = 0
    peak = 0

    async def handler(request: httpx.Request) -> httpx.Response:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        try:
            await asyncio.sleep(0.01)
            return reg.handle(request)
        finally:
            in_flight -= 1

    async with RegistryClient(transport=httpx.MockTransport(handler)) as c:
        img = await ImagePuller(c, store, concurrency=2).pull(f"{REG}/app:v1", AMD64)
    assert len(img.layers) == 6
    assert peak == 2


async def test_pull_failure_is_the_first_error_not_a_group(store: ContentStore) -> None:
    reg = FakeRegistry()
    seed_image(reg, "app", "v1", [b"one", b"two"])
    reg.links.discard(("app", sha(b"two")))
    async with RegistryClient(transport=reg.transport()) as c:
        with pytest.raises(NotFoundError, match=f"blob {sha(b'two')} not found"):
            await ImagePuller(c, store).pull(f"{REG}/app:v1", AMD64)


async def test_pull_rejects_config_layer_count_mismatch(store: ContentStore) -> None:
    reg = FakeRegistry()
    manifest, _, _ = image([b"one", b"two"])
    _, config, _ = image([b"one"])
    reg.put_blob("app", config)
    for x in (b"one", b"two"):
        reg.put_blob("app", x)
    m = json.loads(manifest)
    m["config"] = {"mediaType": "c", "digest": sha(config), "size": len(config)}
    reg.put_manifest("app", "v1", OCI_MANIFEST, json.dumps(m).encode())
    async with RegistryClient(transport=reg.transport()) as c:
        with pytest.raises(RegistryError, match="2 layers, config has 1 diff_ids"):
            await ImagePuller(c, store).pull(f"{REG}/app:v1", AMD64)


async def test_pull_rejects_foreign_layers(store: ContentStore) -> None:
    reg = FakeRegistry()
    manifest, config, _ = image([b"one"])
    m = json.loads(manifest)
    m["layers"][0]["mediaType"] = DOCKER_FOREIGN_LAYER
    reg.put_blob("app", config)
    reg.put_manifest("app", "v1", OCI_MANIFEST, json.dumps(m).encode())
    async with RegistryClient(transport=reg.transport()) as c:
        with pytest.raises(UnsupportedError, match="foreign"):
            await ImagePuller(c, store).pull(f"{REG}/app:v1", AMD64)


# --- unpack with in-memory fakes -------------------------------------------------------


async def _pulled(store: ContentStore, layers: list[bytes], repo: str = "app") -> PulledImage:
    reg = FakeRegistry()
    seed_image(reg, repo, "v1", layers)
    async with RegistryClient(transport=reg.transport()) as c:
        return await ImagePuller(c, store).pull(f"{REG}/{repo}:v1", AMD64)


async def _snapshots(snaps: MemorySnapshotter) -> dict[str, SnapshotInfo]:
    return {info.key: info for info in await snaps.walk()}


async def test_unpack_commits_a_chain_named_by_chain_id(store: ContentStore) -> None:
    img = await _pulled(store, [b"base", b"mid", b"top"])
    snaps, applier = MemorySnapshotter(), MemoryApplier(store)
    top = await unpack(img, snaps, applier, snaps)
    names = ["layer-" + c.split(":", 1)[1] for c in chain_ids(img.diff_ids)]
    assert top == names[-1]
    assert await _snapshots(snaps) == {
        names[0]: SnapshotInfo(names[0], "committed", None),
        names[1]: SnapshotInfo(names[1], "committed", names[0]),
        names[2]: SnapshotInfo(names[2], "committed", names[1]),
    }
    assert [d for d, _ in applier.applied] == [la.descriptor.digest for la in img.layers]

    # A second image sharing the two lower layers applies only its own top.
    other = await _pulled(store, [b"base", b"mid", b"other"], repo="other")
    applier2 = MemoryApplier(store)
    top2 = await unpack(other, snaps, applier2, snaps)
    assert [d for d, _ in applier2.applied] == [sha(b"other")]
    assert (await _snapshots(snaps))[str(top2)].parent == names[1]


async def test_unpack_image_without_layers(store: ContentStore) -> None:
    img = await _pulled(store, [])
    snaps = MemorySnapshotter()
    assert await unpack(img, snaps, MemoryApplier(store), snaps) is None
    assert await _snapshots(snaps) == {}


async def test_unpack_checks_diff_ids_and_cleans_up(store: ContentStore) -> None:
    img = await _pulled(store, [b"base", b"top"])
    bad = Layer(img.layers[1].descriptor, Digest(sha(b"lie")))
    img = PulledImage(
        img.reference, img.manifest, img.config, img.config_digest, (img.layers[0], bad)
    )
    snaps = MemorySnapshotter()
    with pytest.raises(DigestMismatchError, match="image config says"):
        await unpack(img, snaps, MemoryApplier(store), snaps)
    # The good base layer stays committed; the failed key is gone.
    assert [s.kind for s in await snaps.walk()] == ["committed"]


async def test_unpack_removes_the_key_when_apply_fails(store: ContentStore) -> None:
    img = await _pulled(store, [b"base", b"top"])
    snaps = MemorySnapshotter()
    with pytest.raises(OSError, match="disk full"):
        await unpack(img, snaps, MemoryApplier(store, fail_on=Digest(sha(b"top"))), snaps)
    assert [s.kind for s in await snaps.walk()] == ["committed"]


async def test_concurrent_unpacks_of_one_chain_both_succeed(store: ContentStore) -> None:
    img = await _pulled(store, [b"base", b"mid", b"top"])
    snaps = MemorySnapshotter()
    applier = MemoryApplier(store)
    tops = await asyncio.gather(*(unpack(img, snaps, applier, snaps) for _ in range(3)))
    assert len(set(tops)) == 1
    # They really raced (each applied the base), and no active key was left behind.
    assert [str(d) for d, _ in applier.applied].count(sha(b"base")) > 1
    assert {s.kind for s in await snaps.walk()} == {"committed"}
    assert len(await snaps.walk()) == 3
