"""``ociworker serve --addr fd://`` under systemd's own socket activator
(``systemd-socket-activate``, the systemd package's tool that does what a
.socket unit does): the first client's connection starts the daemon, and
builds run over the socket it inherited. Real runc, overlayfs, the registry."""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import CLI
from ociworker.api.client import Client, DaemonInfo
from ociworker.version import __version__
from test_build import write_context

ACTIVATE = shutil.which("systemd-socket-activate")

pytestmark = pytest.mark.skipif(ACTIVATE is None, reason="systemd-socket-activate not installed")


def _activator(sock: str, *serve_args: str, fdname: str = "") -> list[str]:
    assert ACTIVATE is not None
    env = [f"--setenv={k}" for k in ("PYTHONPATH", "NOTIFY_SOCKET") if k in os.environ]
    names = [f"--fdname={fdname}"] if fdname else []
    return [ACTIVATE, "--listen", sock, *names, *env, sys.executable, "-m", "ociworker", "serve",
            *serve_args]  # fmt: skip


class Activated:
    """systemd-socket-activate listening on ``sock``: it execs the daemon in its
    own process (same pid) when the first client connects."""

    def __init__(self, tmp: Path, sock: Path, *serve_args: str, fdname: str = "") -> None:
        self.sock = sock
        self.log = tmp / "activate.log"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                _activator(str(sock), *serve_args, fdname=fdname),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + 30
        while b"Listening on" not in self.log.read_bytes():
            assert self.proc.poll() is None, self.log.read_text()
            assert time.monotonic() < deadline, self.log.read_text()
            time.sleep(0.05)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=60)


def ow(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ociworker", *args], capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture
def activated(tmp_path: Path, require_root: None, registry: str) -> Iterator[Activated]:
    a = Activated(
        tmp_path,
        tmp_path / "a.sock",
        "--addr",
        "fd://ociworker",
        "--root",
        str(tmp_path / "root"),
        fdname="ociworker",
    )
    yield a
    assert a.stop() == 0, a.log.read_text()[-3000:]


def test_build_over_an_activated_socket(
    activated: Activated, tmp_path: Path, base_image: str
) -> None:
    # The context's bytes and the step's output both pass the forwarder: a
    # large file checks they arrive whole (its digest is computed here).
    big = os.urandom(24 << 20)
    ctx = write_context(
        tmp_path,
        f"FROM {base_image}\nCOPY big.bin /big.bin\nRUN echo activated > /ran.txt\n",
        {"big.bin": big},
    )
    assert b"Communication attempt" not in activated.log.read_bytes()  # not started yet
    out = tmp_path / "out"
    proc = ow("build", "--addr", f"unix://{activated.sock}", "-o", f"type=local,dest={out}",
              str(ctx))  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:] + activated.log.read_text()[-3000:]
    assert (out / "ran.txt").read_text() == "activated\n"
    got = hashlib.sha256((out / "big.bin").read_bytes()).hexdigest()
    assert got == hashlib.sha256(big).hexdigest()
    log = activated.log.read_text()
    # the daemon was started by that connection, in the activator's own process
    assert "Communication attempt" in log and "serving on fd://ociworker" in log, log
    # a second client reaches the same daemon (no restart: one exec, one "serving")
    du = ow("du", "--addr", f"unix://{activated.sock}")
    assert du.returncode == 0, du.stderr
    assert activated.log.read_text().count("serving on") == 1
    # and the daemon's Info names this version (the one source, ociworker.version)
    assert asyncio.run(_info(f"unix://{activated.sock}")).version == __version__


async def _info(addr: str) -> DaemonInfo:
    async with Client(addr) as client:
        return await client.info()


def test_dead_client_behind_the_forwarder_has_its_build_cancelled(
    activated: Activated, tmp_path: Path, base_image: str
) -> None:
    # As over a plain unix socket (test_daemon): a stopped client answers no
    # keepalive ping; the forwarder between must not keep its build alive.
    from test_daemon import stopped_client_build_is_cancelled

    stopped_client_build_is_cancelled(
        f"unix://{activated.sock}", tmp_path / "root", tmp_path, base_image
    )


