"""Errors and progress events cross the gRPC boundary unchanged."""

from __future__ import annotations

import grpc
import pytest

from ociworker import errors
from ociworker.api import errors as api_errors
from ociworker.api.convert import event_from_proto, event_to_proto
from ociworker.api.v1 import control_pb2 as pb
from ociworker.core.progress import Event, Info, VertexLog, VertexStatus, Warning

SAMPLES: list[errors.OciworkerError] = [
    errors.ExecError("[2/2] RUN exit 3", "/bin/sh -c exit 3", 3),
    errors.DockerfileError(
        "unknown instruction: FOO", filename="Dockerfile", line=2, source_line="FOO bar"
    ),
    errors.DockerfileError("empty"),
    errors.NotFoundError("failed to read dockerfile: open x: no such file"),
    errors.ConfigError("bad flag"),
    errors.UnsafePathError("invalid path '../x'"),
    errors.UnsupportedError("foreign platform"),
    errors.RegistryError("registry said 500"),
    errors.DigestMismatchError("blob mismatch"),
    errors.HostError("no runc"),
    errors.RuntimeFailure("runc failed"),
    errors.BuildCancelled("build cancelled"),
    errors.UserError("plain user error"),
    errors.WorldError("plain world error"),
]


@pytest.mark.parametrize("exc", SAMPLES, ids=lambda e: type(e).__name__)
def test_error_round_trips_to_the_same_class_and_text(exc: errors.OciworkerError) -> None:
    wire = api_errors.to_detail(exc).SerializeToString()
    detail = pb.ErrorDetail()
    detail.ParseFromString(wire)
    back = api_errors.from_detail(detail)
    assert type(back) is type(exc)
    assert str(back) == str(exc)
    assert back.code == exc.code


def test_exec_error_keeps_its_exit_code_and_fields() -> None:
    exc = errors.ExecError("[3/3] RUN false", "/bin/sh -c false", 1)
    back = api_errors.from_detail(api_errors.to_detail(exc))
    assert isinstance(back, errors.ExecError)
    assert (back.exit_code, back.step, back.command) == (1, exc.step, exc.command)


def test_dockerfile_error_keeps_its_location() -> None:
    exc = errors.DockerfileError("bad", filename="app.Dockerfile", line=7, source_line="X y")
    back = api_errors.from_detail(api_errors.to_detail(exc))
    assert isinstance(back, errors.DockerfileError)
    assert (back.filename, back.line, back.source_line) == ("app.Dockerfile", 7, "X y")


def test_unknown_subclass_travels_as_its_nearest_known_base() -> None:
    class SessionGone(errors.WorldError):
        code = "session_gone"

    detail = api_errors.to_detail(SessionGone("client went away"))
    assert detail.type == "WorldError"
    back = api_errors.from_detail(detail)
    assert type(back) is errors.WorldError and str(back) == "client went away"


def test_unknown_class_name_keeps_the_fault_side_of_its_code() -> None:
    detail = pb.ErrorDetail(type="FutureError", code="registry", message="m")
    assert type(api_errors.from_detail(detail)) is errors.WorldError
    detail = pb.ErrorDetail(type="FutureError", code="config", message="m")
    assert type(api_errors.from_detail(detail)) is errors.UserError


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (errors.ExecError("s", "c", 2), grpc.StatusCode.UNKNOWN),
        (errors.NotFoundError("x"), grpc.StatusCode.NOT_FOUND),
        (errors.ConfigError("x"), grpc.StatusCode.INVALID_ARGUMENT),
        (errors.UnsupportedError("x"), grpc.StatusCode.UNIMPLEMENTED),
        (errors.RegistryError("x"), grpc.StatusCode.UNAVAILABLE),
        (errors.BuildCancelled("x"), grpc.StatusCode.CANCELLED),
        (errors.OciworkerError("x"), grpc.StatusCode.INTERNAL),
    ],
)
def test_status_code_says_whose_fault(exc: errors.OciworkerError, code: grpc.StatusCode) -> None:
    assert api_errors.status_code(exc) == code


EVENTS: list[Event] = [
    VertexStatus("sha256:a", "[1/2] FROM x", started=1.5),
    VertexStatus("sha256:a", "[1/2] FROM x", started=1.5, completed=2.25),
    VertexStatus("sha256:b", "RUN y", started=0.0, completed=0.0, cached=True),
    VertexStatus("sha256:c", "RUN z", started=3.0, completed=4.0, error="exit code: 1"),
    VertexStatus("export:1", "exporting"),
    VertexLog("sha256:c", 2, b"\xffbinary\nline", 5.125),
    Warning("FromAsCasing: 'as' and 'FROM' keywords' casing do not match", "detail"),
    Info("transferring context: 1.23MB 0.1s", "context:1"),
    Info("free line"),
]


@pytest.mark.parametrize("ev", EVENTS, ids=lambda e: type(e).__name__)
def test_progress_events_round_trip(ev: Event) -> None:
    wire = event_to_proto(ev).SerializeToString()
    msg = pb.SolveEvent()
    msg.ParseFromString(wire)
    assert event_from_proto(msg) == ev


def test_non_progress_messages_are_not_events() -> None:
    assert event_from_proto(pb.SolveEvent(result=pb.SolveResult())) is None
    assert event_from_proto(pb.SolveEvent(output=pb.OutputChunk(data=b"x"))) is None
