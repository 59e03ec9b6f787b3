from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from ociworker.content.store import ContentStore
from ociworker.core.digest import Digest
from ociworker.core.oci import DOCKER_MANIFEST_LIST, OCI_INDEX, OCI_MANIFEST, Descriptor, Platform
from ociworker.core.reference import parse_reference
from ociworker.errors import DigestMismatchError, NotFoundError, RegistryError, UnsupportedError
from ociworker.registry.client import RegistryClient
from ociworker.session.credentials import StaticCredentials
from ociworker.testing.fake_registry import FakeRegistry, image, seed_image, sha

AMD64 = Platform("linux", "amd64")
REG = "reg.test"


@pytest.fixture
def store(tmp_path: Path) -> ContentStore:
    return ContentStore(tmp_path / "content")


@pytest.fixture
def reg() -> FakeRegistry:
    return FakeRegistry()


@pytest.fixture
async def client(reg: FakeRegistry) -> AsyncIterator[RegistryClient]:
    async with RegistryClient(transport=reg.transport()) as c:
        yield c


def _index(entries: list[tuple[str, bytes, Platform]], media_type: str = OCI_INDEX) -> bytes:
    return json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": media_type,
            "manifests": [
                {"mediaType": mt, "digest": sha(data), "size": len(data), "platform": p.to_json()}
                for mt, data, p in entries
            ],
        }
    ).encode()


def _seed_index(reg: FakeRegistry, repo: str, platforms: list[Platform]) -> str:
    entries = []
    for p in platforms:
        _, manifest, _ = seed_image(
            reg, repo, None, [f"layer {p}".encode()], arch=p.architecture, variant=p.variant
        )
        entries.append((OCI_MANIFEST, manifest, p))
    # An attestation entry, as buildx adds: never a candidate.
    att, _, _ = seed_image(reg, repo, None, [b"att"])
    att_data = reg.manifests[(repo, att)][1]
    entries.append((OCI_MANIFEST, att_data, Platform("unknown", "unknown")))
    return reg.put_manifest(repo, "multi", OCI_INDEX, _index(entries))


# --- URLs -------------------------------------------------------------------------


async def test_scheme_selection() -> None:
    async with RegistryClient(insecure=["my.reg:5000", "10.1.0.0/16", "plain.host"]) as c:
        _check_schemes(c)


def _check_schemes(c: RegistryClient) -> None:
    assert c.scheme_for("localhost:5000") == "http"
    assert c.scheme_for("127.0.0.2:5000") == "http"
    assert c.scheme_for("[::1]:5000") == "http"
    assert c.scheme_for("my.reg:5000") == "http"
    assert c.scheme_for("my.reg") == "https"
    assert c.scheme_for("10.1.2.3:443") == "http"
    assert c.scheme_for("10.2.0.1") == "https"
    assert c.scheme_for("plain.host:8080") == "http"
    assert c.scheme_for("docker.io") == "https"


async def test_docker_hub_uses_its_api_host(reg: FakeRegistry, client: RegistryClient) -> None:
    with pytest.raises(NotFoundError, match=r"image docker.io/library/busybox:latest not found"):
        await client.resolve("busybox", AMD64)
    assert reg.log[0][1] == "https://registry-1.docker.io/v2/library/busybox/manifests/latest"


# --- resolve ----------------------------------------------------------------------


@pytest.mark.parametrize("docker", [False, True])
async def test_resolve_single_manifest(
    reg: FakeRegistry, client: RegistryClient, docker: bool
) -> None:
    digest, manifest, config = seed_image(reg, "app", "v1", [b"a", b"b"], docker=docker)
    got = await client.resolve(f"{REG}/app:v1", AMD64)
    assert got.manifest.digest == digest
    assert got.manifest.size == len(manifest)
    assert got.manifest.platform == AMD64
    assert got.manifest_json == manifest
    assert got.config_json == config
    assert got.index_digest is None
    assert [d.digest for d in got.layer_descriptors] == [sha(b"a"), sha(b"b")]
    # By digest gives the same, and the request names the digest.
    again = await client.resolve(f"{REG}/app@{digest}", AMD64)
    assert again.manifest.digest == digest
    assert reg.requests("GET", f"/manifests/{digest}")


async def test_resolve_single_manifest_for_another_platform(
    reg: FakeRegistry, client: RegistryClient
) -> None:
    seed_image(reg, "app", "v1", [b"a"], arch="arm64")
    with pytest.raises(NotFoundError, match="is for platform linux/arm64, not linux/amd64"):
        await client.resolve(f"{REG}/app:v1", AMD64)


