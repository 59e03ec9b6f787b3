"""The op handlers on fakes: no root, no runtime, no mount(2).

``MemorySnapshotter`` + ``MemoryMounter`` stand in for a snapshotter and the
host's mounts, ``FakeExecutor`` for runc/crun, ``FakeRegistry`` + ``MemoryApplier``
for a registry and the layer applier (each held to its shared suite in
``test_fakes_suites.py``). Expected values are worked out here from the inputs
(file bytes, layer bytes), never read back from the code under test.
"""

from __future__ import annotations

import dataclasses
import hashlib
import stat
import subprocess
import sys
import typing
from dataclasses import dataclass
from pathlib import Path

import pytest

from ociworker.content.store import ContentStore
from ociworker.core.graph import (
    Copy,
    ExecMount,
    ExecOp,
    FileOp,
    Mkdir,
    Mkfile,
    Op,
    SourceOp,
    Vertex,
)
from ociworker.core.mounts import Mount
from ociworker.core.oci import Platform
from ociworker.errors import ExecError, NotFoundError, UnsupportedError, UserError
from ociworker.exporter.layercache import SQLiteLayerCache
from ociworker.ops.context import ContextChecksums, LocalContext
from ociworker.ops.exec import ExecDeps, ExecHandler
from ociworker.ops.file import FileDeps, FileHandler
from ociworker.ops.registry import HANDLERS, OpResolver
from ociworker.ops.runmount.cache import CacheMounts
from ociworker.ops.source import SourceDeps, SourceHandler
from ociworker.registry.client import RegistryClient
from ociworker.snapshot import access
from ociworker.solver.scheduler import Job, Result
from ociworker.sources.image import ImagePuller
from ociworker.testing.fake_registry import FakeRegistry, seed_image
from ociworker.testing.fakes import (
    ExecutorCall,
    FakeExecutor,
    FakeRun,
    MemoryApplier,
    MemoryMounter,
    MemorySnapshotter,
    plain_secret_files,
)
from ociworker.worker import WorkerConfig, open_worker

AMD64 = Platform("linux", "amd64")


class _Secrets:
    def __init__(self, values: dict[str, bytes]) -> None:
        self.values = values

    async def get_secret(self, secret_id: str) -> bytes | None:
        return self.values.get(secret_id)


@dataclass
class Rig:
    snapshots: MemorySnapshotter
    mounter: MemoryMounter
    executor: FakeExecutor
    scratch: Path
    cache_mounts: CacheMounts

    def exec_handler(self) -> ExecHandler:
        return ExecHandler(
            ExecDeps(
                snapshots=self.snapshots,
                mounter=self.mounter,
                executor=self.executor,
                cache_mounts=self.cache_mounts,
                scratch=self.scratch,
                checksums=ContextChecksums(),
                secret_files=plain_secret_files,
            )
        )

    def file_handler(self) -> FileHandler:
        return FileHandler(FileDeps(self.snapshots, self.mounter, self.scratch, ContextChecksums()))

    async def commit(self, name: str, files: dict[str, str]) -> None:
        mounts = await self.snapshots.prepare(f"make-{name}", None)
        async with self.mounter.mounted(mounts) as root:
            for rel, text in files.items():
                (root / rel).parent.mkdir(parents=True, exist_ok=True)
                (root / rel).write_text(text)
        await self.snapshots.commit(name, f"make-{name}")

    async def files(self, name: str) -> dict[str, str]:
        async with access.view(self.snapshots, self.mounter, name, self.scratch) as root:
            return {
                str(p.relative_to(root)): p.read_text() if p.is_file() else "<dir>"
                for p in sorted(root.rglob("*"))
            }

    async def kinds(self) -> dict[str, str]:
        return {i.key: i.kind for i in await self.snapshots.walk()}


@pytest.fixture
def rig(tmp_path: Path) -> Rig:
    snapshots = MemorySnapshotter()
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    return Rig(
        snapshots=snapshots,
        mounter=MemoryMounter(snapshots, tmp_path / "mounts"),
        executor=FakeExecutor(),
        scratch=scratch,
        cache_mounts=CacheMounts(tmp_path / "cachemounts"),
    )


def _exec(*mounts: ExecMount, args: tuple[str, ...] = ("sh", "-c", "make")) -> Vertex:
    return Vertex(ExecOp(args=args, mounts=mounts), name="[2/3] RUN make")


