"""Progress events and records <-> protobuf messages."""

from __future__ import annotations

import json

from ociworker.api.v1 import control_pb2 as pb
from ociworker.core.build import UsageRecord
from ociworker.core.progress import (
    Event,
    Info,
    LayerCommitted,
    Usage,
    VertexLog,
    VertexStatus,
    Warning,
)


def _usage_to_proto(u: Usage) -> pb.StepUsage:
    return pb.StepUsage(
        cpu_seconds=u.cpu_seconds,
        peak_memory_bytes=u.peak_memory,
        read_bytes=u.read_bytes,
        written_bytes=u.written_bytes,
    )


def _usage_from_proto(m: pb.StepUsage) -> Usage:
    return Usage(
        cpu_seconds=m.cpu_seconds if m.HasField("cpu_seconds") else None,
        peak_memory=m.peak_memory_bytes if m.HasField("peak_memory_bytes") else None,
        read_bytes=m.read_bytes if m.HasField("read_bytes") else None,
        written_bytes=m.written_bytes if m.HasField("written_bytes") else None,
    )


def event_to_proto(ev: Event) -> pb.SolveEvent:
    if isinstance(ev, VertexStatus):
        return pb.SolveEvent(
            vertex=pb.VertexEvent(
                digest=ev.digest,
                name=ev.name,
                started=ev.started or 0.0,
                has_started=ev.started is not None,
                completed=ev.completed or 0.0,
                has_completed=ev.completed is not None,
                cached=ev.cached,
                error=ev.error or "",
                usage=_usage_to_proto(ev.usage) if ev.usage is not None else None,
            )
        )
    if isinstance(ev, VertexLog):
        return pb.SolveEvent(
            log=pb.LogEvent(
                digest=ev.digest, stream=ev.stream, data=ev.data, timestamp=ev.timestamp
            )
        )
    if isinstance(ev, Warning):
        return pb.SolveEvent(warning=pb.WarningEvent(message=ev.message, detail=ev.detail))
    if isinstance(ev, LayerCommitted):
        raw = json.dumps(ev.to_json()).encode()
        return pb.SolveEvent(layer_committed=pb.LayerCommittedEvent(descriptor_json=raw))
    return pb.SolveEvent(info=pb.InfoEvent(message=ev.message, digest=ev.digest))


def event_from_proto(msg: pb.SolveEvent) -> Event | None:
    """The progress event in ``msg``; None for output, layer and result messages."""
    which = msg.WhichOneof("event")
    if which == "vertex":
        v = msg.vertex
        return VertexStatus(
            digest=v.digest,
            name=v.name,
            started=v.started if v.has_started else None,
            completed=v.completed if v.has_completed else None,
            cached=v.cached,
            error=v.error or None,
            usage=_usage_from_proto(v.usage) if v.HasField("usage") else None,
        )
    if which == "log":
        lg = msg.log
        return VertexLog(lg.digest, lg.stream, lg.data, lg.timestamp)
    if which == "warning":
        return Warning(msg.warning.message, msg.warning.detail)
    if which == "info":
        return Info(msg.info.message, msg.info.digest)
    if which == "layer_committed":
        return LayerCommitted.from_json(json.loads(msg.layer_committed.descriptor_json))
    return None


def usage_record_to_proto(r: UsageRecord) -> pb.UsageRecord:
    return pb.UsageRecord(
        id=r.id,
        type=r.type,
        size=r.size,
        description=r.description,
        last_used=r.last_used,
        created=r.created,
        parents=list(r.parents),
        mutable=r.mutable,
        in_use=r.in_use,
        shared=r.shared,
        usage_count=r.usage_count,
    )


def usage_record_from_proto(m: pb.UsageRecord) -> UsageRecord:
    return UsageRecord(
        m.id,
        m.type,
        m.size,
        m.description,
        m.last_used,
        created=m.created,
        parents=tuple(m.parents),
        mutable=m.mutable,
        in_use=m.in_use,
        shared=m.shared,
        usage_count=m.usage_count,
    )