@pytest.mark.parametrize(
    ("want", "arch", "variant"),
    [
        (AMD64, "amd64", ""),
        (Platform("linux", "arm64"), "arm64", "v8"),
        (Platform("linux", "arm64", "v8"), "arm64", "v8"),
        (Platform("linux", "arm", "v7"), "arm", "v6"),  # v7 runs v6 when no v7 exists
        (Platform("linux", "arm"), "arm", "v6"),
    ],
)
async def test_resolve_index_selects_platform(
    reg: FakeRegistry, client: RegistryClient, want: Platform, arch: str, variant: str
) -> None:
    index_digest = _seed_index(
        reg,
        "multi",
        [AMD64, Platform("linux", "arm64", "v8"), Platform("linux", "arm", "v6")],
    )
    got = await client.resolve(f"{REG}/multi:multi", want)
    assert got.index_digest == index_digest
    assert got.manifest.platform == Platform("linux", arch, variant)
    config = json.loads(got.config_json)
    assert (config["architecture"], config.get("variant", "")) == (arch, variant)


async def test_resolve_docker_manifest_list(reg: FakeRegistry, client: RegistryClient) -> None:
    _, manifest, _ = seed_image(reg, "dl", None, [b"x"], docker=True)
    reg.put_manifest(
        "dl",
        "t",
        DOCKER_MANIFEST_LIST,
        _index([(json.loads(manifest)["mediaType"], manifest, AMD64)], DOCKER_MANIFEST_LIST),
    )
    got = await client.resolve(f"{REG}/dl:t", AMD64)
    assert got.manifest.digest == sha(manifest)


async def test_resolve_index_without_the_platform_lists_what_exists(
    reg: FakeRegistry, client: RegistryClient
) -> None:
    _seed_index(reg, "multi", [AMD64, Platform("linux", "arm64", "v8")])
    with pytest.raises(NotFoundError) as info:
        await client.resolve(f"{REG}/multi:multi", Platform("linux", "s390x"))
    msg = str(info.value)
    assert "linux/s390x" in msg
    assert "available: linux/amd64, linux/arm64" in msg
    assert "unknown" not in msg


async def test_manifest_digest_is_verified(reg: FakeRegistry, client: RegistryClient) -> None:
    digest, _, _ = seed_image(reg, "app", "v1", [b"a"])
    # The registry serves other bytes under the digest we ask for.
    reg.manifests[("app", digest)] = (OCI_MANIFEST, image([b"evil"])[0])
    with pytest.raises(DigestMismatchError, match=f"want digest {digest}"):
        await client.resolve(f"{REG}/app@{digest}", AMD64)


async def test_manifest_digest_header_is_verified(
    reg: FakeRegistry, client: RegistryClient
) -> None:
    seed_image(reg, "app", "v1", [b"a"])
    reg.lie_about_digest = True
    with pytest.raises(DigestMismatchError, match="registry says"):
        await client.resolve(f"{REG}/app:v1", AMD64)


async def test_child_manifest_is_verified_against_the_index(
    reg: FakeRegistry, client: RegistryClient
) -> None:
    _seed_index(reg, "multi", [AMD64])
    index = json.loads(reg.manifests[("multi", "multi")][1])
    child = index["manifests"][0]["digest"]
    reg.manifests[("multi", child)] = (OCI_MANIFEST, b'{"schemaVersion": 2}')
    with pytest.raises(DigestMismatchError):
        await client.resolve(f"{REG}/multi:multi", AMD64)


async def test_config_digest_is_verified(reg: FakeRegistry, client: RegistryClient) -> None:
    _, _, config = seed_image(reg, "app", "v1", [b"a"])
    reg.blobs[sha(config)] = config.replace(b"amd64", b"AMD64")
    with pytest.raises(DigestMismatchError, match=sha(config)):
        await client.resolve(f"{REG}/app:v1", AMD64)


async def test_schema1_is_unsupported(reg: FakeRegistry, client: RegistryClient) -> None:
    reg.put_manifest(
        "old",
        "v1",
        "application/vnd.docker.distribution.manifest.v1+prettyjws",
        b'{"schemaVersion": 1, "fsLayers": []}',
    )
    with pytest.raises(UnsupportedError, match="schema 1"):
        await client.resolve(f"{REG}/old:v1", AMD64)


# --- errors -------------------------------------------------------------------------


async def test_registry_errors_carry_url_and_message() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        body = {"errors": [{"code": "TOOMANYREQUESTS", "message": "slow down"}]}
        return httpx.Response(429, json=body)

    async with RegistryClient(transport=httpx.MockTransport(handler)) as c:
        with pytest.raises(RegistryError) as info:
            await c.resolve(f"{REG}/app:v1", AMD64)
    msg = str(info.value)
    assert f"https://{REG}/v2/app/manifests/v1" in msg
    assert "429" in msg
    assert "TOOMANYREQUESTS: slow down" in msg