def test_daemon_drops_listen_env_and_fds_not_asked_for(
    activated: Activated, tmp_path: Path
) -> None:
    info = ow("du", "--addr", f"unix://{activated.sock}")  # starts the daemon
    assert info.returncode == 0, info.stderr
    pid = activated.proc.pid
    fds = {int(n): os.readlink(f"/proc/{pid}/fd/{n}") for n in os.listdir(f"/proc/{pid}/fd")}
    # fd 3 is the activated socket, kept open and close-on-exec (sd_listen_fds)
    assert fds[3].startswith("socket:")
    flags = [ln for ln in Path(f"/proc/{pid}/fdinfo/3").read_text().splitlines()
             if ln.startswith("flags:")]  # fmt: skip
    assert int(flags[0].split()[1], 8) & os.O_CLOEXEC
    # the private gRPC socket sits in a 0700 dir of the state dir
    proxies = list((tmp_path / "root").glob("fdproxy-*"))
    assert len(proxies) == 1 and (proxies[0].stat().st_mode & 0o777) == 0o700
    assert (proxies[0] / "grpc.sock").is_socket()
    assert activated.stop() == 0
    assert not list((tmp_path / "root").glob("fdproxy-*")), "the private dir outlived the daemon"


def test_a_killed_daemons_private_dir_is_removed_by_the_next(
    tmp_path: Path, require_root: None, registry: str
) -> None:
    serve = ("--addr", "fd://", "--root", str(tmp_path / "root"))
    first = Activated(tmp_path, tmp_path / "k.sock", *serve)
    assert ow("du", "--addr", f"unix://{first.sock}").returncode == 0
    left = list((tmp_path / "root").glob("fdproxy-*"))
    first.proc.kill()
    first.proc.wait()
    assert len(left) == 1 and left[0].exists()  # SIGKILL: nothing cleaned up
    second = Activated(tmp_path, tmp_path / "k2.sock", *serve)
    try:
        assert ow("du", "--addr", f"unix://{second.sock}").returncode == 0
        now = list((tmp_path / "root").glob("fdproxy-*"))
        assert len(now) == 1 and now != left
    finally:
        assert second.stop() == 0


def test_fd_addr_without_activation_is_a_clear_error(tmp_path: Path, require_root: None) -> None:
    proc = ow("serve", "--addr", "fd://", "--root", str(tmp_path / "root"), timeout=60)
    assert proc.returncode != 0
    assert "no sockets passed by socket activation" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_fd_name_not_passed_is_a_clear_error(tmp_path: Path, require_root: None) -> None:
    a = Activated(tmp_path, tmp_path / "n.sock", "--addr", "fd://other", "--root",
                  str(tmp_path / "root"), fdname="ociworker")  # fmt: skip
    try:
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(a.sock))  # starts it
        assert a.proc.wait(timeout=60) != 0
    finally:
        a.stop()
    log = a.log.read_text()
    assert "no socket named 'other' was passed by socket activation (names: ociworker)" in log
    assert "Traceback" not in log


def test_activated_tcp_socket_needs_mutual_tls(tmp_path: Path, require_root: None) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    a = Activated(tmp_path, Path(f"127.0.0.1:{port}"), "--addr", "fd://", "--root",
                  str(tmp_path / "root"))  # fmt: skip
    try:
        with socket.create_connection(("127.0.0.1", port)):
            pass
        assert a.proc.wait(timeout=60) != 0
    finally:
        a.stop()
    log = a.log.read_text()
    assert "refusing to serve the TCP socket(s) passed as fd 3 without mutual TLS" in log, log
    assert "Traceback" not in log


