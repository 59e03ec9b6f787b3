"""``ociworker history ls | inspect | logs | rm | trace``: the build records of
the embedded worker's root, or of a daemon (``--addr``), as buildx prints its
own (``docker buildx history``)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from ociworker.core.history import (
    BuildRecord,
    event_from_json,
    format_inspect,
    format_ls,
    trace_json,
    trace_svg,
)
from ociworker.core.progress import EventSink
from ociworker.errors import ConfigError
from ociworker.fs.atomic import write_atomic
from ociworker.progress_ui import PlainPrinter, RawJSONPrinter

if TYPE_CHECKING:
    from ociworker.api.client import Client
    from ociworker.worker import Worker


class History(Protocol):
    """Where the records are: the root's store or a daemon."""

    async def records(self) -> list[BuildRecord]: ...

    async def get(self, ref: str) -> BuildRecord: ...

    async def events(self, ref: str) -> list[dict[str, Any]]: ...

    async def remove(self, refs: Sequence[str], all: bool) -> list[str]: ...


class _Embedded:
    def __init__(self, worker: Worker) -> None:
        if worker.history is None:
            raise ConfigError("this worker keeps no build history")
        self._h = worker.history

    async def records(self) -> list[BuildRecord]:
        return self._h.records()

    async def get(self, ref: str) -> BuildRecord:
        return self._h.get(ref)

    async def events(self, ref: str) -> list[dict[str, Any]]:
        return self._h.events(ref)

    async def remove(self, refs: Sequence[str], all: bool) -> list[str]:
        return self._h.remove(self._h.ids() if all else refs)


class _Daemon:
    def __init__(self, client: Client) -> None:
        self._c = client

    async def records(self) -> list[BuildRecord]:
        return await self._c.history_records()

    async def get(self, ref: str) -> BuildRecord:
        return await self._c.history_get(ref)

    async def events(self, ref: str) -> list[dict[str, Any]]:
        return await self._c.history_events(ref)

    async def remove(self, refs: Sequence[str], all: bool) -> list[str]:
        return await self._c.history_remove(refs, all=all)


async def cmd_history(
    args: argparse.Namespace,
    client: Callable[[argparse.Namespace], Client],
    worker: Callable[[argparse.Namespace], Worker],
) -> int:
    if args.history_command == "rm" and not args.refs and not args.all:
        raise ConfigError("history rm: give at least one build (ID, prefix or ^N) or --all")
    if args.addr:
        async with client(args) as c:
            return await _run(args, _Daemon(c))
    w = worker(args)
    try:
        return await _run(args, _Embedded(w))
    finally:
        await w.aclose()


async def _run(args: argparse.Namespace, history: History) -> int:
    cmd = args.history_command
    if cmd == "ls":
        records = await history.records()
        if args.format == "json":
            for r in records:
                print(json.dumps(_summary(r)))
        else:
            print(format_ls(records))
        return 0
    if cmd == "rm":
        for rid in await history.remove(args.refs, args.all):
            print(rid)
        return 0
    if cmd == "logs":
        printer: EventSink = (
            RawJSONPrinter(sys.stdout) if args.progress == "rawjson" else PlainPrinter(sys.stdout)
        )
        for d in await history.events(args.ref):
            ev = event_from_json(d)
            if ev is not None:
                printer(ev)
        return 0
    record = await history.get(args.ref)
    if cmd == "inspect":
        if args.format == "json":
            print(json.dumps(record.to_json(), indent=2))
        else:
            print(format_inspect(record))
        return 0
    # trace
    if args.format == "json":
        text = json.dumps(trace_json(record), indent=1) + "\n"
    else:
        text = trace_svg(record)
    if args.output is None:
        sys.stdout.write(text)
    else:
        write_atomic(args.output, text.encode())
    return 0


def _summary(r: BuildRecord) -> dict[str, Any]:
    steps = r.build_steps()
    return {
        "ref": r.id,
        "name": r.name,
        "status": r.status,
        "created_at": r.created,
        "completed_at": r.completed,
        "total_steps": len(steps),
        "completed_steps": sum(1 for s in steps if s.completed is not None),
        "cached_steps": sum(1 for s in steps if s.cached),
        "error": r.error,
    }
