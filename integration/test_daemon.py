"""The daemon end to end: ``ociworker serve`` on a unix socket in tmp with its own
root, driven through the CLI (``build --addr``) and through ``ociworker.Client``;
real runc, overlayfs and the local registry."""

from __future__ import annotations

import asyncio
import datetime
import importlib.metadata
import ipaddress
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tarfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import ociworker
from conftest import assert_lists_steps, buildkit_steps, oci_archive_image
from ociworker.core.build import BuildResult
from ociworker.core.progress import Event, VertexStatus
from ociworker.errors import BuildCancelled, ExecError
from ociworker.testing.daemon import spawn_daemon
from test_build import ow, runtime_containers, write_context, write_runtime_spy


@dataclass
class Daemon:
    root: Path
    sock: Path
    proc: subprocess.Popen[bytes]
    runtime: str

    @property
    def addr(self) -> str:
        return f"unix://{self.sock}"


def start_daemon(root: Path, sock: Path, runtime: str = "runc") -> Daemon:
    log_path = root.parent / f"daemon-{uuid.uuid4().hex[:6]}.log"
    args = ("--addr", f"unix://{sock}", "--root", str(root), "--runtime", runtime)
    return Daemon(root, sock, spawn_daemon(args, log_path), runtime)


def stop_daemon(d: Daemon) -> int:
    if d.proc.poll() is None:
        d.proc.send_signal(signal.SIGTERM)
    return d.proc.wait(timeout=60)


@pytest.fixture(autouse=True)
def _detach_leaks(tmp_path: Path, mounts_under: Callable[[Path], list[Path]]) -> Iterator[None]:
    # A failing test must not pin the host's tmp dir for the rest of the suite
    # (its own assertions are what report the leak).
    yield
    for point in mounts_under(tmp_path):
        subprocess.run(["umount", "--lazy", str(point)], check=False, capture_output=True)


@pytest.fixture
def daemon(tmp_path: Path, require_root: None, registry: str) -> Iterator[Daemon]:
    root = tmp_path / "droot"
    d = start_daemon(root, tmp_path / "d.sock")
    yield d
    assert stop_daemon(d) == 0


def cli(
    d: Daemon, *args: str, check: bool = True, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "ociworker", args[0], "--addr", d.addr, *args[1:]]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def test_cli_build_over_daemon_writes_client_side_outputs(
    daemon: Daemon, tmp_path: Path, base_image: str, mounts_under: Callable[[Path], list[Path]]
) -> None:
    ctx = write_context(
        tmp_path,
        f"FROM {base_image}\nCOPY a.txt /a.txt\nRUN echo built > /b.txt\n",
        {"a.txt": "from the client\n", ".dockerignore": "*.log\n", "x.log": "ignored\n"},
    )
    out = tmp_path / "out"
    out.mkdir()  # buildx creates no parent of a file output, --iidfile, --metadata-file
    proc = cli(
        daemon,
        "build",
        "--progress",
        "plain",
        "-o",
        f"type=oci,dest={out / 'img.tar'}",
        "-o",
        f"type=local,dest={out / 'fs'}",
        "-o",
        f"type=tar,dest={out / 'fs.tar'}",
        "--metadata-file",
        str(out / "meta.json"),
        "--iidfile",
        str(out / "iid"),
        "-t",
        "daemon/test:1",
        str(ctx),
    )
    assert re.search(r"^#\d+ transferring context: [\d.]+k?B", proc.stderr, re.M), proc.stderr
    assert (out / "fs" / "a.txt").read_text() == "from the client\n"
    assert (out / "fs" / "b.txt").read_text() == "built\n"
    with tarfile.open(out / "fs.tar") as tf:
        assert "b.txt" in tf.getnames()
    with tarfile.open(out / "img.tar") as tf:
        assert "index.json" in tf.getnames()
    meta = json.loads((out / "meta.json").read_text())
    assert isinstance(meta["ociworker.context.bytes_sent"], int)
    assert meta["ociworker.context.bytes_sent"] > 0
    # the image ID is the config digest of the image the archive holds
    image = oci_archive_image(out / "img.tar")
    assert (out / "iid").read_text() == image.config_digest
    assert meta["containerimage.config.digest"] == image.config_digest
    assert meta["containerimage.digest"] == image.manifest_digest
    # the output paths are the client's: nothing of them under the daemon's root
    assert not any(p.name == "img.tar" for p in daemon.root.rglob("img.tar"))
    assert mounts_under(daemon.root) == []
    du = cli(daemon, "du")
    assert "Total:" in du.stdout


