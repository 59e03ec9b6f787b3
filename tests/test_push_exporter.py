"""The push path against the in-memory registry: what a network cut short, a
registry refusing a manifest and an unknown CA look like to the user, the
progress a push reports, and force-compression's re-compressed base layers."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
import zstandard

from ociworker.content.store import ContentStore
from ociworker.core.digest import Digest
from ociworker.core.oci import OCI_LAYER_GZIP, OCI_LAYER_ZSTD, Descriptor, Layer
from ociworker.core.progress import Event, Info, VertexStatus
from ociworker.diff.base import CompressionOpts
from ociworker.errors import ConfigError, DigestMismatchError, RegistryAuthError, RegistryError
from ociworker.exporter.image import ImageResult, write_image
from ociworker.exporter.push import push_image
from ociworker.exporter.recompress import recompress
from ociworker.registry.client import RegistryClient
from ociworker.session.credentials import StaticCredentials
from ociworker.testing.fake_registry import FakeRegistry

REG = "reg.test"


@pytest.fixture
def store(tmp_path: Path) -> ContentStore:
    return ContentStore(tmp_path / "content")


def _tar(files: dict[str, bytes]) -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return raw.getvalue()


def _gzip_layer(store: ContentStore, files: dict[str, bytes]) -> Layer:
    tar = _tar(files)
    blob = gzip.compress(tar, mtime=0)
    return Layer(
        Descriptor(OCI_LAYER_GZIP, store.put(blob), len(blob)),
        Digest("sha256:" + hashlib.sha256(tar).hexdigest()),
    )


def _image(store: ContentStore, n: int = 2) -> ImageResult:
    layers = [_gzip_layer(store, {f"f{i}": f"layer {i}\n".encode() * 50}) for i in range(n)]
    config = {"architecture": "amd64", "os": "linux", "config": {}}
    return write_image(store, config, layers)


class _Flaky(httpx.AsyncBaseTransport):
    """The fake registry behind a network that drops the first ``fails``
    requests that carry a blob's bytes (as a connection reset mid-upload)."""

    def __init__(self, reg: FakeRegistry, fails: int, when: Callable[[httpx.Request], bool]):
        self._inner = reg.transport()
        self.fails = fails
        self._when = when

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self.fails and self._when(request):
            self.fails -= 1
            raise httpx.WriteError("connection reset by peer", request=request)
        return await self._inner.handle_async_request(request)


def _blob_put(request: httpx.Request) -> bool:
    return request.method in ("PUT", "PATCH") and "/blobs/uploads/" in request.url.path


def _events() -> tuple[list[Event], Callable[[Event], None]]:
    got: list[Event] = []
    return got, got.append


async def test_push_reports_each_blob_then_the_manifest(store: ContentStore) -> None:
    reg = FakeRegistry()
    image = _image(store)
    got, sink = _events()
    async with RegistryClient(transport=reg.transport()) as c:
        await push_image(c, store, None, image, [f"{REG}/app:1"], sink)
    manifest = store.read(image.manifest.digest)
    assert reg.manifests[("app", "1")] == (image.manifest.media_type, manifest)
    names = [e.name for e in got if isinstance(e, VertexStatus) and e.completed]
    assert names == ["pushing layers", f"pushing manifest for {REG}/app:1@{image.manifest.digest}"]
    lines = sorted(e.message for e in got if isinstance(e, Info))
    blobs = [image.config, *(la.descriptor for la in image.layers)]
    assert [ln.split(":", 2)[:2] for ln in lines] == sorted(d.digest.split(":") for d in blobs)
    assert all(" pushed " in ln for ln in lines)
    # again: the registry has every blob, so nothing is sent
    got2, sink2 = _events()
    before = len(reg.log)
    async with RegistryClient(transport=reg.transport()) as c:
        await push_image(c, store, None, image, [f"{REG}/app:2"], sink2)
    assert {m for m, _ in reg.log[before:]} == {"HEAD", "PUT"}
    assert len(reg.requests("PUT")[-1:]) == 1 and "/manifests/2" in reg.requests("PUT")[-1]
    assert all(e.message.endswith(": already exists") for e in got2 if isinstance(e, Info))


class _Sources:
    def __init__(self, table: dict[str, str]) -> None:
        self.table = table

    def source_of(self, digest: str, registry: str) -> str | None:
        repo = self.table.get(digest)
        return repo if repo is not None and repo.startswith(registry + "/") else None

    def put_source(self, digest: str, repository: str) -> None:
        self.table[digest] = repository


