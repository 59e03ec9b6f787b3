"""Hostile input, second round (issue 18 item 4): raw bytes sent to the daemon's socket
through gRPC's generic calls (no generated stub, so no client-side validation): malformed
protobufs on every method, a message over the daemon's receive limit, and a session stream
that speaks nonsense. Each call gets a gRPC status back (never a hang or a dropped
connection), and the daemon keeps serving: ``du`` and a build through it work after.
"""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.message import DecodeError

from ociworker.api.v1 import control_pb2 as pb
from ociworker.core.definition import MAX_BYTES
from ociworker.testing.daemon import spawn_daemon

_SERVICE = "/ociworker.v1.Control/"
_UNARY = (
    "DiskUsage", "Prune", "ListWorkers", "Info", "CheckBases", "ListHistory",
    "InspectHistory", "HistoryLogs", "RemoveHistory",
)  # fmt: skip
_STREAMS = ("Solve", "Status")

#: bytes that are no protobuf message of any type
MALFORMED = {
    "truncated-varint": b"\x08\xff\xff",
    "length-past-end": b"\x0a\xff\xff\xff\xff\x0f" + b"x" * 16,
    "wire-type-7": b"\x0f\x01",
    "group-mismatch": b"\x0b\x14",
    "end-group-without-start": b"\x0c",
    "nested-100k": b"\x0a\x80\x80\x04" * 3 + b"\x0b" * 100_000,
    "bad-utf8-in-string": b"\x0a\x02\xff\xfe",
}


@pytest.fixture
def daemon(tmp_path: Path, require_root: None) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    sock = tmp_path / "d.sock"
    root = tmp_path / "root"
    proc = spawn_daemon(("--addr", f"unix://{sock}", "--root", str(root)), tmp_path / "daemon.log")
    try:
        yield f"unix://{sock}", proc
    finally:
        if proc.poll() is None:
            proc.terminate()
        proc.wait(timeout=60)
    log = (tmp_path / "daemon.log").read_text(errors="replace")
    # grpc's own "Exception deserializing request!" is logged by grpc; ours must not crash
    assert "Traceback" not in log.replace("Exception deserializing", ""), log[-3000:]


def _raw(b: bytes) -> bytes:
    return b


def _still_serves(addr: str, tmp_path: Path, base_image: str) -> None:
    du = subprocess.run(
        [sys.executable, "-m", "ociworker", "du", "--addr", addr],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert du.returncode == 0, du.stderr
    ctx = tmp_path / f"ctx-{uuid.uuid4().hex[:6]}"
    ctx.mkdir()
    (ctx / "Dockerfile").write_text(f"FROM {base_image}\nRUN echo {uuid.uuid4().hex}\n")
    build = subprocess.run(
        [sys.executable, "-m", "ociworker", "build", "--addr", addr, "--progress", "plain",
         str(ctx)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert build.returncode == 0, build.stderr


def _request_type(method: str) -> Any:
    desc = pb.DESCRIPTOR.services_by_name["Control"].methods_by_name[method].input_type
    return getattr(pb, desc.name)


def _is_malformed(method: str, payload: bytes) -> bool:
    """What the protobuf library itself says of ``payload`` as ``method``'s request."""
    try:
        _request_type(method).FromString(payload)
    except DecodeError:
        return True
    return False


def test_malformed_protobufs_get_a_status_and_the_daemon_survives(
    daemon: tuple[str, subprocess.Popen[bytes]], tmp_path: Path, base_image: str
) -> None:
    addr, proc = daemon
    refused = 0
    with grpc.insecure_channel(addr) as ch:
        for method in (*_UNARY, *_STREAMS):
            for what, payload in MALFORMED.items():
                code, details = _call(ch, method, payload)
                if _is_malformed(method, payload):
                    refused += 1
                    # the caller's fault, said so; never UNKNOWN with a Python class name
                    assert code == grpc.StatusCode.INVALID_ARGUMENT, (method, what, details)
                    assert details.startswith("malformed request"), details
                else:
                    # bytes that happen to parse (unknown fields are kept): served as usual
                    assert code not in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.UNAVAILABLE), (
                        method,
                        what,
                        code,
                        details,
                    )
                assert proc.poll() is None, (method, what)
    assert refused >= len(_UNARY) + len(_STREAMS)
    _still_serves(addr, tmp_path, base_image)


def _call(ch: grpc.Channel, method: str, payload: bytes) -> tuple[grpc.StatusCode, str]:
    try:
        if method in _UNARY:
            call = ch.unary_unary(
                _SERVICE + method, request_serializer=_raw, response_deserializer=_raw
            )
            call(payload, timeout=30)
        else:
            stream = ch.unary_stream(
                _SERVICE + method, request_serializer=_raw, response_deserializer=_raw
            )
            list(stream(payload, timeout=30))
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


def test_a_message_over_the_limit_is_refused_before_it_is_read(
    daemon: tuple[str, subprocess.Popen[bytes]], tmp_path: Path, base_image: str
) -> None:
    addr, proc = daemon
    limit = MAX_BYTES + (1 << 20)
    with grpc.insecure_channel(addr, options=[("grpc.max_send_message_length", -1)]) as ch:
        for method in ("Solve", "Info"):
            payload = b"\x0a" + bytes(limit + 16)
            if method == "Solve":
                call = ch.unary_stream(
                    _SERVICE + method, request_serializer=_raw, response_deserializer=_raw
                )
                with pytest.raises(grpc.RpcError) as info:
                    list(call(payload, timeout=60))
            else:
                unary = ch.unary_unary(
                    _SERVICE + method, request_serializer=_raw, response_deserializer=_raw
                )
                with pytest.raises(grpc.RpcError) as info:
                    unary(payload, timeout=60)
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, info.value.details()
            assert str(limit) in (info.value.details() or ""), info.value.details()
    assert proc.poll() is None
    _still_serves(addr, tmp_path, base_image)


def test_a_session_stream_of_garbage_is_ended_with_a_status(
    daemon: tuple[str, subprocess.Popen[bytes]], tmp_path: Path, base_image: str
) -> None:
    addr, proc = daemon
    with grpc.insecure_channel(addr) as ch:
        session = ch.stream_stream(
            _SERVICE + "Session", request_serializer=_raw, response_deserializer=_raw
        )
        for what, payload in MALFORMED.items():
            with pytest.raises(grpc.RpcError) as info:
                list(session(iter([payload, payload]), timeout=30))
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (
                what,
                info.value.code(),
                info.value.details(),
            )
    assert proc.poll() is None
    _still_serves(addr, tmp_path, base_image)
