"""``ociworker info`` against the real ControlService on a unix socket in tmp (the worker
behind it is a stand-in with the fields Info reads), and against no daemon at all: what the
worker image's HEALTHCHECK sees."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import grpc
import pytest

from ociworker.api.server import ControlService
from ociworker.api.v1 import control_pb2 as pb
from ociworker.api.v1 import control_pb2_grpc as pb_grpc
from ociworker.worker import Worker


@dataclass(frozen=True)
class _Config:
    runtime: str = "crun"
    snapshotter: str = "fuse-overlayfs"


@dataclass(frozen=True)
class _Snapshots:
    picked: str = "fuse-overlayfs: asked for"


@dataclass
class _StandInWorker:
    root: Path
    config: _Config = field(default_factory=_Config)
    snapshots: _Snapshots = field(default_factory=_Snapshots)


async def _cli(*args: str, host: str | None = None) -> tuple[int, str, str]:
    env = {k: v for k, v in os.environ.items() if k != "OCIWORKER_HOST"}
    if host is not None:
        env["OCIWORKER_HOST"] = host
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "ociworker",
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def _version() -> str:
    code, out, _ = await _cli("--version")
    assert code == 0
    name, version = out.split()
    assert name == "ociworker"
    return version


@pytest.fixture
async def daemon(tmp_path: Path) -> AsyncIterator[str]:
    service = ControlService(cast(Worker, _StandInWorker(tmp_path / "state")))
    server = grpc.aio.server()
    pb_grpc.add_ControlServicer_to_server(cast(pb_grpc.ControlServicer, service), server)
    addr = f"unix://{tmp_path}/d.sock"
    server.add_insecure_port(addr)
    await server.start()
    yield addr
    await server.stop(None)


async def test_info_json_is_what_the_daemon_runs(daemon: str, tmp_path: Path) -> None:
    code, out, err = await _cli("info", "--addr", daemon, "--format", "json")
    assert code == 0, err
    assert json.loads(out) == {
        "version": await _version(),
        "root": str(tmp_path / "state"),
        "runtime": "crun",
        "snapshotter": "fuse-overlayfs",
        "snapshotter_picked": "fuse-overlayfs: asked for",
        "rootless": os.geteuid() != 0,
        "running_builds": 0,
    }


async def test_info_text_and_the_environment_address(daemon: str, tmp_path: Path) -> None:
    code, out, err = await _cli("info", host=daemon)
    assert code == 0, err
    rows = dict(line.split(":", 1) for line in out.splitlines())
    assert {k: v.strip() for k, v in rows.items()} == {
        "Version": await _version(),
        "Root": str(tmp_path / "state"),
        "Runtime": "crun",
        "Snapshotter": "fuse-overlayfs: asked for",
        "Rootless": "true" if os.geteuid() != 0 else "false",
        "Running builds": "0",
    }


async def test_no_daemon_is_one_line_and_exit_1(tmp_path: Path) -> None:
    addr = f"unix://{tmp_path}/none.sock"
    code, out, err = await _cli("info", "--addr", addr)
    assert (code, out) == (1, "")
    assert err.splitlines() == [
        f"ERROR: cannot reach the ociworker daemon at {addr}: no such file or directory"
    ]


class _Hung(pb_grpc.ControlServicer):
    async def Info(self, request: Any, context: Any) -> pb.InfoResponse:  # type: ignore[override]
        await asyncio.sleep(120)  # accepts the connection, never answers
        return pb.InfoResponse()


async def test_a_daemon_that_does_not_answer_is_unreachable(tmp_path: Path) -> None:
    # The HEALTHCHECK must fail with a reason, not hang until dockerd kills it.
    server = grpc.aio.server()
    pb_grpc.add_ControlServicer_to_server(_Hung(), server)
    addr = f"unix://{tmp_path}/hung.sock"
    server.add_insecure_port(addr)
    await server.start()
    try:
        code, out, err = await _cli("info", "--addr", addr)
    finally:
        await server.stop(None)
    assert (code, out) == (1, "")
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        f"ERROR: cannot reach the ociworker daemon at {addr}: "
    ), err


async def test_two_addresses_are_refused(tmp_path: Path) -> None:
    code, _, err = await _cli("info", "--addr", "unix:///a.sock", "--addr", "unix:///b.sock")
    assert code != 0
    assert err.splitlines()[0] == "ERROR: info works on one daemon: give one --addr"
