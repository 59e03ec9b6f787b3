"""Per-job registry credentials: one RegistryClient, many jobs, no borrowed access."""

from __future__ import annotations

import urllib.parse
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from ociworker.controller import resolve_image
from ociworker.core.graph import SourceOp, Vertex
from ociworker.core.oci import Platform
from ociworker.errors import RegistryError
from ociworker.registry.client import RegistryClient
from ociworker.session.credentials import StaticCredentials
from ociworker.solver.scheduler import SCRATCH, Job
from ociworker.testing.fake_registry import FakeRegistry, seed_image
from ociworker.worker import Worker, WorkerConfig, open_worker

AMD64 = Platform("linux", "amd64")
REG = "reg.test"
ALICE = StaticCredentials({REG: ("alice", "a-pw")})
BOB = StaticCredentials({REG: ("bob", "b-pw")})


def _registry(**kw: object) -> FakeRegistry:
    reg = FakeRegistry(
        auth="bearer",
        users={"alice": "a-pw", "bob": "b-pw"},
        acl={"alice": {"private", "public"}, "bob": {"public"}, "": {"public"}},
        **kw,  # type: ignore[arg-type]
    )
    seed_image(reg, "private", "v1", [b"secret layer"])
    seed_image(reg, "public", "v1", [b"public layer"])
    return reg


@pytest.fixture
def reg() -> FakeRegistry:
    return _registry()


@pytest.fixture
async def client(reg: FakeRegistry) -> AsyncIterator[RegistryClient]:
    async with RegistryClient(transport=reg.transport()) as c:
        yield c


def _token_users(reg: FakeRegistry) -> list[str]:
    return [r.headers.get("authorization", "") for r in reg.token_requests]


async def test_a_token_earned_by_one_job_is_not_used_by_another(
    reg: FakeRegistry, client: RegistryClient
) -> None:
    alice, anonymous, bob = (
        client.with_credentials(ALICE),
        client.with_credentials(None),
        client.with_credentials(BOB),
    )
    got = await alice.resolve(f"{REG}/private:v1", AMD64)
    assert got.manifest.digest
    # Same registry, same repository, same scope: the others must still be refused.
    with pytest.raises(RegistryError, match=r"manifests/v1: 401"):
        await anonymous.resolve(f"{REG}/private:v1", AMD64)
    with pytest.raises(RegistryError, match=r"manifests/v1: 401"):
        await bob.resolve(f"{REG}/private:v1", AMD64)
    # ... and alice keeps her access after their failures.
    await alice.resolve(f"{REG}/private:v1", AMD64)
    await bob.resolve(f"{REG}/public:v1", AMD64)
    users = _token_users(reg)
    assert sum(1 for u in users if u == "") >= 1  # the anonymous view asked for itself
    assert len({u for u in users if u}) == 2  # alice's and bob's basic auth, each their own


async def test_views_with_the_same_credentials_share_tokens(
    reg: FakeRegistry, client: RegistryClient
) -> None:
    one, two = client.with_credentials(ALICE), client.with_credentials(ALICE)
    await one.resolve(f"{REG}/private:v1", AMD64)
    before = len(reg.token_requests)
    await two.resolve(f"{REG}/private:v1", AMD64)
    assert len(reg.token_requests) == before  # one token per (host, scope, identity)


async def test_a_view_does_not_close_the_shared_connections(
    reg: FakeRegistry, client: RegistryClient
) -> None:
    async with client.with_credentials(ALICE) as view:
        await view.resolve(f"{REG}/public:v1", AMD64)
    await client.resolve(f"{REG}/public:v1", AMD64)  # still open


async def test_basic_auth_is_per_view() -> None:
    reg = FakeRegistry(auth="basic", users={"alice": "a-pw"})
    seed_image(reg, "app", "v1", [b"a"])
    async with RegistryClient(transport=reg.transport()) as client:
        await client.with_credentials(ALICE).resolve(f"{REG}/app:v1", AMD64)
        with pytest.raises(RegistryError, match="requires credentials; none configured"):
            await client.with_credentials(None).resolve(f"{REG}/app:v1", AMD64)


async def test_identity_token_is_exchanged_as_a_refresh_token() -> None:
    reg = _registry(refresh_tokens={"idtok-alice": "alice"})
    async with RegistryClient(transport=reg.transport()) as client:
        view = client.with_credentials(StaticCredentials({REG: ("", "idtok-alice")}))
        await view.resolve(f"{REG}/private:v1", AMD64)
        bad = client.with_credentials(StaticCredentials({REG: ("", "stolen")}))
        with pytest.raises(RegistryError, match=r"authentication to reg\.test failed"):
            await bad.resolve(f"{REG}/private:v1", AMD64)
    post = reg.token_requests[0]
    assert post.method == "POST"
    form = dict(urllib.parse.parse_qsl(post.content.decode()))
    assert form["grant_type"] == "refresh_token"
    assert form["refresh_token"] == "idtok-alice"
    assert form["scope"] == "repository:private:pull"
    assert "idtok" not in str(post.url)  # the token travels in the body only


async def test_controller_and_solver_use_the_jobs_credentials(tmp_path: Path) -> None:
    reg = FakeRegistry(
        auth="bearer", users={"alice": "a-pw"}, acl={"alice": {"private"}, "": set()}
    )
    digest, _, _ = seed_image(reg, "private", "v1", [])  # no layers: nothing to unpack
    worker = open_worker(
        WorkerConfig(root=tmp_path / "state", snapshotter="native", platform=AMD64),
        registry=RegistryClient(transport=reg.transport()),
    )
    try:
        await _use_the_jobs_credentials(worker, digest)
    finally:
        await worker.aclose()


async def _use_the_jobs_credentials(worker: Worker, digest: str) -> None:
    # plan time: FROM is pinned with the job's credentials
    with pytest.raises(RegistryError, match="401"):
        await resolve_image(worker, f"{REG}/private:v1")
    info = await resolve_image(worker, f"{REG}/private:v1", ALICE)
    assert info.ref == f"{REG}/private@{digest}"

    # solve time: the pull runs with the credentials of the job that runs it
    pull = Vertex(SourceOp(f"docker-image://{REG}/private:v1@{digest}"), name="FROM private")
    with pytest.raises(RegistryError, match="401"):
        await worker.solver.solve(pull, Job(id="anonymous"))
    assert await worker.solver.solve(pull, Job(id="alice", credentials=ALICE)) == SCRATCH


class _Refusing:
    """Credentials that must not be asked for (a broken config, a missing helper)."""

    async def credentials(self, host: str) -> tuple[str, str] | None:
        raise AssertionError(f"credentials asked for {host}")


async def test_an_open_registry_never_asks_for_credentials() -> None:
    reg = FakeRegistry()
    seed_image(reg, "app", "v1", [b"a"])
    async with RegistryClient(transport=reg.transport()) as client:
        await client.with_credentials(_Refusing()).resolve(f"{REG}/app:v1", AMD64)