def test_cached_rebuild_over_daemon_lists_every_step_cached(
    daemon: Daemon, tmp_path: Path, base_image: str
) -> None:
    dockerfile = (
        f"FROM {base_image} AS base\nRUN echo base > /base\n"
        f"FROM {base_image}\nCOPY a.txt /a.txt\nCOPY --from=base /base /b\nRUN cat /a.txt /b\n"
    )
    ctx = write_context(tmp_path, dockerfile, {"a.txt": "a\n"})
    cli(daemon, "build", "--progress", "plain", str(ctx))
    again = cli(daemon, "build", "--progress", "plain", str(ctx))
    # the same events reach a daemon's client: every step BuildKit lists, once, CACHED
    assert_lists_steps(again.stderr, buildkit_steps(dockerfile), {})


def test_failing_run_same_error_as_embedded_and_client_raises_exec_error(
    daemon: Daemon, tmp_path: Path, base_image: str
) -> None:
    ctx = write_context(tmp_path, f"FROM {base_image}\nRUN exit 3\n")
    remote = cli(daemon, "build", "--progress", "plain", str(ctx), check=False)
    local = ow(tmp_path / "embedded", "build", "--progress", "plain", str(ctx), check=False)
    assert remote.returncode == local.returncode == 1
    last = [ln for ln in remote.stderr.splitlines() if ln.startswith("ERROR:")]
    assert last and last == [ln for ln in local.stderr.splitlines() if ln.startswith("ERROR:")]
    assert "exit code: 3" in last[0]

    async def via_client() -> ExecError:
        async with ociworker.Client(daemon.addr) as c:
            with pytest.raises(ExecError) as info:
                await c.build(ctx)
            return info.value

    err = asyncio.run(via_client())
    assert err.exit_code == 3 and "RUN exit 3" in err.step


def test_client_api_build_streams_events_and_result(
    daemon: Daemon, tmp_path: Path, base_image: str
) -> None:
    ctx = write_context(tmp_path, f"FROM {base_image}\nRUN echo hello-from-run\n")
    events: list[Event] = []

    async def go() -> BuildResult:
        async with ociworker.Client(daemon.addr) as c:
            info = await c.info()
            assert info.root == str(daemon.root.absolute())
            assert not info.rootless  # root's daemon
            # the daemon's release, as `ociworker --version` prints it for the package
            assert info.version == importlib.metadata.version("ociworker")
            workers = await c.list_workers()
            assert len(workers) == 1 and workers[0]["platforms"]
            return await c.build(ctx, events=events.append, want_image=True)

    result = asyncio.run(go())
    assert result.manifest is not None
    assert result.metadata["containerimage.digest"] == result.manifest.digest
    logs = b"".join(getattr(e, "data", b"") for e in events)
    assert b"hello-from-run" in logs
    assert any(isinstance(e, VertexStatus) and e.name.startswith("[2/2] RUN") for e in events)


def test_eight_concurrent_cli_builds_run_a_common_step_once(
    tmp_path: Path, base_image: str, require_root: None, mounts_under: Callable[[Path], list[Path]]
) -> None:
    spy, calls = write_runtime_spy(tmp_path, "runc")
    d = start_daemon(tmp_path / "droot", tmp_path / "d.sock", runtime=str(spy))
    try:
        common = "RUN sleep 2 && echo common > /common\n"
        procs = []
        for i in range(8):
            ctx = write_context(
                tmp_path,
                f"FROM {base_image}\n{common}COPY own.txt /\n",
                {"own.txt": f"client {i}\n"},
                name=f"ctx{i}",
            )
            out = tmp_path / f"out{i}"
            procs.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "ociworker",
                        "build",
                        "--addr",
                        d.addr,
                        "--progress",
                        "plain",
                        "-o",
                        f"type=local,dest={out}",
                        str(ctx),
                    ],
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                )
            )
        for i, p in enumerate(procs):
            _, err = p.communicate(timeout=300)
            assert p.returncode == 0, err[-3000:]
            assert (tmp_path / f"out{i}" / "own.txt").read_text() == f"client {i}\n"
            assert (tmp_path / f"out{i}" / "common").read_text() == "common\n"
        started = calls.read_text().splitlines()
        assert len(started) == 1, started  # the one RUN, shared by all 8 builds
    finally:
        assert stop_daemon(d) == 0
    assert mounts_under(d.root) == []