# --- ExecOp ---------------------------------------------------------------------------


async def test_exec_commits_one_snapshot_on_its_parent(rig: Rig) -> None:
    await rig.commit("base", {"etc/os-release": "fake"})
    result = await rig.exec_handler().run(_exec(), [Result("snapshot", "base")], Job(id="j"))
    assert result.kind == "snapshot"
    assert await rig.kinds() == {"base": "committed", result.ref: "committed"}
    info = await rig.snapshots.stat(result.ref)
    assert info is not None and info.parent == "base"
    (call,) = rig.executor.calls
    assert call.process.args == ("sh", "-c", "make")
    assert [m.readonly for m in call.rootfs] == [False]  # the step writes its rootfs


async def test_exec_streams_output_as_vertex_logs(rig: Rig) -> None:
    rig.executor.default = FakeRun(stdout=b"built\n", stderr=b"warning\n")
    events: list[object] = []
    vertex = _exec()
    await rig.exec_handler().run(vertex, [], Job(id="j", events=events.append))
    logs = [(getattr(e, "stream", None), getattr(e, "data", None)) for e in events]
    assert logs == [(1, b"built\n"), (2, b"warning\n")]


async def test_a_failing_command_names_the_step_and_leaves_nothing_active(rig: Rig) -> None:
    await rig.commit("base", {})
    rig.executor.default = FakeRun(exit_code=7)
    with pytest.raises(ExecError) as err:
        await rig.exec_handler().run(_exec(), [Result("snapshot", "base")], Job(id="j"))
    assert err.value.exit_code == 7
    assert "[2/3] RUN make" in str(err.value) and "exit code: 7" in str(err.value)
    assert await rig.kinds() == {"base": "committed"}


async def test_tmpfs_and_secret_mounts_reach_the_executor(rig: Rig) -> None:
    seen: dict[str, bytes] = {}

    def script(call: ExecutorCall) -> FakeRun:
        # read while the "process" runs: the secret file exists only then
        for m in call.mounts:
            if m.target == "/run/secrets/token":
                seen["file"] = Path(m.source).read_bytes()
        return FakeRun()

    rig.executor.script = script
    vertex = _exec(
        ExecMount("/cache/tmp", type="tmpfs", options=(("size", "64m"),)),
        ExecMount("/run/secrets/token", type="secret", options=(("id", "tok"), ("env", "TOKEN"))),
    )
    job = Job(id="j", secrets=_Secrets({"tok": b"s3cret"}))
    await rig.exec_handler().run(vertex, [], job)
    (call,) = rig.executor.calls
    assert Mount("tmpfs", "tmpfs", ("nosuid", "nodev", "size=64m"), "/cache/tmp") in call.mounts
    (secret,) = [m for m in call.mounts if m.target == "/run/secrets/token"]
    assert secret.type == "bind" and secret.readonly
    assert seen["file"] == b"s3cret"
    assert call.process.secret_env == ("TOKEN=s3cret",)
    assert not any("s3cret" in e for e in (*call.process.env, *call.process.args))
    assert not Path(secret.source).exists()  # gone once the step ended


async def test_a_missing_required_secret_is_not_found(rig: Rig) -> None:
    await rig.commit("base", {})
    vertex = _exec(
        ExecMount("/run/secrets/x", type="secret", options=(("id", "x"), ("required", "true")))
    )
    with pytest.raises(NotFoundError, match="secret 'x' not found"):
        await rig.exec_handler().run(vertex, [Result("snapshot", "base")], Job(id="j"))
    assert rig.executor.calls == []
    assert await rig.kinds() == {"base": "committed"}


async def test_a_mount_naming_a_missing_input_is_refused(rig: Rig) -> None:
    vertex = _exec(ExecMount("/src", type="bind", input=2))
    with pytest.raises(UserError, match="mount at /src names input 2, the step has 1"):
        await rig.exec_handler().run(vertex, [Result("none")], Job(id="j"))
    assert await rig.kinds() == {}


# --- FileOp ---------------------------------------------------------------------------


