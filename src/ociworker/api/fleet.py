"""``ociworker.Fleet``: builds on many daemons, each project sticky to one of them.

    async with ociworker.Fleet(["unix:///run/a.sock", "unix:///run/b.sock"]) as fleet:
        result = await fleet.build("ctx", tags=("app:dev",))

The worker is picked by rendezvous hashing (``core.fleet.rank``) of the
build's key, ``fleet_key``: the context directory's absolute path, so the same
project keeps hitting the same worker's local cache and its last synced copy of
the context. A worker is tried in rank order; one is passed over when it does
not answer the probe (``Info`` within ``probe_timeout``) or does not take the
build (``WorkerRefused``: it refused it, or it could not be reached before the
Solve was handed to it). A build a worker took is never retried elsewhere, so
no build ever runs on two workers; its failure is the build's failure.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from ociworker.api.client import Client, DaemonInfo, as_request, check_addr
from ociworker.core.build import BuildDefinition, BuildRequest, BuildResult
from ociworker.core.fleet import rank
from ociworker.core.progress import EventSink, Info, Warning, discard
from ociworker.errors import ConfigError, DaemonUnavailable, WorkerRefused
from ociworker.session.context import STDIN, read_definition, read_stdin_dockerfile

#: metadata key (result and ``--metadata-file``) naming the worker that built,
#: as buildx's ``buildx.build.ref`` names the builder and node
WORKER_METADATA_KEY = "ociworker.worker"

#: seconds a worker has to answer the probe before the next one is tried
PROBE_TIMEOUT = 5.0


def fleet_key(context: Path) -> str:
    """The key a build is placed by: its context directory's absolute, resolved
    path (buildx's kubernetes driver keys ``loadbalance=sticky`` on the context
    path too). Not the host name: CI runners that check a project out at the
    same path then share a worker and its cache. Not the Dockerfile: the
    Dockerfiles of one project share base images and context on one worker."""
    return str(context.resolve())


class Member(Protocol):
    """What the fleet needs of one worker's client (``Client`` is one)."""

    addr: str

    async def info(self, *, timeout: float | None = None) -> DaemonInfo: ...

    async def build(
        self,
        request: BuildRequest,
        *,
        events: EventSink,
        failover: bool,
        accepted: Callable[[], None] | None,
        definition: BuildDefinition | None,
        extra_metadata: Mapping[str, Any] | None,
        **options: Any,
    ) -> BuildResult: ...

    async def aclose(self) -> None: ...


class Fleet:
    """Builds on the worker ``core.fleet.rank`` picks among ``addrs``, failing
    over to the next one that is up and takes the build."""

    def __init__(
        self,
        addrs: Sequence[str],
        *,
        tlscacert: str | None = None,
        tlscert: str | None = None,
        tlskey: str | None = None,
        probe_timeout: float = PROBE_TIMEOUT,
        connect: Callable[[str], Member] | None = None,
    ) -> None:
        self.addrs = tuple(dict.fromkeys(addrs))  # a repeated address is one worker
        if not self.addrs:
            raise ConfigError("a fleet needs at least one worker address")
        for addr in self.addrs:
            check_addr(addr)  # a malformed one is refused before any build
        self.probe_timeout = probe_timeout

        def client(addr: str) -> Member:
            return Client(addr, tlscacert=tlscacert, tlscert=tlscert, tlskey=tlskey)

        self._connect = connect or client
        #: the clients opened so far (a worker is connected to when first tried)
        self.members: dict[str, Member] = {}

    def _member(self, addr: str) -> Member:
        member = self.members.get(addr)
        if member is None:
            member = self.members[addr] = self._connect(addr)
        return member

    async def aclose(self) -> None:
        for member in self.members.values():
            await member.aclose()

    async def __aenter__(self) -> Fleet:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def ranking(self, context: Path | str) -> list[str]:
        """The workers in the order a build of ``context`` (a directory, or the
        URL of a context the worker fetches) tries them."""
        key = context if isinstance(context, str) else fleet_key(context)
        return rank(key, self.addrs)

    async def build(
        self,
        request: BuildRequest | Path | str,
        *,
        events: EventSink = discard,
        announce: Callable[[str], None] | None = None,
        **options: Any,
    ) -> BuildResult:
        """``Client.build`` on the first worker of ``ranking`` that is up and
        takes it; the result's metadata names it under ``WORKER_METADATA_KEY``.

        ``announce`` gets the one line saying which worker took the build
        (default: an ``Info`` event); each worker passed over is a ``Warning``.
        """
        client_opts = {
            k: options.pop(k)
            for k in ("build_id", "secrets", "secret_ids", "ssh", "ssh_ids", "credentials")
            if k in options
        }
        # the caller may have read it (--frontend graph.v1)
        definition: BuildDefinition | None = options.pop("definition", None)
        req = as_request(request, options)
        # read once for every attempt (``-f -`` is stdin), and before any probe;
        # a fetched context's Dockerfile is the worker's to read
        if definition is not None:
            pass
        elif not req.context_url:
            definition = read_definition(req.context, req.dockerfile)
        elif req.dockerfile == STDIN:
            definition = BuildDefinition(read_stdin_dockerfile(), "Dockerfile")
        say = announce or (lambda line: events(Info(line)))
        order = self.ranking(req.context_url or req.context)
        passed: list[str] = []
        for n, addr in enumerate(order, 1):
            member = self._member(addr)
            try:
                await member.info(timeout=self.probe_timeout)
            except DaemonUnavailable as exc:  # nothing was handed to it yet
                passed.append(str(exc))
                self._passing(events, exc, last=n == len(order))
                continue
            line = f'building with worker "{addr}" (sticky pick {n} of {len(order)})'
            try:
                return await member.build(
                    req,
                    events=events,
                    failover=True,
                    # said once the worker answers: a refusing one never "builds"
                    accepted=functools.partial(say, line),
                    definition=definition,
                    extra_metadata={WORKER_METADATA_KEY: addr},
                    **client_opts,
                )
            except WorkerRefused as exc:
                # Raised (with failover=True) only when the worker provably did
                # not take the build; any other failure is the build's own.
                passed.append(str(exc))
                self._passing(events, exc, last=n == len(order))
        raise DaemonUnavailable(
            f"no worker of the fleet took the build ({len(order)} tried): " + "; ".join(passed)
        )

    @staticmethod
    def _passing(events: EventSink, exc: DaemonUnavailable, *, last: bool) -> None:
        if not last:
            events(Warning(f"{exc}; trying the next worker of the fleet"))
