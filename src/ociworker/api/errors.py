"""Errors across the gRPC boundary, mapped once in each direction.

The carrier is our own binary trailing-metadata entry ``ociworker-error-bin``
holding an ``ErrorDetail`` (class name, code, message, typed fields such as
ExecError's exit code). We do not use ``grpc-status-details-bin``: its
``google.rpc.Status`` needs googleapis-common-protos, one more dependency for
no gain when both ends are ours.
"""

from __future__ import annotations

from collections.abc import Sequence

import grpc

from ociworker import errors
from ociworker.api.v1 import control_pb2 as pb

METADATA_KEY = "ociworker-error-bin"

# Most specific first: the first isinstance match picks the status code.
_STATUS: tuple[tuple[type[errors.OciworkerError], grpc.StatusCode], ...] = (
    (errors.BuildCancelled, grpc.StatusCode.CANCELLED),
    (errors.NotFoundError, grpc.StatusCode.NOT_FOUND),
    (errors.UnsupportedError, grpc.StatusCode.UNIMPLEMENTED),
    (errors.ExecError, grpc.StatusCode.UNKNOWN),
    (errors.UserError, grpc.StatusCode.INVALID_ARGUMENT),
    # RESOURCE_EXHAUSTED, as gRPC's own "too busy" answers: the client may try another worker
    (errors.WorkerRefused, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.WorldError, grpc.StatusCode.UNAVAILABLE),
)

_CLASSES: dict[str, type[errors.OciworkerError]] = {
    name: obj
    for name, obj in vars(errors).items()
    if isinstance(obj, type) and issubclass(obj, errors.OciworkerError)
}


def status_code(exc: errors.OciworkerError) -> grpc.StatusCode:
    for cls, code in _STATUS:
        if isinstance(exc, cls):
            return code
    return grpc.StatusCode.INTERNAL


def to_detail(exc: errors.OciworkerError) -> pb.ErrorDetail:
    fields: dict[str, str] = {}
    if isinstance(exc, errors.ExecError):
        fields = {"step": exc.step, "command": exc.command, "exit_code": str(exc.exit_code)}
        if exc.killed_by:
            fields["killed_by"] = exc.killed_by
    elif isinstance(exc, errors.DockerfileError):
        fields = {"message": exc.message}
        if exc.filename is not None:
            fields["filename"] = exc.filename
        if exc.line is not None:
            fields["line"] = str(exc.line)
        if exc.source_line is not None:
            fields["source_line"] = exc.source_line
    # The nearest class the client knows (an unknown subclass degrades to its base).
    cls: type[BaseException] = type(exc)
    while cls.__name__ not in _CLASSES:
        cls = cls.__mro__[1]
    return pb.ErrorDetail(type=cls.__name__, code=exc.code, message=str(exc), fields=fields)


def from_detail(detail: pb.ErrorDetail) -> errors.OciworkerError:
    cls = _CLASSES.get(detail.type)
    f = dict(detail.fields)
    if cls is errors.ExecError:
        try:
            return errors.ExecError(
                f["step"], f["command"], int(f["exit_code"]), killed_by=f.get("killed_by", "")
            )
        except (KeyError, ValueError):
            pass
    elif cls is errors.DockerfileError and "message" in f:
        line = f.get("line")
        return errors.DockerfileError(
            f["message"],
            filename=f.get("filename"),
            line=int(line) if line and line.isdigit() else None,
            source_line=f.get("source_line"),
        )
    elif cls is not None and cls.__init__ is errors.OciworkerError.__init__:
        return cls(detail.message)
    # A class this client does not know: keep the fault side its code implies.
    base: type[errors.OciworkerError] = errors.OciworkerError
    if detail.code in {c.code for c in _CLASSES.values() if issubclass(c, errors.UserError)}:
        base = errors.UserError
    elif detail.code in {c.code for c in _CLASSES.values() if issubclass(c, errors.WorldError)}:
        base = errors.WorldError
    return base(detail.message)


def trailing_metadata(exc: errors.OciworkerError) -> tuple[tuple[str, bytes], ...]:
    return ((METADATA_KEY, to_detail(exc).SerializeToString()),)


def from_rpc_error(err: grpc.aio.AioRpcError) -> BaseException:
    """The error a client call should raise for a failed RPC."""
    md: Sequence[tuple[str, str | bytes]] = tuple(err.trailing_metadata() or ())
    for key, value in md:
        if key == METADATA_KEY and isinstance(value, bytes):
            detail = pb.ErrorDetail()
            detail.ParseFromString(value)
            return from_detail(detail)
    code = err.code()
    text = err.details() or str(code)
    if code == grpc.StatusCode.CANCELLED:
        return errors.BuildCancelled(text)
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return errors.DaemonUnavailable(f"daemon unavailable: {text}")
    return errors.OciworkerError(text)