async def test_file_mkdir_and_mkfile_write_into_a_new_snapshot(rig: Rig) -> None:
    await rig.commit("base", {"keep.txt": "from the base"})
    vertex = Vertex(FileOp((Mkdir("/app", mode=0o750), Mkfile("/app/hello.txt", "hi", mode=0o600))))
    result = await rig.file_handler().run(vertex, [Result("snapshot", "base")], Job(id="j"))
    assert await rig.kinds() == {"base": "committed", result.ref: "committed"}
    assert await rig.files(result.ref) == {
        "app": "<dir>",
        "app/hello.txt": "hi",
        "keep.txt": "from the base",
    }
    assert await rig.files("base") == {"keep.txt": "from the base"}
    async with access.view(rig.snapshots, rig.mounter, result.ref, rig.scratch) as root:
        assert stat.S_IMODE((root / "app").stat().st_mode) == 0o750
        assert stat.S_IMODE((root / "app" / "hello.txt").stat().st_mode) == 0o600


async def test_a_copy_from_a_missing_local_source_is_not_found(rig: Rig) -> None:
    vertex = Vertex(FileOp((Copy(1, "a.txt", "/"),)))
    with pytest.raises(NotFoundError, match="no local source named 'ctx' in this session"):
        await rig.file_handler().run(vertex, [Result("none"), Result("dir", "ctx")], Job(id="j"))
    with pytest.raises(UserError, match="copy names input 1, but the step has 1"):
        await rig.file_handler().run(vertex, [Result("none")], Job(id="j"))
    assert await rig.kinds() == {}


@pytest.mark.parametrize("kind", ["copy", "bind"])
async def test_a_local_context_keys_by_the_selected_files_only(
    rig: Rig, tmp_path: Path, kind: str
) -> None:
    ctx = tmp_path / "ctx"
    for name, text in {"a.txt": "selected v1", "b.txt": "not selected"}.items():
        ctx.mkdir(exist_ok=True)
        (ctx / name).write_text(text)
    local = Vertex(SourceOp("local://context"))
    if kind == "copy":
        vertex = Vertex(FileOp((Copy(1, "a.txt", "/"),)), inputs=(None, local))
        handler: FileHandler | ExecHandler = rig.file_handler()
    else:
        mount = ExecMount("/src", type="bind", input=1, selector="a.txt")
        vertex = Vertex(ExecOp(args=("true",), mounts=(mount,)), inputs=(None, local))
        handler = rig.exec_handler()
    job = Job(id="j", locals={"context": LocalContext(ctx, None)})

    async def key() -> str:
        return await handler.cache_key(vertex, ["scratch-key", "whole-context-key"], job)

    first = await key()
    (ctx / "b.txt").write_text("changed, but no step selects it")
    (ctx / "c.txt").write_text("new, but no step selects it")
    assert await key() == first
    (ctx / "a.txt").write_text("selected v2")
    second = await key()
    assert second != first
    # by content, not by times: the old bytes back give the old key
    (ctx / "a.txt").write_text("selected v1")
    assert await key() == first
    # and a context holding only the selected file keys the same
    only = tmp_path / "only"
    only.mkdir()
    (only / "a.txt").write_text("selected v1")
    job.locals["context"] = LocalContext(only, None)
    assert await key() == first


# --- SourceOp -------------------------------------------------------------------------


def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


async def test_source_pulls_unpacks_and_records_each_layer(tmp_path: Path) -> None:
    reg = FakeRegistry()
    layers = [b"first layer tar", b"second layer tar"]
    digest, _, _ = seed_image(reg, "app", "v1", layers)
    content = ContentStore(tmp_path / "content")
    snapshots = MemorySnapshotter()
    applier = MemoryApplier(content)
    cache = SQLiteLayerCache(tmp_path / "cache.db")
    async with RegistryClient(transport=reg.transport()) as client:
        puller = ImagePuller(client, content)
        deps = SourceDeps(snapshots, snapshots, applier, client, puller, content, cache, AMD64)
        handler = SourceHandler(deps)
        vertex = Vertex(SourceOp(f"docker-image://reg.test/app:v1@{digest}"))
        result = await handler.run(vertex, [], Job(id="j"))
        # ChainIDs: chain(0) = diffID(0), chain(1) = sha256("chain(0) diffID(1)")
        chain0 = _sha(layers[0])
        chain1 = _sha(f"{chain0} {_sha(layers[1])}".encode())
        names = ["layer-" + c.removeprefix("sha256:") for c in (chain0, chain1)]
        assert result == Result("snapshot", names[1])
        assert [d for d, _ in applier.applied] == [_sha(x) for x in layers]
        assert await snapshots.walk() == [
            await snapshots.stat(names[0]),
            await snapshots.stat(names[1]),
        ]
        info = await snapshots.stat(names[1])
        assert info is not None and info.parent == names[0] and info.kind == "committed"
        for name, data in zip(names, layers, strict=True):
            recorded = cache.get_layer(name, "source")
            assert recorded is not None
            assert recorded.descriptor.digest == _sha(data)
            assert recorded.diff_id == _sha(data)
        # everything is in the content store now: no second pull, nothing applied again
        manifests = len(reg.requests("GET", "/manifests/"))
        assert await handler.run(vertex, [], Job(id="j2")) == result
        assert len(reg.requests("GET", "/manifests/")) == manifests
        assert len(applier.applied) == 2
    cache.close()