async def test_a_pulled_base_layer_is_mounted_not_uploaded(store: ContentStore) -> None:
    reg = FakeRegistry()
    image = _image(store)
    base = image.layers[0].descriptor
    reg.put_blob("library/base", store.read(base.digest))
    got, sink = _events()
    async with RegistryClient(transport=reg.transport()) as c:
        sources = _Sources({base.digest: f"{REG}/library/base"})
        await push_image(c, store, sources, image, [f"{REG}/app:1"], sink)
    assert ("app", base.digest) in reg.links
    assert not any(base.digest.replace(":", "%3A") in u for u in reg.requests("PUT"))
    assert f"{base.digest}: mounted from {REG}/library/base" in [
        e.message for e in got if isinstance(e, Info)
    ]
    # what this push uploaded is mounted by the next push to another repository
    before = len(reg.log)
    got, sink = _events()
    async with RegistryClient(transport=reg.transport()) as c:
        await push_image(c, store, sources, image, [f"{REG}/other:1"], sink)
    assert not any("/blobs/uploads/" in u for m, u in reg.log[before:] if m in ("PUT", "PATCH"))
    assert all(" mounted from " in e.message for e in got if isinstance(e, Info))


@pytest.mark.parametrize("chunked", [False, True])
async def test_a_cut_upload_is_tried_again(store: ContentStore, chunked: bool) -> None:
    reg = FakeRegistry()
    image = _image(store, 1)
    flaky = _Flaky(reg, fails=2, when=_blob_put)
    chunk = 64 if chunked else 16 << 20
    async with RegistryClient(transport=flaky, retry_delays=(0, 0), chunk_size=chunk) as c:
        await push_image(c, store, None, image, [f"{REG}/app:1"], lambda e: None)
    assert flaky.fails == 0
    for la in image.layers:
        assert reg.blobs[la.descriptor.digest] == store.read(la.descriptor.digest)


async def test_an_upload_cut_three_times_fails_naming_the_blob(store: ContentStore) -> None:
    reg = FakeRegistry()
    image = _image(store, 1)
    layer = image.layers[0].descriptor
    flaky = _Flaky(
        reg, fails=99, when=lambda r: _blob_put(r) and r.url.params.get("digest") == layer.digest
    )
    got, sink = _events()
    async with RegistryClient(transport=flaky, retry_delays=(0, 0)) as c:
        with pytest.raises(RegistryError) as exc:
            await push_image(c, store, None, image, [f"{REG}/app:1"], sink)
    msg = str(exc.value)
    assert msg.startswith(f"failed to push {REG}/app:1: failed to push blob {layer.digest}")
    assert "after 3 tries" in msg and "\n" not in msg
    assert flaky.fails == 99 - 3
    assert ("app", "1") not in reg.manifests  # no manifest naming a missing blob
    failed = [e for e in got if isinstance(e, VertexStatus) and e.error]
    assert [e.name for e in failed] == ["pushing layers"]


class _RefuseManifests(httpx.AsyncBaseTransport):
    def __init__(self, reg: FakeRegistry) -> None:
        self._inner = reg.transport()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.method == "PUT" and "/manifests/" in request.url.path:
            body = {
                "errors": [
                    {
                        "code": "MANIFEST_INVALID",
                        "message": "manifest invalid",
                        "detail": "unsupported media type",
                    }
                ]
            }
            return httpx.Response(400, json=body, request=request)
        return await self._inner.handle_async_request(request)


async def test_a_refused_manifest_shows_the_registrys_message(store: ContentStore) -> None:
    image = _image(store, 1)
    async with RegistryClient(transport=_RefuseManifests(FakeRegistry())) as c:
        with pytest.raises(RegistryError) as exc:
            await push_image(c, store, None, image, [f"{REG}/app:1"], lambda e: None)
    msg = str(exc.value)
    assert msg.startswith(f"failed to push {REG}/app:1: push of manifest to {REG}/app:1 failed")
    assert "400 Bad Request: MANIFEST_INVALID: manifest invalid" in msg


async def test_wrong_credentials_say_so(store: ContentStore) -> None:
    reg = FakeRegistry(auth="basic", users={"me": "right"})
    image = _image(store, 1)
    creds = StaticCredentials({REG: ("me", "wrong")})
    async with RegistryClient(transport=reg.transport(), credentials=creds) as c:
        with pytest.raises(RegistryAuthError) as exc:
            await push_image(c, store, None, image, [f"{REG}/app:1"], lambda e: None)
    msg = str(exc.value)
    assert msg.startswith(f"failed to push {REG}/app:1: ")
    assert "401 Unauthorized" in msg and f"docker login {REG}" in msg