def test_the_system_units_exec_start_serves_and_notifies_systemd(
    tmp_path: Path, require_root: None, registry: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # deploy/systemd/ociworker.service's own command line (its --root moved to
    # tmp: a later flag wins), activated as the socket unit would, with a
    # NOTIFY_SOCKET of ours standing in for systemd's (Type=notify).
    unit = Path(__file__).resolve().parents[1] / "deploy/systemd/ociworker.service"
    line = next(ln for ln in unit.read_text().splitlines() if ln.startswith("ExecStart="))
    serve_args = shlex.split(line.removeprefix("ExecStart="))[2:]  # after "ociworker serve"
    notify = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind(str(notify))
        listener.settimeout(120)
        monkeypatch.setenv("NOTIFY_SOCKET", str(notify))  # passed on by _activator
        a = Activated(tmp_path, tmp_path / "u.sock", *serve_args, "--root",
                      str(tmp_path / "root"))  # fmt: skip
        try:
            du = ow("du", "--addr", f"unix://{a.sock}")
            assert du.returncode == 0, du.stderr + a.log.read_text()
            message = listener.recv(4096).decode()
        finally:
            assert a.stop() == 0, a.log.read_text()[-3000:]
    assert "READY=1" in message.splitlines(), message


def test_rootless_daemon_serves_an_activated_socket(as_user: CLI, registry: str) -> None:
    # deploy/systemd/user/: a user manager starts `ociworker serve --addr fd://`
    # as the user; the worker runs in its own user, pid and network namespaces
    # and still serves the socket systemd made outside them.
    assert ACTIVATE is not None
    sock = as_user.home / "run" / "ociworker" / "ociworker.sock"
    sock.parent.mkdir(mode=0o700)
    as_user.give(sock.parent)
    pairs = [f"{k}={v}" for k, v in sorted(as_user.env.items())]
    keep = [f"--setenv={k}" for k in sorted(as_user.env)]
    log = as_user.home / "activate.log"
    serve = [as_user.python, "-m", "ociworker", "serve", "--addr", "fd://"]
    runuser = ["runuser", "-u", str(as_user.user), "--", "env", "-i", *pairs]
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [*runuser, ACTIVATE, "--listen", str(sock), *keep, *serve],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    try:
        deadline = time.monotonic() + 30
        while not sock.is_socket():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        ctx = write_context(as_user.home, "FROM scratch\nCOPY a.txt /a.txt\n", {"a.txt": "hi\n"})
        out_dir = as_user.home / "out"
        built = as_user.run("build", "--addr", f"unix://{sock}", "-o",
                            f"type=local,dest={out_dir}", str(ctx), check=False)  # fmt: skip
        assert built.returncode == 0, built.stderr + log.read_text()
        assert (out_dir / "a.txt").read_text() == "hi\n"
        assert "serving on fd://" in log.read_text()
    finally:
        as_user.interrupt(proc, signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, log.read_text()[-3000:]


def test_rootless_daemon_serves_tcp_through_the_container_activator(
    as_user: CLI, registry: str
) -> None:
    # deploy/kubernetes' rootless variant: no systemd in the pod, so
    # `python -m ociworker.api.activation` listens on the pod's TCP port and execs
    # the rootless daemon, whose own network namespace could not bind it. Mutual
    # TLS end to end: the bytes pass the forwarder untouched.
    from test_daemon import _cert

    certs = as_user.home / "certs"
    certs.mkdir()
    ca = _cert(certs, "ca", None, ca=True)
    _cert(certs, "server", ca)
    _cert(certs, "client", ca)
    _cert(certs, "rogue", _cert(certs, "otherca", None, ca=True))
    as_user.give(certs)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    tls = [f"--tls{k}={certs / f}" for k, f in
           (("cacert", "ca.crt"), ("cert", "server.crt"), ("key", "server.key"))]  # fmt: skip
    launcher = [as_user.python, "-m", "ociworker.api.activation", "--listen", f"127.0.0.1:{port}"]
    serve = [as_user.python, "-m", "ociworker", "serve", "--addr", "fd://", *tls]
    pairs = [f"{k}={v}" for k, v in sorted(as_user.env.items())]
    runuser = ["runuser", "-u", str(as_user.user), "--", "env", "-i", *pairs]
    log = as_user.home / "activate.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [*runuser, *launcher, "--", *serve],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )

    def du(who: str) -> subprocess.CompletedProcess[str]:
        flags = [f"--tls{k}={certs / f}" for k, f in
                 (("cacert", "ca.crt"), ("cert", f"{who}.crt"), ("key", f"{who}.key"))]  # fmt: skip
        return ow("du", "--addr", f"tcp://127.0.0.1:{port}", *flags, timeout=120)

    try:
        deadline = time.monotonic() + 60
        while "serving on" not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        ok = du("client")
        assert ok.returncode == 0, ok.stderr + log.read_text()
        assert "Total:" in ok.stdout
        refused = du("rogue")  # a certificate the daemon's CA did not sign
        assert refused.returncode != 0 and "Total:" not in refused.stdout
    finally:
        as_user.interrupt(proc, signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, log.read_text()[-3000:]


def test_the_kubernetes_workers_command_serves_tcp_and_the_probes_socket(
    tmp_path: Path, require_root: None, registry: str
) -> None:
    # deploy/kubernetes/privileged.yaml's container command and config, run
    # here with the pod's paths moved to tmp: the activator's two sockets, one
    # daemon; a client over TCP with mutual TLS, the probe over the unix socket.
    import yaml

    from test_daemon import _cert

    manifest = Path(__file__).resolve().parents[1] / "deploy/kubernetes/privileged.yaml"
    objects = list(yaml.safe_load_all(manifest.read_text()))
    sts = next(o for o in objects if o["kind"] == "StatefulSet")
    toml = next(o for o in objects if o["kind"] == "ConfigMap")["data"]["ociworkerd.toml"]
    container = sts["spec"]["template"]["spec"]["containers"][0]
    certs = tmp_path / "certs"
    certs.mkdir()
    ca = _cert(certs, "ca", None, ca=True)
    _cert(certs, "server", ca)
    _cert(certs, "client", ca)
    for src, dst in (("ca.crt", "ca.pem"), ("server.crt", "cert.pem"), ("server.key", "key.pem")):
        (certs / dst).write_bytes((certs / src).read_bytes())
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    moved = {
        "/opt/ociworker/bin/python3": sys.executable,
        "0.0.0.0:1234": f"127.0.0.1:{port}",
        "/run/ociworker/ociworker.sock": str(tmp_path / "probe.sock"),
        "/etc/ociworker/ociworkerd.toml": str(tmp_path / "ociworkerd.toml"),
    }
    config = toml.replace("/etc/ociworker/certs", str(certs)).replace(
        '"/var/lib/ociworker"', f'"{tmp_path / "root"}"'
    )
    (tmp_path / "ociworkerd.toml").write_text(config)
    cmd = [moved.get(a, a) for a in container["command"]]
    # the console script "ociworker" of the image: this interpreter's module
    i = cmd.index("ociworker")
    cmd[i : i + 1] = [sys.executable, "-m", "ociworker"]
    log = tmp_path / "worker.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while "serving on" not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        tls = [f"--tlscacert={certs / 'ca.crt'}", f"--tlscert={certs / 'client.crt'}",
               f"--tlskey={certs / 'client.key'}"]  # fmt: skip
        over_tcp = ow("du", "--addr", f"tcp://127.0.0.1:{port}", *tls)
        assert over_tcp.returncode == 0, over_tcp.stderr + log.read_text()
        over_unix = ow("du", "--addr", f"unix://{tmp_path / 'probe.sock'}")
        assert over_unix.returncode == 0, over_unix.stderr
        assert over_unix.stdout == over_tcp.stdout  # one daemon behind both
        # the probes themselves, once this checkout's CLI has their command
        for kind in ("readinessProbe", "livenessProbe"):
            probe = [moved.get(a.removeprefix("unix://"), a) for a in
                     container[kind]["exec"]["command"]]  # fmt: skip
            probe = [f"unix://{a}" if a == str(tmp_path / "probe.sock") else a for a in probe]
            if _cli_has(probe[1]):
                answered = ow(*probe[1:])
                assert answered.returncode == 0, answered.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, log.read_text()[-3000:]


def _protected_paths(unit: str) -> list[str]:
    """The paths the unit's ProtectSystem=/ProtectHome= make read-only (systemd.exec(5))."""
    wanted = ("ProtectSystem=", "ProtectHome=")
    keys = dict(ln.split("=", 1) for ln in unit.splitlines() if ln.startswith(wanted))
    paths = {
        "full": ["/usr", "/boot", "/efi", "/etc"],
        "yes": ["/usr", "/boot", "/efi"],
    }[keys["ProtectSystem"]]
    assert keys["ProtectHome"] == "read-only"
    return [*paths, "/home", "/root", "/run/user"]


def test_a_build_runs_under_the_units_read_only_paths(
    tmp_path: Path, require_root: None, base_image: str
) -> None:
    # No systemd runs here to apply the unit's hardening, so its read-only
    # paths are made the way systemd makes them (a private mount namespace,
    # read-only bind mounts) around the unit's daemon; the build must not notice.
    assert ACTIVATE is not None
    unit = (Path(__file__).resolve().parents[1] / "deploy/systemd/ociworker.service").read_text()
    ro = " ".join(p for p in _protected_paths(unit) if Path(p).is_dir())
    sock = tmp_path / "h.sock"
    script = tmp_path / "hardened.sh"
    env = " ".join(f"--setenv={k}" for k in ("PYTHONPATH",) if k in os.environ)
    script.write_text(
        "set -e\n"
        "mount --make-rslave /\n"
        f"for p in {ro}; do mount --bind $p $p; mount -o remount,bind,ro $p; done\n"
        # the emulation holds: the daemon could not write /etc
        "if touch /etc/.ociworker-hardening-probe 2>/dev/null; then exit 99; fi\n"
        f"exec {ACTIVATE} --listen {sock} {env} {sys.executable} -m ociworker serve "
        f"--addr fd:// --root {tmp_path / 'root'}\n"
    )
    log = tmp_path / "hardened.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(["unshare", "--mount", "bash", str(script)], stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while b"Listening on" not in log.read_bytes():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        ctx = write_context(
            tmp_path,
            f"FROM {base_image}\nCOPY a.txt /a.txt\nRUN cat /a.txt > /b.txt && id -u >> /b.txt\n",
            {"a.txt": "hardened\n"},
        )
        out_dir = tmp_path / "out"
        built = ow("build", "--addr", f"unix://{sock}", "-o", f"type=local,dest={out_dir}",
                   str(ctx))  # fmt: skip
        assert built.returncode == 0, built.stderr[-3000:] + log.read_text()[-3000:]
        assert (out_dir / "b.txt").read_text() == "hardened\n0\n"
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, log.read_text()[-3000:]
    assert not Path("/etc/.ociworker-hardening-probe").exists()


def _cli_has(command: str) -> bool:
    from ociworker.cli import make_parser

    parser = make_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return command in sub.choices