async def test_source_refuses_unknown_schemes_and_missing_locals(rig: Rig) -> None:
    deps = typing.cast(SourceDeps, None)  # neither case reaches a part
    handler = SourceHandler(deps)
    with pytest.raises(UserError, match="unsupported source 'svn://x'"):
        await handler.run(Vertex(SourceOp("svn://x")), [], Job(id="j"))
    with pytest.raises(NotFoundError, match="no local source named 'ctx' in this session"):
        await handler.run(Vertex(SourceOp("local://ctx")), [], Job(id="j"))
    job = Job(id="j", locals={"ctx": LocalContext(rig.scratch, None)})
    assert await handler.run(Vertex(SourceOp("local://ctx")), [], job) == Result("dir", "ctx")


# --- the resolver ---------------------------------------------------------------------


def test_every_op_type_has_a_registered_handler() -> None:
    assert set(HANDLERS) >= set(typing.get_args(Op))


def test_an_unknown_op_type_is_a_clear_error(rig: Rig) -> None:
    resolver = OpResolver({ExecOp: rig.exec_handler()})
    assert isinstance(resolver.handler(_exec()), ExecHandler)
    vertex = Vertex(FileOp((Mkdir("/x"),)), name="[1/1] WORKDIR /x")
    with pytest.raises(UnsupportedError, match=r"no handler for op type FileOp.*WORKDIR /x"):
        resolver.handler(vertex)


# --- the composition root -------------------------------------------------------------


def test_opening_a_worker_loads_no_runtime_and_no_differ(tmp_path: Path) -> None:
    code = (
        "import sys; from pathlib import Path; "
        "from ociworker.worker import WorkerConfig, open_worker; "
        f"w = open_worker(WorkerConfig(root=Path({str(tmp_path / 'state')!r}), "
        "snapshotter='native')); "
        "lazy = ['ociworker.executor.runtime', 'ociworker.diff.apply', 'ociworker.diff.compare']; "
        "print([m for m in lazy if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


async def test_a_worker_of_fakes_recovers_through_its_parts(tmp_path: Path) -> None:
    root = tmp_path / "state"
    (root / "tmp").mkdir(parents=True)
    (root / "tmp" / "mnt-left-behind").mkdir()
    (root / "tmp" / "bind-file").write_text("x")
    snapshots = MemorySnapshotter()
    await snapshots.prepare("committed-key", None)
    await snapshots.commit("kept", "committed-key")
    await snapshots.prepare("active-of-a-dead-build", "kept")
    await snapshots.view("view-of-a-dead-build", "kept")
    # the real parts of a worker, with fakes for the ones recovery goes through
    worker = dataclasses.replace(
        open_worker(WorkerConfig(root=root, snapshotter="native", platform=AMD64)),
        snapshots=snapshots,
        mounter=MemoryMounter(snapshots, root / "tmp"),
        executor=FakeExecutor(),
    )
    try:
        found = await worker.recover()
        assert found == {"containers": 0, "mounts": 0, "active_snapshots": 2}
        assert [i.key for i in await snapshots.walk()] == ["kept"]
        # what no live process owns is gone; this worker's own scratch dir stays
        assert list((root / "tmp").iterdir()) == [worker.tmp]
        assert await access.snapshot_chain(worker.snapshots, "kept") == ["kept"]
    finally:
        await worker.aclose()
