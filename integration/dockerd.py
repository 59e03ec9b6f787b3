"""A private Docker Engine for tests: ``dockerd`` on its own socket and data root.

Import the fixture into a test module (``from dockerd import dockerd``); it is
session-scoped, so the ~1 s start is paid once. Everything the daemon writes is
under one tmp dir, except the cgroups of running containers, which live under a
cgroup parent named for this session and removed at the end. ``docker0``,
iptables and ip_forward are left alone (``--bridge=none``, ``--iptables=false``,
``--ip-forward=false``), so containers must run with ``--network=none``.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

DOCKERD = "/usr/sbin/dockerd"
# Debian's client, which matches the 20.10 engine (/usr/local/bin may hold another).
DOCKER = "/usr/bin/docker"
# `docker run --runtime bounded`: runc with a container's capabilities cut to this machine's
# bounding set, so `--privileged` starts where the machine is itself a container lacking some
# (see that script); plain runc elsewhere.
BOUNDED_RUNTIME = "bounded"
_RUNC_BOUNDED = Path(__file__).resolve().parent / "container" / "runc-bounded"
_START_TIMEOUT_S = 30.0
_STOP_TIMEOUT_S = 20.0


@dataclass(frozen=True)
class Dockerd:
    socket: Path
    client_config: Path  # DOCKER_CONFIG, so the client never touches ~/.docker
    storage_driver: str

    def docker(
        self, *args: str, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        """Run the docker client against this daemon; output captured as text."""
        proc = subprocess.run(
            [DOCKER, "-H", f"unix://{self.socket}", *args],
            env={**os.environ, "DOCKER_CONFIG": str(self.client_config)},
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"docker {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
            )
        return proc


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: Path) -> None:
        super().__init__("localhost", timeout=2)
        self._path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(2)
        self.sock.connect(str(self._path))


def _ping(sock: Path) -> bool:
    conn = _UnixHTTPConnection(sock)
    try:
        conn.request("GET", "/_ping")
        return conn.getresponse().status == 200
    except OSError:
        return False
    finally:
        conn.close()


def _start(root: Path, driver: str, cgroup_parent: str) -> tuple[subprocess.Popen[bytes], Path]:
    root.mkdir(parents=True)
    config = root / "daemon.json"
    config.write_text("{}\n")  # never pick up the host's /etc/docker/daemon.json
    sock = root / "d.sock"
    log = root / "dockerd.log"
    with open(log, "wb") as log_f:
        proc = subprocess.Popen(
            [
                DOCKERD,
                "--config-file",
                str(config),
                "--data-root",
                str(root / "data"),
                "--exec-root",
                str(root / "exec"),
                "--pidfile",
                str(root / "d.pid"),
                "-H",
                f"unix://{sock}",
                "--storage-driver",
                driver,
                "--iptables=false",
                "--ip-forward=false",
                "--ip-masq=false",
                "--bridge=none",
                "--cgroup-parent",
                cgroup_parent,
                "--add-runtime",
                f"{BOUNDED_RUNTIME}={_RUNC_BOUNDED}",
            ],
            stdin=subprocess.DEVNULL,
            stdout=log_f,
            stderr=subprocess.STDOUT,
            # Own process group: at teardown the managed containerd and its shims
            # can be killed with it, and nothing else.
            start_new_session=True,
        )
    deadline = time.monotonic() + _START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        if sock.exists() and _ping(sock):
            return proc, log
        time.sleep(0.05)
    _stop(proc, root)
    raise RuntimeError(f"dockerd ({driver}) did not start:\n{log.read_text()[-3000:]}")


def _stop(proc: subprocess.Popen[bytes], root: Path) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            # dockerd is hung but not reaped, so its pid (our group id) cannot
            # have been reused: the group is exactly dockerd, containerd, shims.
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    _unmount_below(root)


def _unmount_below(root: Path) -> None:
    prefix = str(root.resolve()) + "/"
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f]
    # deepest first, so stacked mounts come off in order
    for point in sorted((p for p in points if p.startswith(prefix)), reverse=True):
        subprocess.run(["umount", "-l", point], check=False, capture_output=True)


def _remove_cgroup(name: str) -> None:
    base = Path("/sys/fs/cgroup")
    candidates = [base / name] + [d / name for d in base.iterdir() if d.is_dir()]
    for path in candidates:
        if path.is_dir():
            # Containers' own cgroups go when they are removed; a busy one left
            # by a crashed test stays (rmdir fails) rather than failing teardown.
            for child in path.iterdir():
                if child.is_dir():
                    with contextlib.suppress(OSError):
                        child.rmdir()
            with contextlib.suppress(OSError):
                path.rmdir()


@pytest.fixture(scope="session")
def dockerd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dockerd]:
    if os.geteuid() != 0 or not Path(DOCKERD).exists() or not Path(DOCKER).exists():
        # like the rest of the suite: a half-prepared host fails, never passes empty
        pytest.fail("needs root, /usr/sbin/dockerd and /usr/bin/docker (Debian docker.io)")
    # unix socket paths are limited to 108 bytes; keep the base short
    base = tmp_path_factory.mktemp("dockerd")
    cgroup_parent = f"ociworker-test-{os.getpid()}"
    try:
        root = base / "overlay2"
        proc, _ = _start(root, "overlay2", cgroup_parent)
        driver = "overlay2"
    except RuntimeError:
        root = base / "vfs"
        proc, _ = _start(root, "vfs", cgroup_parent)
        driver = "vfs"
    client = root / "client"
    client.mkdir()
    try:
        yield Dockerd(socket=root / "d.sock", client_config=client, storage_driver=driver)
    finally:
        _stop(proc, root)
        _remove_cgroup(cgroup_parent)
        # overlay2 leaves root-owned read-only dirs; clear them now rather than
        # leave pytest's tmp rotation to trip over them later.
        shutil.rmtree(root / "data", ignore_errors=True)