async def test_a_missing_ca_file_is_a_config_error(tmp_path: Path, store: ContentStore) -> None:
    image = _image(store, 1)
    ca = {REG: (str(tmp_path / "nope.pem"),)}
    async with RegistryClient(ca=ca) as c:
        with pytest.raises(ConfigError, match=r"cannot load CA certificate .*nope.pem"):
            await push_image(c, store, None, image, [f"{REG}/app:1"], lambda e: None)


def test_a_ca_makes_a_loopback_registry_https() -> None:
    plain = RegistryClient()
    assert plain.scheme_for("127.0.0.1:5000") == "http"
    with_ca = RegistryClient(ca={"127.0.0.1:5000": ("/x.pem",)})
    assert with_ca.scheme_for("127.0.0.1:5000") == "https"
    assert with_ca.scheme_for("127.0.0.1:5001") == "http"  # another registry
    by_host = RegistryClient(ca={"localhost": ("/x.pem",)})
    assert by_host.scheme_for("localhost:5000") == "https"  # buildkitd: a bare host matches


# --- force-compression ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("codec", "media_type"), [("zstd", OCI_LAYER_ZSTD), ("uncompressed", "tar")]
)
async def test_recompress_keeps_the_tar(store: ContentStore, codec: str, media_type: str) -> None:
    files = {"etc/hello": b"hello\n" * 1000}
    layer = _gzip_layer(store, files)
    got = await recompress(store, layer, CompressionOpts(codec))  # type: ignore[arg-type]
    assert got.diff_id == layer.diff_id  # the config's rootfs stays true
    assert got.descriptor.media_type.endswith(media_type)
    blob = store.read(got.descriptor.digest)
    tar = zstandard.ZstdDecompressor().decompressobj().decompress(blob) if codec == "zstd" else blob
    assert tar == _tar(files)
    assert got.descriptor.size == len(blob)
    # already in the codec asked for: kept as it is
    assert await recompress(store, layer, CompressionOpts("gzip")) == layer


async def test_recompress_refuses_a_blob_that_is_not_its_diffid(store: ContentStore) -> None:
    layer = _gzip_layer(store, {"a": b"1"})
    liar = Layer(layer.descriptor, Digest("sha256:" + "0" * 64))
    with pytest.raises(DigestMismatchError, match="the image config says"):
        await recompress(store, liar, CompressionOpts("zstd"))


def test_daemon_config_reads_buildkitd_registry_tables(tmp_path: Path) -> None:
    from ociworker.api.daemon import load_config

    ca = tmp_path / "ca.pem"
    ca.write_text("not parsed here")
    cfg_file = tmp_path / "d.toml"
    cfg_file.write_text(
        f'[registry."reg.example:5000"]\nca = ["{ca}"]\n[registry."plain.example"]\nhttp = true\n'
    )
    cfg = load_config(cfg_file, {})
    assert cfg.registry_ca == (("reg.example:5000", (str(ca),)),)
    assert cfg.insecure_registries == ("plain.example",)
    cfg_file.write_text('[registry."r"]\nmirrors = ["m"]\n')
    with pytest.raises(ConfigError, match=r"unsupported key.*mirrors"):
        load_config(cfg_file, {})
    cfg_file.write_text(f'[registry."r"]\nca = ["{tmp_path / "missing.pem"}"]\n')
    with pytest.raises(ConfigError, match=r"missing\.pem is not a file"):
        load_config(cfg_file, {})
    assert json.dumps(cfg.registry_ca)  # plain values: the config is printable


@pytest.mark.parametrize("password", ["right", "wrong"])
async def test_push_with_a_bearer_token(store: ContentStore, password: str) -> None:
    reg = FakeRegistry(auth="bearer", users={"me": "right"})
    base = _image(store, 1)
    reg.put_blob("library/base", store.read(base.layers[0].descriptor.digest))
    creds = StaticCredentials({REG: ("me", password)})
    sources = _Sources({base.layers[0].descriptor.digest: f"{REG}/library/base"})
    async with RegistryClient(transport=reg.transport(), credentials=creds) as c:
        if password == "wrong":
            with pytest.raises(RegistryAuthError) as exc:
                await push_image(c, store, sources, base, [f"{REG}/app:1"], lambda e: None)
            # the token server's refusal, in its words
            assert "authentication to reg.test failed" in str(exc.value)
            assert "401 Unauthorized: DENIED: bad credentials" in str(exc.value)
            return
        await push_image(c, store, sources, base, [f"{REG}/app:1"], lambda e: None)
    assert reg.manifests[("app", "1")][1] == store.read(base.manifest.digest)
    # one token for the push, covering the mount's source repository too
    scopes = {s for r in reg.token_requests for s in r.url.params.get_list("scope")}
    assert {"repository:app:pull,push", "repository:library/base:pull"} <= scopes
    assert ("app", base.layers[0].descriptor.digest) in reg.links