def test_concurrent_builds_of_one_context_do_not_wait_for_each_other(
    daemon: Daemon, tmp_path: Path, base_image: str
) -> None:
    # Each build's RUN leaves a mark and waits for the other's; both sync the same
    # context (same key). Were one sync queued behind the other build, which holds
    # its context until it ends, neither would meet the other and both would fail.
    ctx = write_context(
        tmp_path,
        f"FROM {base_image}\nARG ROLE\nARG OTHER\nCOPY f.txt /\n"
        "RUN --mount=type=cache,id=rendezvous,target=/r touch /r/$ROLE && i=0 && "
        "while [ ! -e /r/$OTHER ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done && "
        "test -e /r/$OTHER\n",
        {"f.txt": "shared\n"},
    )
    procs = {
        role: subprocess.Popen(
            [
                *(sys.executable, "-m", "ociworker", "build", "--addr", daemon.addr),
                *("--build-arg", f"ROLE={role}", "--build-arg", f"OTHER={other}"),
                *("--progress", "plain", str(ctx)),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for role, other in (("a", "b"), ("b", "a"))
    }
    for role, p in procs.items():
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, f"build {role}: {err[-3000:]}"


def _procs_with(marker: str) -> list[int]:
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if marker.encode() in cmd:
            found.append(int(pid))
    return found


def test_cancel_mid_run_releases_everything_and_other_builds_go_on(
    daemon: Daemon, tmp_path: Path, base_image: str, mounts_under: Callable[[Path], list[Path]]
) -> None:
    marker = f"cancel-{uuid.uuid4().hex}"
    slow = write_context(tmp_path, f"FROM {base_image}\nRUN sleep 60; echo {marker}\n", name="slow")
    other = write_context(
        tmp_path, f"FROM {base_image}\nRUN sleep 1 && echo other > /o\n", name="other"
    )
    build_id = uuid.uuid4().hex

    async def go() -> None:
        async with ociworker.Client(daemon.addr) as c:
            running = asyncio.Event()

            def seen(ev: Event) -> None:
                if isinstance(ev, VertexStatus) and "RUN sleep 60" in ev.name:
                    running.set()

            slow_task = asyncio.create_task(c.build(slow, events=seen, build_id=build_id))
            other_task = asyncio.create_task(c.build(other, want_image=True))
            await running.wait()
            while not _procs_with(marker):  # the container's process is up
                await asyncio.sleep(0.05)
            slow_task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await slow_task
            # the server says when the cancelled build has ended (after cleanup)
            with pytest.raises(BuildCancelled):
                async for _ in c.status(build_id):
                    pass
            assert _procs_with(marker) == []
            # the other build is still going (and may hold a container and
            # mounts of its own): it must succeed, and then nothing is left
            result = await other_task
            assert result.manifest is not None
            assert runtime_containers(daemon.root, "runc") == ""
            assert mounts_under(daemon.root) == []

    asyncio.run(go())


def _file_tree(ctx: Path, files: int, size: int) -> None:
    for i in range(files):
        d = ctx / f"d{i % 30:02d}"
        d.mkdir(exist_ok=True)
        (d / f"f{i:04d}.bin").write_bytes(os.urandom(size))


def test_incremental_context_resends_only_the_changed_file(
    daemon: Daemon, tmp_path: Path, base_image: str
) -> None:
    ctx = write_context(tmp_path, f"FROM {base_image}\nCOPY d00/f0000.bin /one\n")
    _file_tree(ctx, 3000, 42 * 1024)  # ~123 MiB
    total = sum(p.stat().st_size for p in ctx.rglob("*") if p.is_file())
    meta = tmp_path / "meta.json"

    def build() -> tuple[int, int]:
        proc = cli(daemon, "build", "--progress", "plain", "--metadata-file", str(meta), str(ctx))
        m = re.search(r"transferring context: ([\d.]+)(B|kB|MB|GB)", proc.stderr)
        assert m, proc.stderr
        scale = {"B": 1, "kB": 1e3, "MB": 1e6, "GB": 1e9}[m.group(2)]
        return json.loads(meta.read_text())["ociworker.context.bytes_sent"], int(
            float(m.group(1)) * scale
        )

    first, first_line = build()
    assert first == total
    assert abs(first_line - total) <= total * 0.001
    (ctx / "d07" / "f0007.bin").write_bytes(os.urandom(42 * 1024))
    second, second_line = build()
    assert second == 42 * 1024
    assert second < total / 100 and second_line < total / 100


def test_sigterm_during_build_exits_clean_and_restarts(
    tmp_path: Path, base_image: str, require_root: None, mounts_under: Callable[[Path], list[Path]]
) -> None:
    root, sock = tmp_path / "droot", tmp_path / "d.sock"
    d = start_daemon(root, sock)
    marker = f"term-{uuid.uuid4().hex}"
    ctx = write_context(tmp_path, f"FROM {base_image}\nRUN sleep 60; echo {marker}\n")
    client = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "ociworker",
            "build",
            "--addr",
            d.addr,
            "--progress",
            "plain",
            str(ctx),
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while not _procs_with(marker):
        assert time.monotonic() < deadline and client.poll() is None
        time.sleep(0.05)
    assert stop_daemon(d) == 0
    _, err = client.communicate(timeout=60)
    assert client.returncode != 0
    assert "cancel" in err.lower(), err[-2000:]
    assert _procs_with(marker) == []
    assert mounts_under(root) == []
    assert runtime_containers(root, "runc") == ""
    assert not sock.exists()
    d2 = start_daemon(root, sock)
    try:
        ok = write_context(tmp_path, f"FROM {base_image}\nRUN echo again > /a\n", name="ok")
        cli(d2, "build", str(ok))
    finally:
        assert stop_daemon(d2) == 0


def test_sigkill_then_restart_recovers_and_builds(
    tmp_path: Path, base_image: str, require_root: None, mounts_under: Callable[[Path], list[Path]]
) -> None:
    root, sock = tmp_path / "droot", tmp_path / "d.sock"
    d = start_daemon(root, sock)
    marker = f"kill-{uuid.uuid4().hex}"
    ctx = write_context(tmp_path, f"FROM {base_image}\nRUN sleep 60; echo {marker}\n")
    client = subprocess.Popen(
        [sys.executable, "-m", "ociworker", "build", "--addr", d.addr, str(ctx)],
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while not _procs_with(marker):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    d.proc.kill()
    d.proc.wait()
    client.wait(timeout=60)
    d2 = start_daemon(root, sock)  # finds the stale socket, the container, the mounts
    try:
        assert _procs_with(marker) == []
        assert runtime_containers(root, "runc") == ""
        ok = write_context(tmp_path, f"FROM {base_image}\nRUN echo again > /a\n", name="ok")
        cli(d2, "build", str(ok))
    finally:
        assert stop_daemon(d2) == 0
    assert mounts_under(root) == []


def test_second_daemon_on_the_same_root_is_refused(daemon: Daemon, tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "ociworker",
            "serve",
            "--addr",
            f"unix://{tmp_path}/2.sock",
            "--root",
            str(daemon.root),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1
    assert "another ociworker daemon" in proc.stderr


def test_tcp_without_mutual_tls_is_refused(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "ociworker",
            "serve",
            "--addr",
            "tcp://127.0.0.1:0",
            "--root",
            str(tmp_path / "r"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1
    assert "mutual TLS" in proc.stderr
    assert not (tmp_path / "r").exists()


def test_socket_is_0660(daemon: Daemon) -> None:
    assert daemon.sock.stat().st_mode & 0o777 == 0o660


def stopped_client_build_is_cancelled(
    addr: str, root: Path, tmp_path: Path, base_image: str
) -> None:
    """Stop (SIGSTOP) a client mid-RUN and wait for the daemon at ``addr`` to notice: its
    build's processes and runtime containers must be gone. Shared with the socket-activated
    daemon's test (test_socket_activation), where a forwarder sits between the two."""
    marker = f"dead-{uuid.uuid4().hex}"
    ctx = write_context(tmp_path, f"FROM {base_image}\nRUN sleep 600; echo {marker}\n")
    client = subprocess.Popen(
        [sys.executable, "-m", "ociworker", "build", "--addr", addr, str(ctx)],
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        while not _procs_with(marker):
            assert time.monotonic() < deadline and client.poll() is None
            time.sleep(0.05)
        client.send_signal(signal.SIGSTOP)

        async def wait_until_idle() -> None:
            async with ociworker.Client(addr) as c:
                # a guard, not a measurement: keepalive gives up after ~10 s
                async with asyncio.timeout(60):
                    while (await c.info()).running_builds:
                        await asyncio.sleep(0.2)

        asyncio.run(wait_until_idle())
        assert _procs_with(marker) == []
        assert runtime_containers(root, "runc") == ""
    finally:
        client.kill()
        client.wait()


def test_dead_client_is_noticed_and_its_build_cancelled(
    daemon: Daemon, tmp_path: Path, base_image: str, mounts_under: Callable[[Path], list[Path]]
) -> None:
    # A stopped client keeps its socket open but answers no keepalive ping: the
    # daemon must drop it and cancel its build on its own.
    stopped_client_build_is_cancelled(daemon.addr, daemon.root, tmp_path, base_image)
    assert mounts_under(daemon.root) == []


def test_client_death_and_sigterm_together_leave_nothing(
    tmp_path: Path, base_image: str, require_root: None, mounts_under: Callable[[Path], list[Path]]
) -> None:
    # Two cancellations of one build (its client's and the daemon's) must not
    # cut short the clean-up the first one started.
    root, sock = tmp_path / "droot", tmp_path / "d.sock"
    d = start_daemon(root, sock)
    marker = f"both-{uuid.uuid4().hex}"
    ctx = write_context(tmp_path, f"FROM {base_image}\nRUN sleep 60; echo {marker}\n")
    client = subprocess.Popen(
        [sys.executable, "-m", "ociworker", "build", "--addr", d.addr, str(ctx)],
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while not _procs_with(marker):
        assert time.monotonic() < deadline and client.poll() is None
        time.sleep(0.05)
    client.kill()  # no wait: the daemon's SIGTERM lands while it sees the client go
    assert stop_daemon(d) == 0
    client.wait()
    assert _procs_with(marker) == []
    assert mounts_under(root) == []
    assert runtime_containers(root, "runc") == ""
    assert not any((root / "executor" / "bundles").iterdir())


def test_layers_output_streams_each_layer_before_the_build_ends(
    daemon: Daemon, tmp_path: Path, base_image: str
) -> None:
    ctx = write_context(
        tmp_path,
        f"FROM {base_image}\nRUN echo one > /one\nRUN sleep 5\nRUN echo three > /three\n",
    )
    dest = tmp_path / "layers"
    seen_at_sleep_end: list[str] = []

    def events(ev: Event) -> None:
        # the client handles the stream in order: what is on disk when the sleep's
        # completion arrives was streamed while the sleep was still running
        if isinstance(ev, VertexStatus) and "RUN sleep 5" in ev.name and ev.completed:
            seen_at_sleep_end.extend(sorted(p.name for p in dest.glob("*.json")))

    async def go() -> BuildResult:
        async with ociworker.Client(daemon.addr) as c:
            return await c.build(
                ctx, events=events, outputs=(f"type=layers,dest={dest}",), no_cache=True
            )

    asyncio.run(go())
    assert seen_at_sleep_end and seen_at_sleep_end[0].startswith("001-"), seen_at_sleep_end
    descs = sorted(dest.glob("*.json"))
    # step 2 (the sleep) changes nothing, so it makes no layer (BuildKit drops empty ones)
    assert [p.name[:4] for p in descs] == ["001-", "003-"]
    for p in descs:
        d = json.loads(p.read_text())
        blob = dest / "blobs" / "sha256" / d["digest"].split(":")[1]
        assert blob.stat().st_size == d["size"]


def test_oci_to_stdout_over_daemon(daemon: Daemon, tmp_path: Path, base_image: str) -> None:
    ctx = write_context(tmp_path, f"FROM {base_image}\nRUN echo x > /x\n")
    out = tmp_path / "img.tar"
    with open(out, "wb") as f:
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "ociworker",
                "build",
                "--addr",
                daemon.addr,
                "--progress",
                "plain",
                "-o",
                "type=oci,dest=-",
                "--iidfile",
                str(tmp_path / "iid"),
                str(ctx),
            ],
            stdout=f,
            stderr=subprocess.PIPE,
            text=False,
            timeout=300,
        )
    assert proc.returncode == 0, proc.stderr[-2000:]
    # stdout is a whole archive whose image is the one the build named
    assert (tmp_path / "iid").read_text() == oci_archive_image(out).config_digest


def test_secret_is_served_by_the_client_session(
    daemon: Daemon, tmp_path: Path, base_image: str
) -> None:
    value = f"s3cr3t-{uuid.uuid4().hex}"
    ctx = write_context(
        tmp_path,
        f"FROM {base_image}\n"
        "RUN --mount=type=secret,id=tok,required=true wc -c < /run/secrets/tok > /len\n",
    )
    out = tmp_path / "out"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "ociworker",
            "build",
            "--addr",
            daemon.addr,
            "--progress",
            "plain",
            "--secret",
            "id=tok,env=TOK",
            "-o",
            f"type=local,dest={out}",
            str(ctx),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, TOK=value),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "len").read_text().strip() == str(len(value))
    # the value never reached the daemon's disk
    hits = subprocess.run(["grep", "-rl", value, str(daemon.root)], capture_output=True)
    assert hits.stdout == b""


def _cert(
    tmp: Path, name: str, issuer: tuple[Any, Any] | None, *, ca: bool = False
) -> tuple[Any, Any]:
    """A key and certificate for ``name`` (for 127.0.0.1), signed by ``issuer``
    (key, cert) or self-signed; written as tmp/name.{key,crt}."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer[1].subject if issuer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        ).add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
    cert = builder.sign(issuer[0] if issuer else key, hashes.SHA256())
    (tmp / f"{name}.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    (tmp / f"{name}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key, cert


def test_tcp_with_mutual_tls_serves_only_clients_the_ca_signed(
    tmp_path: Path, require_root: None
) -> None:
    ca = _cert(tmp_path, "ca", None, ca=True)
    _cert(tmp_path, "server", ca)
    _cert(tmp_path, "client", ca)
    _cert(tmp_path, "rogue", _cert(tmp_path, "otherca", None, ca=True))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = spawn_daemon(
        [
            *("--addr", f"tcp://127.0.0.1:{port}", "--root", str(tmp_path / "r")),
            *("--tlscacert", str(tmp_path / "ca.crt")),
            *("--tlscert", str(tmp_path / "server.crt")),
            *("--tlskey", str(tmp_path / "server.key")),
        ],
        tmp_path / "tcp-daemon.log",
    )
    try:

        def du(who: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [
                    *(sys.executable, "-m", "ociworker", "du"),
                    *("--addr", f"tcp://127.0.0.1:{port}"),
                    *("--tlscacert", str(tmp_path / "ca.crt")),
                    *("--tlscert", str(tmp_path / f"{who}.crt")),
                    *("--tlskey", str(tmp_path / f"{who}.key")),
                ],
                capture_output=True,
                text=True,
                timeout=120,
            )

        ok = du("client")
        assert ok.returncode == 0, ok.stderr
        assert "Total:" in ok.stdout
        refused = du("rogue")  # a certificate the daemon's CA did not sign
        assert refused.returncode != 0
        assert "Total:" not in refused.stdout
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
