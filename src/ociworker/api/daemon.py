"""``ociworker serve``: the long-lived worker behind a gRPC socket.

One Worker for all builds; the root is locked (flock) so two daemons never
share it; a unix socket is mode 0660 with a configurable group; TCP only with
mutual TLS; SIGTERM/SIGINT cancel every build, stop the server, close the
worker and remove the socket. A root left by a killed daemon is recovered
(containers killed, mounts released, active snapshots dropped) before serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import grp
import os
import signal
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import grpc

from ociworker.api.activation import (
    Forwarder,
    Inherited,
    notify_ready,
    private_dir,
    remove_private_dir,
    take_sockets,
)
from ociworker.api.client import DEFAULT_ADDR
from ociworker.api.server import ControlService, add_to_server
from ociworker.core.activation import check_fd_addr, is_fd_addr
from ociworker.core.build import parse_duration, step_limits
from ociworker.core.definition import MAX_BYTES as MAX_DEFINITION_BYTES
from ociworker.core.entitlements import parse_entitlements
from ociworker.core.gc import GCConfig, gc_config
from ociworker.core.history import DEFAULT_MAX_AGE, DEFAULT_MAX_ENTRIES
from ociworker.core.progress import DEFAULT_LOG_CAP
from ociworker.core.units import parse_size
from ociworker.errors import ConfigError, HostError
from ociworker.fs.userns import default_config, default_root, default_socket, rootless
from ociworker.log import get_logger
from ociworker.worker import (
    DEFAULT_ROOT,
    DEFAULT_STEP_PIDS,
    WorkerConfig,
    default_runtime,
    open_worker,
)

_log = get_logger(__name__)

SERVER_OPTIONS: tuple[tuple[str, int], ...] = (
    # ping every 5 s, drop a peer silent for 5 s more: a dead client is noticed
    # (and its build cancelled) within 10 s
    ("grpc.keepalive_time_ms", 5000),
    ("grpc.keepalive_timeout_ms", 5000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 4000),
    ("grpc.http2.max_ping_strikes", 0),
    # how long any ping waits for its ack (default 1 min): this, not only the
    # keepalive timeout, is what ends a connection to a frozen peer
    ("grpc.http2.ping_timeout_ms", 5000),
    # a graph.v1 definition travels in the SolveRequest: up to its own limit
    # (core.definition.MAX_BYTES), which then says what is wrong (gRPC's 4 MiB
    # default would refuse a 100,000-step graph with a transport error)
    ("grpc.max_receive_message_length", MAX_DEFINITION_BYTES + (1 << 20)),
)


@dataclass(frozen=True)
class DaemonConfig:
    addr: str = DEFAULT_ADDR
    root: Path = Path(DEFAULT_ROOT)
    group: str = ""
    tlscacert: str = ""
    tlscert: str = ""
    tlskey: str = ""
    runtime: str = field(default_factory=default_runtime)
    snapshotter: str = "auto"
    insecure_registries: tuple[str, ...] = ()
    #: buildkitd's ``[registry."HOST"]`` tables: ``ca = [FILE, ...]`` trusted for
    #: HOST (its ``http = true`` lands in insecure_registries)
    registry_ca: tuple[tuple[str, tuple[str, ...]], ...] = ()
    max_parallelism: int | None = None
    log_cap: int = DEFAULT_LOG_CAP
    #: the default network's subnet ("" = a free /24 of 100.64.0.0/10)
    network_subnet: str = ""
    #: nameservers for steps ([] = the host's, localhost ones replaced)
    dns: tuple[str, ...] = ()
    #: every RUN step's limits (keys step_memory = "2g", step_pids = 0 for none, step_cpus)
    step_memory: int | None = None
    step_pids: int | None = DEFAULT_STEP_PIDS
    step_cpus: float | None = None
    #: entitlements builds may ask for with --allow (none unless listed; buildkitd's
    #: insecure-entitlements)
    entitlements: tuple[str, ...] = ()
    #: build history kept (``history ls``): at most history_max_entries records,
    #: none older than history_max_age seconds (0 = no limit)
    history_max_entries: int = DEFAULT_MAX_ENTRIES
    history_max_age: float = DEFAULT_MAX_AGE
    #: buildkitd's [worker.oci] gc / [[worker.oci.gcpolicy]]: run after builds and
    #: every gc_interval seconds
    gc: GCConfig = field(default_factory=GCConfig)
    gc_interval: float = 300.0


def load_config(path: Path | None, overrides: Mapping[str, Any]) -> DaemonConfig:
    """The TOML file's keys (the flag names with _), then the flags given on top."""
    values: dict[str, Any] = {}
    if path is None:
        path = default_config()  # a user's $XDG_CONFIG_HOME/ociworker/ociworkerd.toml
    if path is not None:
        try:
            values = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path}: {exc}") from None
    values.update({k: v for k, v in overrides.items() if v is not None})
    if rootless():
        # A user's daemon keeps its state and socket in the user's XDG dirs.
        values.setdefault("root", default_root())
        values.setdefault("addr", f"unix://{default_socket()}")
    # registry_ca is spelt as buildkitd's [registry."HOST"] tables
    known = {f.name for f in fields(DaemonConfig)} - {"registry_ca", "gc"} | {"registry", "worker"}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown config key(s): {', '.join(unknown)}")
    if "registry" in values:
        ca, http = _registry_tables(values.pop("registry"), path)
        values["registry_ca"] = ca
        values["insecure_registries"] = [*values.get("insecure_registries", ()), *http]
    if "worker" in values:
        values["gc"] = gc_config(values.pop("worker"), f"config file {path}")
    if "gc_interval" in values:
        values["gc_interval"] = parse_duration(str(values["gc_interval"]))
    if "root" in values:
        values["root"] = Path(values["root"])
    if "insecure_registries" in values:
        values["insecure_registries"] = tuple(values["insecure_registries"])
    if "dns" in values:
        values["dns"] = tuple(values["dns"])
    if "log_cap" in values:
        values["log_cap"] = parse_size(values["log_cap"])
    limits = [values.pop(k, None) for k in ("step_memory", "step_pids", "step_cpus")]
    values.update(step_limits(*limits))
    if "entitlements" in values:
        ents = values["entitlements"]
        if not isinstance(ents, list) or not all(isinstance(e, str) for e in ents):
            raise ConfigError(f"config file {path}: entitlements must be a list of names")
        values["entitlements"] = parse_entitlements(ents, f"config file {path}")
    for key in ("history_max_entries", "history_max_age"):
        v = values.get(key, 0)
        if isinstance(v, bool) or not isinstance(v, int | float) or v < 0:
            raise ConfigError(f"config file {path}: {key} must be a number >= 0 (0: no limit)")
    if "history_max_entries" in values and not isinstance(values["history_max_entries"], int):
        raise ConfigError(f"config file {path}: history_max_entries must be a whole number")
    if values.get("snapshotter", "auto") not in ("auto", "overlayfs", "fuse-overlayfs", "native"):
        raise ConfigError(f"invalid snapshotter {values['snapshotter']!r}")
    cfg = DaemonConfig(**values)
    _check_addr(cfg)
    return cfg


