"""``ociworker.Fleet`` over real gRPC servers on unix sockets in tmp: the ranked
first worker builds; one that is down or refuses the build is passed over; a
build a worker took is never handed to another, whatever happens to it."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import grpc
import pytest

from ociworker.api import errors as api_errors
from ociworker.api.client import Client
from ociworker.api.fleet import WORKER_METADATA_KEY, Fleet
from ociworker.api.server import ControlService, serve_session
from ociworker.api.session import SessionHub
from ociworker.api.v1 import control_pb2 as pb
from ociworker.api.v1 import control_pb2_grpc as pb_grpc
from ociworker.cli import main
from ociworker.core.progress import Event, Warning
from ociworker.errors import ConfigError, DaemonUnavailable, WorkerRefused
from ociworker.worker import Worker


class _Scripted(pb_grpc.ControlServicer):
    """A daemon whose Solve does what ``mode`` says; counts the Solves it got."""

    def __init__(self) -> None:
        self.hub = SessionHub()
        self.mode = "ok"
        self.solves = 0
        self.dockerfiles: list[bytes] = []

    async def Info(self, request: Any, context: Any) -> pb.InfoResponse:  # type: ignore[override]
        if self.mode == "hung":
            await asyncio.sleep(60)  # a daemon that accepts connections and answers nothing
        return pb.InfoResponse(version="scripted")

    async def Session(self, request_iterator: Any, context: Any) -> None:  # type: ignore[override]
        await serve_session(self.hub, context)

    async def Solve(self, request: pb.SolveRequest, context: Any) -> None:  # type: ignore[override]
        self.solves += 1
        self.dockerfiles.append(request.dockerfile)
        if self.mode == "refuse":
            err = WorkerRefused("the daemon is shutting down")
            context.set_trailing_metadata(api_errors.trailing_metadata(err))
            context.set_code(api_errors.status_code(err))
            context.set_details(str(err))
            return
        if self.mode == "exhausted":
            context.set_code(grpc.StatusCode.RESOURCE_EXHAUSTED)
            context.set_details("too many builds")
            return
        await context.write(pb.SolveEvent(info=pb.InfoEvent(message="started")))
        if self.mode == "drop":  # took the build, then the connection went
            context.set_code(grpc.StatusCode.UNAVAILABLE)
            context.set_details("connection reset")
            return
        meta = json.dumps({"containerimage.config.digest": "sha256:" + "a" * 64})
        await context.write(pb.SolveEvent(result=pb.SolveResult(metadata_json=meta.encode())))


@dataclass
class Net:
    tmp: Path
    servers: dict[str, _Scripted]

    def ctx(self) -> Path:
        ctx = self.tmp / "project"
        ctx.mkdir(exist_ok=True)
        (ctx / "Dockerfile").write_text("FROM scratch\n")
        return ctx


@pytest.fixture
async def net(tmp_path: Path) -> AsyncIterator[Net]:
    servers: dict[str, _Scripted] = {}
    running = []
    for i in range(3):
        addr = f"unix://{tmp_path}/w{i}.sock"
        server = grpc.aio.server()
        servers[addr] = _Scripted()
        pb_grpc.add_ControlServicer_to_server(servers[addr], server)
        server.add_insecure_port(addr)
        await server.start()
        running.append(server)
    yield Net(tmp_path, servers)
    for server in running:
        await server.stop(None)


async def _build(fleet: Fleet, ctx: Path) -> tuple[str, list[Event], dict[str, Any]]:
    events: list[Event] = []
    said: list[str] = []
    result = await fleet.build(ctx, events=events.append, announce=said.append)
    assert len(said) == 1
    return said[0], events, dict(result.metadata)


async def test_the_first_ranked_worker_builds(net: Net) -> None:
    ctx = net.ctx()
    async with Fleet(list(net.servers)) as fleet:
        first = fleet.ranking(ctx)[0]
        line, events, meta = await _build(fleet, ctx)
    assert line == f'building with worker "{first}" (sticky pick 1 of 3)'
    assert meta[WORKER_METADATA_KEY] == first
    assert {a: s.solves for a, s in net.servers.items()} == {
        a: int(a == first) for a in net.servers
    }
    assert not [e for e in events if isinstance(e, Warning)]


async def test_a_worker_that_is_down_is_passed_over(net: Net) -> None:
    ctx = net.ctx()
    dead = f"unix://{net.tmp}/dead.sock"  # nothing listens there
    async with Fleet([*net.servers, dead]) as fleet:
        order = fleet.ranking(ctx)
        line, events, meta = await _build(fleet, ctx)
    taker = next(a for a in order if a != dead)
    assert meta[WORKER_METADATA_KEY] == taker
    assert line.startswith(f'building with worker "{taker}" (sticky pick {order.index(taker) + 1}')
    warned = [e.message for e in events if isinstance(e, Warning)]
    if order[0] == dead:
        assert warned == [
            f"cannot reach the ociworker daemon at {dead}: " + warned[0].split(f"{dead}: ", 1)[-1]
        ]
        assert warned[0].endswith("; trying the next worker of the fleet")
    else:
        assert warned == []


async def test_a_worker_that_does_not_answer_the_probe_is_passed_over(net: Net) -> None:
    ctx = net.ctx()
    async with Fleet(list(net.servers), probe_timeout=0.5) as fleet:
        first, second, third = fleet.ranking(ctx)
        net.servers[first].mode = "hung"
        line, events, meta = await _build(fleet, ctx)
    assert line == f'building with worker "{second}" (sticky pick 2 of 3)'
    assert meta[WORKER_METADATA_KEY] == second
    assert [net.servers[a].solves for a in (first, second, third)] == [0, 1, 0]
    (warned,) = [e.message for e in events if isinstance(e, Warning)]
    assert warned.startswith(f"cannot reach the ociworker daemon at {first}: deadline")


@pytest.mark.parametrize("mode", ["refuse", "exhausted"])
async def test_a_worker_that_refuses_is_passed_over(net: Net, mode: str) -> None:
    ctx = net.ctx()
    async with Fleet(list(net.servers)) as fleet:
        first, second, third = fleet.ranking(ctx)
        net.servers[first].mode = mode
        line, events, meta = await _build(fleet, ctx)
    assert meta[WORKER_METADATA_KEY] == second
    assert line == f'building with worker "{second}" (sticky pick 2 of 3)'
    assert [net.servers[a].solves for a in (first, second, third)] == [1, 1, 0]
    (warned,) = [e.message for e in events if isinstance(e, Warning)]
    assert warned.startswith(f"{first}: refused: ")
    assert warned.endswith("; trying the next worker of the fleet")


async def test_a_build_a_worker_took_is_never_run_elsewhere(net: Net) -> None:
    ctx = net.ctx()
    async with Fleet(list(net.servers)) as fleet:
        first, second, third = fleet.ranking(ctx)
        net.servers[first].mode = "drop"
        with pytest.raises(DaemonUnavailable) as got:
            await fleet.build(ctx)
    assert not isinstance(got.value, WorkerRefused)
    assert [net.servers[a].solves for a in (first, second, third)] == [1, 0, 0]


async def test_every_worker_down_is_one_error_naming_each(tmp_path: Path) -> None:
    ctx = tmp_path / "c"
    ctx.mkdir()
    (ctx / "Dockerfile").write_text("FROM scratch\n")
    addrs = [f"unix://{tmp_path}/none{i}.sock" for i in range(3)]
    async with Fleet(addrs) as fleet:
        with pytest.raises(DaemonUnavailable) as got:
            await fleet.build(ctx)
    text = str(got.value)
    assert text.startswith("no worker of the fleet took the build (3 tried): ")
    assert all(f"cannot reach the ociworker daemon at {a}" in text for a in addrs)


def test_a_malformed_address_is_refused_up_front() -> None:
    with pytest.raises(ConfigError, match="invalid daemon address 'w2:1234'"):
        Fleet(["unix:///a.sock", "w2:1234"])


@dataclass
class _StandInWorker:
    root: Path


async def test_a_stopping_daemon_refuses_a_build(tmp_path: Path) -> None:
    # the real service: once the daemon stops (cancel_all), a Solve is refused
    # in words a fleet client recognises, and nothing is recorded or run
    service = ControlService(cast(Worker, _StandInWorker(tmp_path)))
    await service.cancel_all()
    server = grpc.aio.server()
    pb_grpc.add_ControlServicer_to_server(cast(pb_grpc.ControlServicer, service), server)
    addr = f"unix://{tmp_path}/d.sock"
    server.add_insecure_port(addr)
    await server.start()
    ctx = tmp_path / "c"
    ctx.mkdir()
    (ctx / "Dockerfile").write_text("FROM scratch\n")
    try:
        async with Client(addr) as client:
            with pytest.raises(WorkerRefused) as got:
                await client.build(ctx)
    finally:
        await server.stop(None)
    assert str(got.value) == (
        f"the ociworker daemon at {addr} refused the build: the daemon is shutting down"
    )


async def _cli(*args: str, stdin: bytes = b"") -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "ociworker",
        *args,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await proc.communicate(stdin)
    assert proc.returncode is not None
    return proc.returncode, err.decode()


async def test_the_cli_names_the_worker_and_records_it(net: Net) -> None:
    ctx = net.ctx()
    meta = net.tmp / "meta.json"
    order = Fleet(list(net.servers)).ranking(ctx)
    net.servers[order[0]].mode = "refuse"
    flags = [f for addr in net.servers for f in ("--addr", addr)]
    code, err = await _cli(
        "build", *flags, "--progress", "plain", "--metadata-file", str(meta), str(ctx)
    )
    assert code == 0, err
    lines = err.splitlines()
    assert f'building with worker "{order[1]}" (sticky pick 2 of 3)' in lines
    assert [x for x in lines if x.startswith("WARNING: ")] == [
        f"WARNING: {order[0]}: refused: the daemon is shutting down; "
        "trying the next worker of the fleet"
    ]
    assert json.loads(meta.read_text())["ociworker.worker"] == order[1]


async def test_one_addr_is_a_plain_daemon_build(net: Net) -> None:
    ctx = net.ctx()
    meta = net.tmp / "meta.json"
    addr = next(iter(net.servers))
    code, err = await _cli(
        "build", "--addr", addr, "--progress", "plain", "--metadata-file", str(meta), str(ctx)
    )
    assert code == 0, err
    assert "building with worker" not in err
    assert "ociworker.worker" not in json.loads(meta.read_text())


def test_du_and_prune_take_one_daemon(capsys: pytest.CaptureFixture[str]) -> None:
    for cmd in ("du", "prune"):
        assert main([cmd, "--addr", "unix:///a.sock", "--addr", "unix:///b.sock"]) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"ERROR: {cmd} works on one daemon: give one --addr"), err


async def test_a_dockerfile_from_stdin_reaches_the_worker_that_takes_over(net: Net) -> None:
    ctx = net.ctx()
    order = Fleet(list(net.servers)).ranking(ctx)
    net.servers[order[0]].mode = "refuse"
    flags = [f for addr in net.servers for f in ("--addr", addr)]
    text = b"FROM scratch\nLABEL from=stdin\n"
    code, err = await _cli("build", *flags, "--progress", "plain", "-f", "-", str(ctx), stdin=text)
    assert code == 0, err
    assert net.servers[order[0]].dockerfiles == [text]
    assert net.servers[order[1]].dockerfiles == [text]
