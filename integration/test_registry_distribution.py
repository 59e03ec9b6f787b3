"""The registry client and image puller against Debian's real ``docker-registry``.

The registry is started on 127.0.0.1 with its storage in a tmp dir and seeded
with images this test builds and pushes with our own push methods, so pulling
them back proves both halves against a real implementation of the API.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import os
import shutil
import socket
import subprocess
import tarfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from ociworker.content.store import ContentStore
from ociworker.core.digest import Digest, sha256_bytes
from ociworker.core.oci import (
    OCI_CONFIG,
    OCI_INDEX,
    OCI_LAYER_GZIP,
    OCI_MANIFEST,
    Descriptor,
    Platform,
)
from ociworker.errors import DigestMismatchError, NotFoundError, RegistryError
from ociworker.registry.client import RegistryClient
from ociworker.sources.image import ImagePuller

pytestmark = [pytest.mark.integration]


@pytest.fixture(scope="module", autouse=True)
def _needs_docker_registry() -> None:
    # A missing prerequisite fails (README, "Tests"): a host without it must not pass
    # this file by running nothing.
    if shutil.which("docker-registry") is None:
        pytest.fail("Debian's docker-registry is not installed: run scripts/setup-host first")


AMD64 = Platform("linux", "amd64")
ARM64 = Platform("linux", "arm64", "v8")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class Registry:
    host: str  # 127.0.0.1:<port>
    root: Path  # storage root directory

    def blob_data_path(self, digest: str) -> Path:
        hexd = digest.split(":", 1)[1]
        return self.root / "docker/registry/v2/blobs/sha256" / hexd[:2] / hexd / "data"


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    base = tmp_path_factory.mktemp("registry")
    port = _free_port()
    config = base / "config.yml"
    config.write_text(
        "version: 0.1\n"
        "log:\n  level: error\n"
        f"storage:\n  filesystem:\n    rootdirectory: {base / 'data'}\n"
        f"http:\n  addr: 127.0.0.1:{port}\n"
    )
    log = open(base / "registry.log", "wb")  # noqa: SIM115 - closed below, after the process
    proc = subprocess.Popen(
        ["docker-registry", "serve", str(config)], stdout=log, stderr=subprocess.STDOUT
    )
    try:
        deadline = time.monotonic() + 15
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"docker-registry exited: {(base / 'registry.log').read_text()}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
                break
            if time.monotonic() > deadline:
                raise RuntimeError("docker-registry did not start listening")
            time.sleep(0.05)
        yield Registry(host=f"127.0.0.1:{port}", root=base / "data")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


class CountingTransport(httpx.AsyncHTTPTransport):
    """The real transport, remembering what it sent."""

    def __init__(self) -> None:
        super().__init__()
        self.sent: list[tuple[str, str]] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.sent.append((request.method, request.url.path))
        return await super().handle_async_request(request)

    def blob_gets(self) -> int:
        return sum(1 for m, p in self.sent if m == "GET" and "/blobs/sha256:" in p)


@pytest.fixture
async def client() -> AsyncIterator[RegistryClient]:
    async with RegistryClient() as c:
        yield c


@dataclass(frozen=True)
class BuiltImage:
    manifest: bytes
    config: bytes
    layers: tuple[bytes, ...]  # compressed
    diff_ids: tuple[Digest, ...]

    @property
    def manifest_digest(self) -> Digest:
        return sha256_bytes(self.manifest)


def _layer(files: dict[str, bytes]) -> tuple[bytes, Digest]:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 0
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
    tar_bytes = raw.getvalue()
    return gzip.compress(tar_bytes, mtime=0), sha256_bytes(tar_bytes)


def build_image(platform: Platform, layer_files: list[dict[str, bytes]]) -> BuiltImage:
    blobs, diff_ids = zip(*(_layer(f) for f in layer_files), strict=True)
    config = json.dumps(
        {
            **platform.to_json(),
            "config": {"Cmd": ["/bin/sh"], "Env": ["PATH=/bin"]},
            "rootfs": {"type": "layers", "diff_ids": list(diff_ids)},
        }
    ).encode()
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": Descriptor(OCI_CONFIG, sha256_bytes(config), len(config)).to_json(),
            "layers": [
                Descriptor(OCI_LAYER_GZIP, sha256_bytes(b), len(b)).to_json() for b in blobs
            ],
        }
    ).encode()
    return BuiltImage(manifest, config, tuple(blobs), tuple(diff_ids))


async def push_image(
    client: RegistryClient, src: ContentStore, repo: str, tag: str | None, img: BuiltImage
) -> Digest:
    for blob in (img.config, *img.layers):
        d = src.put(blob)
        await client.push_blob(repo, Descriptor("application/octet-stream", d, len(blob)), src)
    target = f"{repo}:{tag}" if tag else f"{repo}@{img.manifest_digest}"
    return await client.push_manifest(target, OCI_MANIFEST, img.manifest)


@pytest.fixture
def src(tmp_path: Path) -> ContentStore:
    return ContentStore(tmp_path / "src")


@pytest.fixture
def dst(tmp_path: Path) -> ContentStore:
    return ContentStore(tmp_path / "dst")


async def test_push_then_pull_by_tag_and_by_digest(
    registry: Registry, client: RegistryClient, src: ContentStore, dst: ContentStore
) -> None:
    img = build_image(AMD64, [{"etc/hello": b"hello\n"}, {"bin/tool": os.urandom(3000)}])
    repo = f"{registry.host}/it/simple"
    digest = await push_image(client, src, repo, "v1", img)
    assert digest == img.manifest_digest

    transport = CountingTransport()
    async with RegistryClient(transport=transport) as c:
        pulled = await ImagePuller(c, dst).pull(f"{repo}:v1", AMD64)
        assert pulled.reference == f"{repo}:v1"
        assert pulled.manifest.digest == digest
        assert pulled.manifest.platform == AMD64
        assert pulled.index_digest is None
        assert pulled.config["config"]["Cmd"] == ["/bin/sh"]
        assert tuple(la.diff_id for la in pulled.layers) == img.diff_ids
        for layer, blob in zip(pulled.layers, img.layers, strict=True):
            assert dst.read(layer.descriptor.digest) == blob
        assert dst.read(digest) == img.manifest
        assert transport.blob_gets() == 3  # config + 2 layers

        again = await ImagePuller(c, dst).pull(f"{repo}@{digest}", AMD64)
    assert again.layers == pulled.layers
    assert transport.blob_gets() == 3  # a second pull downloads no blob


async def test_index_with_two_platforms(
    registry: Registry, client: RegistryClient, src: ContentStore, dst: ContentStore
) -> None:
    repo = f"{registry.host}/it/multi"
    images = {p: build_image(p, [{"arch": str(p).encode()}]) for p in (AMD64, ARM64)}
    entries = []
    for p, img in images.items():
        await push_image(client, src, repo, None, img)
        entries.append(
            Descriptor(OCI_MANIFEST, img.manifest_digest, len(img.manifest), platform=p).to_json()
        )
    index = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries}).encode()
    index_digest = await client.push_manifest(f"{repo}:latest", OCI_INDEX, index)

    puller = ImagePuller(client, dst)
    for want in (AMD64, Platform("linux", "arm64"), ARM64):
        pulled = await puller.pull(repo, want)
        expected = images[AMD64 if want == AMD64 else ARM64]
        assert pulled.manifest.digest == expected.manifest_digest
        assert pulled.index_digest == index_digest
        assert pulled.layers[0].diff_id == expected.diff_ids[0]

    by_digest = await puller.pull(f"{repo}@{index_digest}", ARM64)
    assert by_digest.manifest.digest == images[ARM64].manifest_digest

    with pytest.raises(NotFoundError, match=r"linux/s390x.*available: linux/amd64, linux/arm64"):
        await puller.pull(repo, Platform("linux", "s390x"))


async def test_chunked_push_and_cross_repo_mount(
    registry: Registry, src: ContentStore, dst: ContentStore
) -> None:
    big = os.urandom(300_000)  # incompressible: 5 chunks of 64 KiB
    img = build_image(AMD64, [{"big": big}])
    transport = CountingTransport()
    async with RegistryClient(transport=transport, chunk_size=64 << 10) as c:
        repo = f"{registry.host}/it/chunked"
        await push_image(c, src, repo, "v1", img)
        assert sum(1 for m, _ in transport.sent if m == "PATCH") == 5

        layer = Descriptor(OCI_LAYER_GZIP, sha256_bytes(img.layers[0]), len(img.layers[0]))
        other = f"{registry.host}/it/mounted"
        before = len(transport.sent)
        await c.push_blob(other, layer, src, mount_from=repo)
        assert [m for m, _ in transport.sent[before:]] == ["HEAD", "POST"]
        assert await c.has_blob(other, layer.digest)

        await c.fetch_blob(other, layer, dst)
    assert dst.read(layer.digest) == img.layers[0]


async def test_missing_image_and_unreachable_registry(
    registry: Registry, client: RegistryClient, dst: ContentStore
) -> None:
    with pytest.raises(NotFoundError, match=rf"image {registry.host}/it/nothing:v9 not found"):
        await ImagePuller(client, dst).pull(f"{registry.host}/it/nothing:v9", AMD64)
    port = _free_port()
    with pytest.raises(RegistryError, match=rf"http://127.0.0.1:{port}/v2/x/manifests/latest"):
        await client.resolve(f"127.0.0.1:{port}/x", AMD64)


async def test_corrupt_blob_in_registry_storage_is_detected(
    registry: Registry, client: RegistryClient, src: ContentStore, dst: ContentStore
) -> None:
    img = build_image(AMD64, [{"file": b"precious data\n" * 100}])
    repo = f"{registry.host}/it/corrupt"
    await push_image(client, src, repo, "v1", img)
    layer_digest = sha256_bytes(img.layers[0])
    data_path = registry.blob_data_path(layer_digest)
    original = data_path.read_bytes()
    # Same length, one flipped bit: only a digest check can notice.
    data_path.write_bytes(original[:-5] + bytes([original[-5] ^ 1]) + original[-4:])
    try:
        with pytest.raises(DigestMismatchError, match=layer_digest):
            await ImagePuller(client, dst).pull(f"{repo}:v1", AMD64)
        assert not dst.has(layer_digest)
        assert list(dst.ingest_dir.iterdir()) == []
    finally:
        data_path.write_bytes(original)


async def test_skopeo_reads_what_we_pushed(
    registry: Registry, client: RegistryClient, src: ContentStore
) -> None:
    if shutil.which("skopeo") is None:
        pytest.fail("skopeo is not installed: run scripts/setup-host first")
    img = build_image(AMD64, [{"a": b"a"}, {"b": b"b"}])
    repo = f"{registry.host}/it/skopeo"
    digest = await push_image(client, src, repo, "v1", img)
    # skopeo as root records blobs in /var/lib/containers/cache; a tmpfs over
    # /var/lib in a private mount namespace keeps the host untouched.
    script = 'mount -t tmpfs tmpfs /var/lib && exec skopeo inspect --tls-verify=false "$1"'
    out = subprocess.run(
        [
            *("unshare", "--mount", "--propagation", "private", "--"),
            *("sh", "-c", script, "sh", f"docker://{repo}:v1"),
        ],
        capture_output=True,
        check=True,
        timeout=60,
    )
    info = json.loads(out.stdout)
    assert info["Digest"] == digest
    assert info["Layers"] == [sha256_bytes(b) for b in img.layers]
    assert info["Architecture"] == "amd64"