def _registry_tables(
    tables: object, path: Path | None
) -> tuple[tuple[tuple[str, tuple[str, ...]], ...], list[str]]:
    """``[registry."HOST"]`` tables as buildkitd reads them: ``ca`` (CA files
    trusted for HOST, which must exist) and ``http`` (plain HTTP); a key we do
    not honour (mirrors, keypair, ...) is refused, never ignored."""
    where = f"config file {path}"
    if not isinstance(tables, dict):
        raise ConfigError(f'{where}: registry must be tables [registry."HOST"]')
    ca: list[tuple[str, tuple[str, ...]]] = []
    http: list[str] = []
    for host, table in tables.items():
        if not isinstance(table, dict):
            raise ConfigError(f'{where}: [registry."{host}"] must be a table')
        unknown = sorted(set(table) - {"ca", "http"})
        if unknown:
            raise ConfigError(
                f'{where}: [registry."{host}"]: unsupported key(s) {", ".join(unknown)} '
                "(ca and http are)"
            )
        files = table.get("ca", [])
        if isinstance(files, str):
            files = [files]
        if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
            raise ConfigError(f'{where}: [registry."{host}"] ca must be a list of files')
        for f in files:
            if not Path(f).is_file():
                raise ConfigError(f'{where}: [registry."{host}"] ca: {f} is not a file')
        if files:
            ca.append((host, tuple(files)))
        if table.get("http") is True:
            http.append(host)
    return tuple(ca), http