async def test_connection_refused_is_a_registry_error() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    async with RegistryClient(transport=httpx.MockTransport(handler)) as c:
        with pytest.raises(RegistryError, match=r"http://127\.0\.0\.1:1/v2/x/manifests.*refused"):
            await c.resolve("127.0.0.1:1/x", AMD64)


# --- blobs ----------------------------------------------------------------------------


async def test_fetch_blob_into_store_and_skip_when_present(
    reg: FakeRegistry, client: RegistryClient, store: ContentStore
) -> None:
    data = b"layer data" * 1000
    digest = Digest(reg.put_blob("app", data))
    desc = Descriptor(OCI_MANIFEST, digest, len(data))
    await client.fetch_blob(f"{REG}/app", desc, store)
    assert store.read(digest) == data
    before = len(reg.log)
    await client.fetch_blob(f"{REG}/app", desc, store)
    assert len(reg.log) == before


@pytest.mark.parametrize("size_delta", [0, 1, -1])
async def test_fetch_blob_rejects_wrong_content(
    reg: FakeRegistry, client: RegistryClient, store: ContentStore, size_delta: int
) -> None:
    data = b"good bytes"
    digest = Digest(reg.put_blob("app", data))
    reg.blobs[digest] = b"evil bytes"
    with pytest.raises(DigestMismatchError, match=f"https://{REG}/v2/app/blobs/{digest}"):
        await client.fetch_blob(
            f"{REG}/app", Descriptor("x", digest, len(data) + size_delta), store
        )
    assert not store.has(digest)
    assert list(store.ingest_dir.iterdir()) == []


async def test_missing_blob_is_not_found(client: RegistryClient, store: ContentStore) -> None:
    digest = Digest(sha(b"nope"))
    with pytest.raises(NotFoundError, match=f"blob {digest} not found in {REG}/app"):
        await client.fetch_blob(f"{REG}/app", Descriptor("x", digest, 4), store)


async def test_redirected_blob_download_does_not_leak_credentials(
    store: ContentStore,
) -> None:
    data = b"on the cdn"
    seen: dict[str, str | None] = {}

    def handler(request: httpx.Request) -> httpx.Response:
        seen[request.url.host] = request.headers.get("authorization")
        if request.url.host == REG:
            if "authorization" not in request.headers:
                return httpx.Response(401, headers={"WWW-Authenticate": 'Basic realm="r"'})
            return httpx.Response(307, headers={"Location": "https://cdn.test/blob?sig=1"})
        return httpx.Response(200, content=data)

    async with RegistryClient(
        transport=httpx.MockTransport(handler), credentials=StaticCredentials({REG: ("u", "p")})
    ) as c:
        await c.fetch_blob(f"{REG}/app", Descriptor("x", Digest(sha(data)), len(data)), store)
    assert seen[REG] is not None
    assert seen["cdn.test"] is None
    assert store.read(sha(data)) == data


# --- push ------------------------------------------------------------------------------


async def test_push_then_pull_round_trip(
    reg: FakeRegistry, client: RegistryClient, store: ContentStore
) -> None:
    manifest, config, _ = image([b"one", b"two"])
    for blob in (config, b"one", b"two"):
        store.put(blob)
        await client.push_blob(
            f"{REG}/new/app", Descriptor("x", Digest(sha(blob)), len(blob)), store
        )
    digest = await client.push_manifest(f"{REG}/new/app:v1", OCI_MANIFEST, manifest)
    assert digest == sha(manifest)
    got = await client.resolve(f"{REG}/new/app:v1", AMD64)
    assert got.manifest_json == manifest
    assert got.config_json == config
    # Monolithic: one POST and one PUT per blob, nothing chunked.
    assert len(reg.requests("POST")) == 3
    assert reg.requests("PATCH") == []
    # Pushing again only asks.
    before = len(reg.log)
    await client.push_blob(f"{REG}/new/app", Descriptor("x", Digest(sha(b"one")), 3), store)
    assert [m for m, _ in reg.log[before:]] == ["HEAD"]


async def test_chunked_push(reg: FakeRegistry, store: ContentStore) -> None:
    data = bytes(range(256)) * 40  # 10240 bytes in 4 KiB chunks: 3 PATCHes
    digest = Digest(store.put(data))
    async with RegistryClient(transport=reg.transport(), chunk_size=4096) as c:
        await c.push_blob(f"{REG}/big", Descriptor("x", digest, len(data)), store)
    assert reg.blobs[digest] == data
    assert len(reg.requests("PATCH")) == 3
    # Each PATCH went to the Location the previous answer gave.
    assert "_state=s4096" in reg.requests("PATCH")[1]


