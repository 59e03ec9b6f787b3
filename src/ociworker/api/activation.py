"""Serving on sockets systemd passes (``serve --addr fd://``), and telling systemd we are ready.

grpcio's Python API cannot serve on a listening socket it did not create: a
server only binds addresses (``add_insecure_port``/``add_secure_port``), and
gRPC core's own socket-activation support (grpc/grpc#30485) is compiled only
with ``--define=use_systemd=true``, which the PyPI wheels are not (their
cygrpc links no libsystemd and has no sd_listen_fds). So gRPC listens on a
private unix socket in a 0700 directory of the state dir, and this module
accepts each connection on the inherited socket and forwards its bytes both
ways until either side closes. gRPC sees no TLS difference: a TCP socket's
clients speak TLS end to end with a secure private port (the bytes pass
through untouched), a unix socket's clients speak plain HTTP/2 to an
insecure one. The cost is one extra copy of every byte in this process.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import os
import shutil
import socket
import sys
import tempfile
from collections.abc import Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ociworker.core.activation import (
    LISTEN_FDS_START,
    ListenFd,
    activation_env,
    listen_fds,
    select_fds,
)
from ociworker.errors import ConfigError
from ociworker.log import get_logger

_log = get_logger(__name__)

#: bytes read at a time per direction (a build context streams through here)
_CHUNK = 256 * 1024
#: sun_path's size on Linux, NUL included
_SUN_PATH_MAX = 108


@dataclass(frozen=True)
class Inherited:
    """A listening stream socket systemd passed, and whether it is TCP (then TLS)."""

    fd: ListenFd
    sock: socket.socket
    tcp: bool


def take_sockets(addr: str) -> tuple[Inherited, ...]:
    """The listening sockets ``addr`` asks for, taken from this process's
    environment (which loses LISTEN_* as sd_listen_fds(unset_environment=1)
    does); the ones not asked for are closed, as dockerd does."""
    env = dict(os.environ)
    for key in activation_env():
        os.environ.pop(key, None)
    every = listen_fds(env, os.getpid())
    picked = select_fds(addr, every)
    for f in every:
        # sd_listen_fds sets FD_CLOEXEC: runc and the steps must not inherit them
        with contextlib.suppress(OSError):
            os.set_inheritable(f.fd, False)
    for f in every:
        if f not in picked:
            with contextlib.suppress(OSError):
                os.close(f.fd)
    return tuple(_inherited(f) for f in picked)


def _inherited(f: ListenFd) -> Inherited:
    try:
        sock = socket.socket(fileno=f.fd)
    except OSError as exc:
        raise ConfigError(f"fd {f.fd} ({f.name}) is not a socket: {exc.strerror}") from None
    if sock.type != socket.SOCK_STREAM or not sock.getsockopt(
        socket.SOL_SOCKET, socket.SO_ACCEPTCONN
    ):
        sock.detach()
        raise ConfigError(
            f"fd {f.fd} ({f.name}) is not a listening stream socket "
            "(ociworker.socket needs ListenStream=, not ListenDatagram= or Accept=yes)"
        )
    sock.setblocking(False)
    return Inherited(f, sock, tcp=sock.family in (socket.AF_INET, socket.AF_INET6))


def private_dir(root: Path) -> Path:
    """A fresh 0700 directory for the private gRPC sockets: in the state dir
    when its path fits a unix socket address, else in the temp dir."""
    for stale in root.glob("fdproxy-*"):
        # a killed daemon's (the caller holds the root's lock: none is in use)
        shutil.rmtree(stale, ignore_errors=True)
    base: Path | None = root
    if len(str(root / "fdproxy-XXXXXXXX" / "tls.sock").encode()) >= _SUN_PATH_MAX:
        base = None
    return Path(tempfile.mkdtemp(prefix="fdproxy-", dir=base))


@dataclass
class Forwarder:
    """Accepts on the inherited sockets and pipes each connection to ``target(tcp)``."""

    sockets: tuple[Inherited, ...]
    plain: Path | None
    tls: Path | None
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    def start(self) -> None:
        for s in self.sockets:
            self._spawn(self._accept(s))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _accept(self, s: Inherited) -> None:
        loop = asyncio.get_running_loop()
        target = self.tls if s.tcp else self.plain
        assert target is not None
        while True:
            try:
                conn, _ = await loop.sock_accept(s.sock)
            except OSError as exc:
                # e.g. EMFILE: the listener stays; the client sees its connection closed
                _log.warning("accept on an activated socket failed", fd=s.fd.fd, error=str(exc))
                await asyncio.sleep(0.1)
                continue
            self._spawn(self._pipe(conn, target))

    async def _pipe(self, conn: socket.socket, target: Path) -> None:
        try:
            c_reader, c_writer = await asyncio.open_connection(sock=conn, limit=_CHUNK)
        except OSError:
            conn.close()
            return
        try:
            s_reader, s_writer = await asyncio.open_unix_connection(str(target), limit=_CHUNK)
        except OSError as exc:
            _log.warning("cannot reach the gRPC server", error=str(exc))
            c_writer.close()
            return
        # One side done is the connection done, as gRPC itself takes a read EOF:
        # waiting for the other side could keep a stopped client's pipe forever.
        ways = [
            asyncio.create_task(_copy(c_reader, s_writer)),
            asyncio.create_task(_copy(s_reader, c_writer)),
        ]
        try:
            await asyncio.wait(ways, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in ways:
                t.cancel()
            await asyncio.gather(*ways, return_exceptions=True)
            # close() flushes what is buffered first
            for w in (c_writer, s_writer):
                w.close()
                with contextlib.suppress(OSError, asyncio.CancelledError):
                    await w.wait_closed()

    async def aclose(self) -> None:
        """Stop accepting and cut the connections still open (after gRPC stopped)."""
        for s in self.sockets:
            # our copy only: systemd keeps the socket and queues the next clients
            s.sock.close()
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _copy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError, OSError):
        # a side that went away ends the copy; the caller closes both
        while chunk := await reader.read(_CHUNK):
            writer.write(chunk)
            await writer.drain()


def remove_private_dir(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def notify_ready(status: str) -> None:
    """sd_notify(READY=1) when systemd asked for it (Type=notify sets
    $NOTIFY_SOCKET): ``systemctl start`` returns once builds can be served."""
    where = os.environ.pop("NOTIFY_SOCKET", "")
    if not where:
        return
    if where.startswith("@"):
        where = "\0" + where[1:]  # an abstract socket
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
        try:
            s.connect(where)
            s.sendall(f"READY=1\nSTATUS={status}".encode())
        except OSError as exc:
            _log.warning("cannot notify systemd", socket=where, error=str(exc))


# -- a socket activator for where there is no systemd (a container) ----------------------


def _listen(spec: str) -> socket.socket:
    """A listening socket for ``HOST:PORT`` (``[V6]:PORT``) or an absolute unix path."""
    if spec.startswith("/"):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        with contextlib.suppress(FileNotFoundError):
            if Path(spec).is_socket():
                os.unlink(spec)
        s.bind(spec)
    else:
        host, _, port = spec.rpartition(":")
        if not host or not port.isdigit():
            raise ConfigError(f"--listen {spec!r}: use HOST:PORT, [V6]:PORT or /PATH")
        host = host.strip("[]")
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        s = socket.socket(family, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((host, int(port)))
    s.listen(socket.SOMAXCONN)
    return s


def exec_activated(listen: list[str], fdname: str, cmd: list[str]) -> None:
    """Listen on each of ``listen``, then exec ``cmd`` with them as fds 3, 4, ...
    and LISTEN_FDS/LISTEN_PID/LISTEN_FDNAMES, as systemd-socket-activate does:
    for ``serve --addr fd://`` where no systemd runs (a rootless worker's pod,
    whose daemon cannot bind a TCP port itself: it serves from its own network
    namespace, while a socket made here stays in the pod's). Never returns."""
    socks = [_listen(spec) for spec in listen]
    # park them above the target range first: moving one onto 3 must not close another
    parked = [fcntl.fcntl(s.fileno(), fcntl.F_DUPFD_CLOEXEC, 64) for s in socks]
    for s in socks:
        s.close()
    for i, fd in enumerate(parked):
        os.dup2(fd, LISTEN_FDS_START + i, inheritable=True)
        os.close(fd)
    env = dict(os.environ)
    env["LISTEN_FDS"] = str(len(parked))
    env["LISTEN_PID"] = str(os.getpid())  # exec keeps the pid
    env["LISTEN_FDNAMES"] = ":".join([fdname] * len(parked))
    os.execvpe(cmd[0], cmd, env)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m ociworker.api.activation",
        description="Listen, then run COMMAND with the sockets passed as systemd does "
        "(for `ociworker serve --addr fd://` without systemd).",
    )
    p.add_argument("--listen", "-l", action="append", required=True, metavar="ADDR",
                   help="HOST:PORT, [V6]:PORT or /PATH (repeatable)")  # fmt: skip
    p.add_argument("--fdname", default="unknown", help="LISTEN_FDNAMES of every socket")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND [ARG...]")
    return p


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    cmd = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not cmd:
        p.error("no COMMAND given")
    try:
        exec_activated(args.listen, args.fdname, cmd)
    except (OSError, ConfigError) as exc:
        print(f"ociworker activation: {exc}", file=sys.stderr)
        return 1
    return 0  # not reached: exec


if __name__ == "__main__":
    sys.exit(main())