def _check_addr(cfg: DaemonConfig) -> None:
    if is_fd_addr(cfg.addr):
        check_fd_addr(cfg.addr)
        if cfg.group:
            raise ConfigError(
                f"--group does not apply to {cfg.addr}: the socket is systemd's "
                "(set SocketGroup= and SocketMode= in the .socket unit)"
            )
        return
    if cfg.addr.startswith("unix://"):
        if not cfg.addr.removeprefix("unix://").startswith("/"):
            raise ConfigError(f"invalid address {cfg.addr!r}: unix:// needs an absolute path")
        return
    if cfg.addr.startswith("tcp://"):
        if rootless():
            # It would listen inside the worker's own network namespace, where
            # nobody outside could connect (pasta forwards no inbound port).
            raise ConfigError(
                f"refusing to listen on {cfg.addr}: a rootless daemon listens in its own "
                "network namespace; serve on unix:///PATH (default "
                "$XDG_RUNTIME_DIR/ociworker/ociworker.sock)"
            )
        if not (cfg.tlscacert and cfg.tlscert and cfg.tlskey):
            # As buildkitd: a TCP listener without client certificates would let
            # anyone on the network run containers as root.
            raise ConfigError(
                f"refusing to listen on {cfg.addr} without mutual TLS: "
                "give --tlscacert, --tlscert and --tlskey"
            )
        return
    raise ConfigError(
        f"invalid address {cfg.addr!r}: use unix:///PATH, tcp://HOST:PORT or fd:// "
        "(systemd socket activation)"
    )