async def test_cross_repo_mount(
    reg: FakeRegistry, client: RegistryClient, store: ContentStore
) -> None:
    data = b"shared layer"
    digest = Digest(reg.put_blob("base", data))
    store.put(data)
    desc = Descriptor("x", digest, len(data))
    await client.push_blob(f"{REG}/derived", desc, store, mount_from=f"{REG}/base")
    assert ("derived", digest) in reg.links
    assert reg.requests("PUT") == []
    assert f"mount={digest.replace(':', '%3A')}" in reg.requests("POST")[0]


async def test_push_manifest_by_digest_checks_it(client: RegistryClient) -> None:
    with pytest.raises(DigestMismatchError):
        await client.push_manifest(f"{REG}/a@{sha(b'other')}", OCI_MANIFEST, b"{}")


async def test_push_blob_checks_the_store(client: RegistryClient, store: ContentStore) -> None:
    with pytest.raises(NotFoundError):
        await client.push_blob(f"{REG}/a", Descriptor("x", Digest(sha(b"x")), 1), store)
    store.put(b"xy")
    with pytest.raises(DigestMismatchError, match="descriptor says 5"):
        await client.push_blob(f"{REG}/a", Descriptor("x", Digest(sha(b"xy")), 5), store)


# --- auth -------------------------------------------------------------------------------


async def test_anonymous_bearer_token_flow(store: ContentStore) -> None:
    reg = FakeRegistry(auth="bearer")
    seed_image(reg, "app", "v1", [b"a", b"b"])
    async with RegistryClient(transport=reg.transport()) as c:
        got = await c.resolve(f"{REG}/app:v1", AMD64)
        for d in got.layer_descriptors:
            await c.fetch_blob(f"{REG}/app", d, store)
    # One 401 and one token for the pull scope, reused for every later request.
    assert len(reg.token_requests) == 1
    assert reg.token_requests[0].url.params.get_list("scope") == ["repository:app:pull"]
    assert "authorization" not in reg.token_requests[0].headers
    # manifest (401), manifest, config, two layers
    assert sum(1 for _, u in reg.log if "auth.test" not in u) == 5


async def test_bearer_with_credentials_and_push_scope(store: ContentStore) -> None:
    reg = FakeRegistry(auth="bearer", users={"alice": "s3cret"})
    asked: list[str] = []

    class Creds:
        async def credentials(self, host: str) -> tuple[str, str]:
            asked.append(host)
            return ("alice", "s3cret")

    store.put(b"blob")
    async with RegistryClient(transport=reg.transport(), credentials=Creds()) as c:
        await c.push_blob(f"{REG}/app", Descriptor("x", Digest(sha(b"blob")), 4), store)
        await c.push_manifest(f"{REG}/app:v1", OCI_MANIFEST, b"{}")
    assert reg.blobs[sha(b"blob")] == b"blob"
    assert asked == [REG]  # the provider is asked once per host
    expected = "Basic " + base64.b64encode(b"alice:s3cret").decode()
    assert all(r.headers["authorization"] == expected for r in reg.token_requests)
    scopes = [r.url.params.get_list("scope") for r in reg.token_requests]
    assert scopes == [["repository:app:pull"], ["repository:app:pull,push"]]


async def test_bearer_with_wrong_credentials(store: ContentStore) -> None:
    reg = FakeRegistry(auth="bearer", users={"alice": "s3cret"})
    async with RegistryClient(
        transport=reg.transport(), credentials=StaticCredentials({REG: ("a", "b")})
    ) as c:
        with pytest.raises(RegistryError, match=r"authentication to reg.test failed.*401"):
            await c.resolve(f"{REG}/app:v1", AMD64)


async def test_basic_auth() -> None:
    reg = FakeRegistry(auth="basic", users={"bob": "pw"})
    seed_image(reg, "app", "v1", [b"a"])
    async with RegistryClient(
        transport=reg.transport(), credentials=StaticCredentials({REG: ("bob", "pw")})
    ) as c:
        got = await c.resolve(f"{REG}/app:v1", AMD64)
    assert got.manifest.platform == AMD64
    async with RegistryClient(transport=reg.transport()) as c:
        with pytest.raises(RegistryError, match="requires credentials; none configured"):
            await c.resolve(f"{REG}/app:v1", AMD64)
    async with RegistryClient(
        transport=reg.transport(), credentials=StaticCredentials({REG: ("bob", "no")})
    ) as c:
        with pytest.raises(RegistryError, match="401"):
            await c.resolve(f"{REG}/app:v1", AMD64)


async def test_reference_types_are_accepted(reg: FakeRegistry, client: RegistryClient) -> None:
    seed_image(reg, "app", "v1", [b"a"])
    a = await client.resolve(parse_reference(f"{REG}/app:v1"), AMD64)
    b = await client.resolve(f"{REG}/app:v1", AMD64)
    assert a == b