@contextlib.contextmanager
def _root_lock(root: Path) -> Iterator[None]:
    root.mkdir(parents=True, exist_ok=True)
    fd = os.open(root / "daemon.lock", os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise HostError(f"another ociworker daemon is using {root}") from None
        yield
    finally:
        os.close(fd)


def _mutual_tls(cfg: DaemonConfig) -> grpc.ServerCredentials:
    with open(cfg.tlskey, "rb") as k, open(cfg.tlscert, "rb") as c:
        pair = (k.read(), c.read())
    with open(cfg.tlscacert, "rb") as ca:
        return grpc.ssl_server_credentials(
            [pair], root_certificates=ca.read(), require_client_auth=True
        )


def _bind(server: grpc.aio.Server, cfg: DaemonConfig) -> Path | None:
    if cfg.addr.startswith("tcp://"):
        server.add_secure_port(cfg.addr.removeprefix("tcp://"), _mutual_tls(cfg))
        return None
    path = Path(cfg.addr.removeprefix("unix://"))
    path.parent.mkdir(parents=True, exist_ok=True)
    gid = -1
    if cfg.group:
        try:
            gid = int(cfg.group) if cfg.group.isdigit() else grp.getgrnam(cfg.group).gr_gid
        except KeyError:
            raise ConfigError(f"no group {cfg.group!r}") from None
    if path.is_socket():
        path.unlink()  # left by a killed daemon: we hold the root's lock
    # created 0660 from the start: no window where others may connect
    old = os.umask(0o117)
    try:
        server.add_insecure_port(cfg.addr)
    finally:
        os.umask(old)
    os.chown(path, -1, gid)
    os.chmod(path, 0o660)
    return path


def _take_activated(cfg: DaemonConfig) -> tuple[Inherited, ...]:
    inherited = take_sockets(cfg.addr)
    tcp = [str(s.fd.fd) for s in inherited if s.tcp]
    if tcp and not (cfg.tlscacert and cfg.tlscert and cfg.tlskey):
        for s in inherited:
            s.sock.close()
        # the same rule as tcp://: a TCP listener without client certificates
        # would let anyone on the network run containers as root
        raise ConfigError(
            f"refusing to serve the TCP socket(s) passed as fd {', '.join(tcp)} without "
            "mutual TLS: give --tlscacert, --tlscert and --tlskey"
        )
    return inherited


def _bind_activated(
    server: grpc.aio.Server, cfg: DaemonConfig, inherited: tuple[Inherited, ...], where: Path
) -> Forwarder:
    """gRPC on private sockets in ``where`` (see api.activation for why), one
    plain for unix clients, one TLS for TCP clients."""
    plain = where / "grpc.sock" if any(not s.tcp for s in inherited) else None
    tls = where / "tls.sock" if any(s.tcp for s in inherited) else None
    if plain is not None:
        server.add_insecure_port(f"unix://{plain}")
    if tls is not None:
        server.add_secure_port(f"unix://{tls}", _mutual_tls(cfg))
    return Forwarder(inherited, plain, tls)


async def _drain() -> None:
    """Let cleanups that outlived their task (shielded unmounts, container
    deletes) finish before the worker closes and the loop cancels them."""
    me = asyncio.current_task()
    others = [t for t in asyncio.all_tasks() if t is not me]
    if others:
        _, pending = await asyncio.wait(others, timeout=30)
        if pending:
            _log.warning("tasks still running at exit", count=len(pending))


async def serve(cfg: DaemonConfig) -> int:
    # taken first: LISTEN_* leave the environment before anything is spawned
    inherited = _take_activated(cfg) if is_fd_addr(cfg.addr) else ()
    with _root_lock(cfg.root):
        worker = open_worker(
            WorkerConfig(
                root=cfg.root,
                runtime=cfg.runtime,
                snapshotter=cfg.snapshotter,  # type: ignore[arg-type]
                insecure_registries=cfg.insecure_registries,
                registry_ca=cfg.registry_ca,
                max_parallelism=cfg.max_parallelism,
                network_subnet=cfg.network_subnet,
                dns=cfg.dns,
                step_memory=cfg.step_memory,
                step_pids=cfg.step_pids,
                step_cpus=cfg.step_cpus,
                entitlements=cfg.entitlements,
                git_file_urls=False,
                history_max_entries=cfg.history_max_entries,
                history_max_age=cfg.history_max_age,
            )
        )
        sock: Path | None = None
        forwarder: Forwarder | None = None
        proxy_dir: Path | None = None
        # installed first: a SIGTERM during recovery or start-up still stops cleanly
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        try:
            await worker.recover()
            service = ControlService(worker, log_cap=cfg.log_cap, gc=cfg.gc)
            server = grpc.aio.server(options=list(SERVER_OPTIONS))
            add_to_server(service, server)
            if inherited:
                proxy_dir = private_dir(cfg.root)
                forwarder = _bind_activated(server, cfg, inherited, proxy_dir)
            else:
                sock = _bind(server, cfg)
            await server.start()
            if forwarder is not None:
                forwarder.start()
            timer = asyncio.create_task(service.gc_every(cfg.gc_interval))
            _log.info("serving", addr=cfg.addr, root=str(worker.root))
            print(f"ociworker: serving on {cfg.addr}", flush=True)
            notify_ready(f"serving on {cfg.addr}")
            await stop.wait()
            _log.info("stopping: cancelling builds")
            timer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await timer
            await service.cancel_all()
            await server.stop(grace=2)
            if forwarder is not None:
                await forwarder.aclose()
            await _drain()
        finally:
            if forwarder is not None:
                await forwarder.aclose()  # again: start-up may have failed before the stop
            for s in inherited:
                s.sock.close()
            await worker.aclose()
            if sock is not None:
                sock.unlink(missing_ok=True)
            if proxy_dir is not None:
                remove_private_dir(proxy_dir)
    return 0
