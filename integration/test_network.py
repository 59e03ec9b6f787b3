"""Network modes end to end, on runc and crun, through the CLI and the daemon.

``default``: a step sees ``lo`` and its ``eth0`` only, reaches a server the test
runs on the bridge's gateway, resolves a name through the resolver the worker's
config names, cannot reach the host's other addresses or its loopback, nor a
concurrent step. ``none``: ``lo`` only. ``host``: refused without the entitlement.
After every test (a clean stop, a SIGTERM of a build, a SIGKILL of a daemon and
its restart) no bridge, veth, nft table or namespace file of ours is left.
"""

from __future__ import annotations

import http.server
import ipaddress
import json
import os
import random
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

SERVED = "served-by-the-test\n"
DNS_NAME = "buildhost.example"
DNS_ANSWER = "10.11.12.13"


def leftovers() -> list[str]:
    """Links and nft tables of ours anywhere on the host."""
    links = subprocess.run(
        ["ip", "-o", "link", "show"], capture_output=True, text=True, check=True
    ).stdout
    names = [line.split(": ")[1].split("@")[0] for line in links.splitlines()]
    tables = subprocess.run(
        ["nft", "list", "tables"], capture_output=True, text=True, check=True
    ).stdout.split("\n")
    return [n for n in names if n.startswith(("ociw", "ow"))] + [
        t for t in tables if "ociworker_" in t
    ]


@pytest.fixture
def clean_host(require_root: None) -> Iterator[None]:
    assert not leftovers(), "a previous run left network state behind"
    yield
    assert not leftovers()


def ow(
    root: Path, *args: str, check: bool = True, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "ociworker", args[0], "--root", str(root), *args[1:]]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"ociworker {' '.join(args)} failed:\n{proc.stderr[-4000:]}")
    return proc


def _ctx(tmp_path: Path, dockerfile: str, name: str = "ctx") -> Path:
    ctx = tmp_path / name
    ctx.mkdir()
    (ctx / "Dockerfile").write_text(dockerfile)
    return ctx


def _free_subnet() -> ipaddress.IPv4Network:
    """A /24 no address or route of the host overlaps."""
    out = subprocess.run(
        ["ip", "-4", "route", "show", "table", "all"], capture_output=True, text=True
    )
    used = []
    for line in out.stdout.splitlines():
        word = line.split()[0] if line.split() else ""
        if word[:1].isdigit():
            used.append(ipaddress.IPv4Network(word if "/" in word else word + "/32", strict=False))
    for _ in range(100):
        net = ipaddress.IPv4Network(f"100.127.{random.randrange(256)}.0/24")
        if not any(net.overlaps(u) for u in used):
            return net
    raise AssertionError("no free /24 in 100.127.0.0/16")


def _host_address() -> str:
    """An address of the host's own, not on loopback (the route to the outside)."""
    out = subprocess.run(
        ["ip", "-4", "-o", "addr", "show", "scope", "global"], capture_output=True, text=True
    ).stdout
    for line in out.splitlines():
        if " ociw" not in line:
            return line.split()[3].split("/")[0]
    raise AssertionError("the host has no global IPv4 address")


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = SERVED.encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def _http_server(host: str) -> tuple[http.server.ThreadingHTTPServer, int]:
    server = http.server.ThreadingHTTPServer((host, 0), _Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, server.server_address[1]


def _dns_server(host: str) -> socket.socket:
    """Answers every A query with DNS_ANSWER, any other type with no record."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((host, 53))

    def serve() -> None:
        while True:
            try:
                data, peer = sock.recvfrom(512)
            except OSError:
                return
            qid = data[:2]
            end = 12
            while data[end] != 0:
                end += data[end] + 1
            qtype = struct.unpack("!H", data[end + 1 : end + 3])[0]
            question = data[12 : end + 5]
            answers = b""
            if qtype == 1:
                answers = b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 60, 4)
                answers += socket.inet_aton(DNS_ANSWER)
            header = qid + struct.pack("!HHHHH", 0x8180, 1, 1 if answers else 0, 0, 0)
            sock.sendto(header + question + answers, peer)

    threading.Thread(target=serve, daemon=True).start()
    return sock


class Daemon:
    def __init__(self, tmp_path: Path, runtime: str, subnet: ipaddress.IPv4Network) -> None:
        self.root = tmp_path / "droot"
        self.addr = f"unix://{tmp_path}/d.sock"
        self.gateway = str(next(subnet.hosts()))
        self.config = tmp_path / "ociworker.toml"
        self.config.write_text(
            f'runtime = "{runtime}"\nnetwork_subnet = "{subnet}"\ndns = ["{self.gateway}"]\n'
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "ociworker",
                "serve",
                "--addr",
                self.addr,
                "--root",
                str(self.root),
                "--config",
                str(self.config),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for _ in range(100):
            if ow(self.root, "du", "--addr", self.addr, check=False).returncode == 0:
                return
            time.sleep(0.2)
        raise AssertionError("the daemon did not answer")

    def build(self, ctx: Path, out: Path, *args: str) -> subprocess.CompletedProcess[str]:
        return ow(
            self.root,
            "build",
            "--addr",
            self.addr,
            "--progress=plain",
            "-o",
            f"type=local,dest={out}",
            *args,
            str(ctx),
        )

    def stop(self, sig: int = signal.SIGTERM) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)
        assert self.proc.wait(timeout=60) == (0 if sig == signal.SIGTERM else -sig)
        self.proc = None


def test_default_network_reaches_gateway_only(
    runtime: str, tmp_path: Path, base_image: str, clean_host: None
) -> None:
    subnet = _free_subnet()
    daemon = Daemon(tmp_path, runtime, subnet)
    daemon.start()
    servers = []
    try:
        # The bridge comes up with the first step that needs it.
        daemon.build(_ctx(tmp_path, f"FROM {base_image}\nRUN true\n", "warm"), tmp_path / "o0")
        gw = daemon.gateway
        on_gw, gw_port = _http_server(gw)
        on_lo, lo_port = _http_server("127.0.0.1")
        on_any, any_port = _http_server("0.0.0.0")
        dns = _dns_server(gw)
        servers += [on_gw, on_lo, on_any]
        host_ip = _host_address()
        get = "timeout 5 wget -q -O - http://{}:{}/ > {} 2>/dev/null; echo $? > {}.rc"
        script = " ; ".join(
            [
                "ls /sys/class/net > /out/ifaces",
                "cp /etc/resolv.conf /out/resolv",
                get.format(gw, gw_port, "/out/gw", "/out/gw"),
                get.format("127.0.0.1", lo_port, "/out/lo", "/out/lo"),
                get.format(gw, lo_port, "/out/gwlo", "/out/gwlo"),
                get.format(host_ip, any_port, "/out/hostip", "/out/hostip"),
                f"nslookup {DNS_NAME} > /out/dns 2>&1; true",
            ]
        )
        ctx = _ctx(tmp_path, f"FROM {base_image}\nRUN mkdir /out && {{ {script} ; }}\n")
        daemon.build(ctx, tmp_path / "o")
        o = tmp_path / "o" / "out"
        assert (o / "ifaces").read_text().split() == ["eth0", "lo"]
        assert (o / "gw").read_text() == SERVED
        for blocked in ("lo", "gwlo", "hostip"):
            assert (o / f"{blocked}.rc").read_text().strip() != "0", blocked
            assert (o / blocked).read_text() == ""
        resolv = (o / "resolv").read_text()
        assert resolv.split("\n").count(f"nameserver {gw}") == 1
        assert "nameserver 127." not in resolv
        assert DNS_ANSWER in (o / "dns").read_text()
        dns.close()

        # SIGKILL while a step runs on the bridge: the restart removes it all.
        sleeper = _ctx(tmp_path, f"FROM {base_image}\nRUN echo started && sleep 60\n", "sl")
        assert daemon.proc is not None
        build = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "ociworker",
                "build",
                "--addr",
                daemon.addr,
                "--progress=plain",
                str(sleeper),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert build.stderr is not None
        for line in build.stderr:
            if line.rstrip().endswith(" started"):
                break
        daemon.stop(signal.SIGKILL)
        build.communicate(timeout=60)
        assert leftovers(), "the killed daemon's bridge should still be there"
        daemon.start()
        assert not leftovers()
        assert not list((daemon.root / "executor").glob("netns/*"))
        daemon.stop()
    finally:
        for s in servers:
            s.shutdown()
            s.server_close()
        if daemon.proc is not None:
            daemon.stop()


def test_concurrent_steps_cannot_reach_each_other(
    runtime: str, tmp_path: Path, base_image: str, state_dir: Path, clean_host: None
) -> None:
    # Two stages run at once; they meet in a shared cache mount, where A leaves
    # its address while its server runs, and B tries it. Each also checks that
    # the server answers on A's own loopback (so B's failure is the network's).
    cache = "--mount=type=cache,id=meet,sharing=shared,target=/c"
    dockerfile = f"""FROM {base_image} AS a
RUN {cache} mkdir -p /www /out && echo hi > /www/index.html && rm -f /c/* && \\
    (httpd -f -p 8080 -h /www & sleep 0.3; \\
     timeout 5 wget -q -O /out/self http://127.0.0.1:8080/; \\
     ip -4 -o addr show eth0 | awk '{{print $4}}' | cut -d/ -f1 > /c/a.ip; \\
     for i in $(seq 100); do [ -e /c/b.done ] && break; sleep 0.1; done; \\
     kill %1; true)

FROM {base_image} AS b
RUN {cache} mkdir /out && for i in $(seq 100); do [ -s /c/a.ip ] && break; sleep 0.1; done; \\
    cp /c/a.ip /out/a.ip; timeout 5 wget -q -O /out/got http://$(cat /c/a.ip):8080/; \\
    echo $? > /out/rc; touch /c/b.done

FROM {base_image}
COPY --from=a /out /a
COPY --from=b /out /b
"""
    ctx = _ctx(tmp_path, dockerfile)
    ow(
        state_dir,
        "build",
        "--runtime",
        runtime,
        "-o",
        f"type=local,dest={tmp_path / 'o'}",
        str(ctx),
    )
    o = tmp_path / "o"
    assert (o / "a" / "self").read_text() == "hi\n"
    assert ipaddress.ip_address((o / "b" / "a.ip").read_text().strip())
    assert (o / "b" / "rc").read_text().strip() != "0"


def test_sequential_steps_reuse_pooled_namespaces(
    runtime: str, tmp_path: Path, base_image: str, state_dir: Path, clean_host: None
) -> None:
    # A step gives its namespace back when it ends (it had no CAP_NET_ADMIN to
    # change it), so a chain of steps runs in the one or two namespaces made
    # ahead, never one made and destroyed per step; an insecure step's
    # namespace (it could change it) is never handed on.
    addr = "ip -4 -o addr show eth0 | awk '{print $4}' >> /ips"
    dockerfile = f"FROM {base_image}\n" + "".join(f"RUN echo {i}; {addr}\n" for i in range(6))
    dockerfile += f"RUN --security=insecure {addr}\nRUN {addr}\n"
    ctx = _ctx(tmp_path, dockerfile)
    ow(
        state_dir,
        "build",
        "--runtime",
        runtime,
        "--allow",
        "security.insecure",
        "-o",
        f"type=local,dest={tmp_path / 'o'}",
        str(ctx),
    )
    ips = (tmp_path / "o" / "ips").read_text().split()
    assert len(ips) == 8
    assert len(set(ips[:6])) <= 2, ips
    insecure, after = ips[6], ips[7]
    assert after != insecure, "the insecure step's namespace was handed on"


def test_none_and_host_entitlement(
    runtime: str, tmp_path: Path, base_image: str, state_dir: Path, clean_host: None
) -> None:
    ctx = _ctx(tmp_path, f"FROM {base_image}\nRUN ls /sys/class/net > /ifaces\n")
    ow(
        state_dir,
        "build",
        "--runtime",
        runtime,
        "--network",
        "none",
        "-o",
        str(tmp_path / "n"),
        str(ctx),
    )
    assert (tmp_path / "n" / "ifaces").read_text().split() == ["lo"]

    host_ctx = _ctx(
        tmp_path, f"FROM {base_image}\nRUN --network=host ls /sys/class/net > /ifaces\n", "h"
    )
    refused = ow(state_dir, "build", "--runtime", runtime, str(host_ctx), check=False)
    assert refused.returncode == 1
    assert (
        "step [2/2] RUN --network=host ls /sys/class/net > /ifaces: "
        "entitlement network.host is not allowed"
    ) in refused.stderr
    ow(
        state_dir,
        "build",
        "--runtime",
        runtime,
        "--allow",
        "network.host",
        "-o",
        str(tmp_path / "h-out"),
        str(host_ctx),
    )
    assert sorted((tmp_path / "h-out" / "ifaces").read_text().split()) == sorted(
        os.listdir("/sys/class/net")
    )


def test_sigterm_of_a_build_on_default_network_leaves_nothing(
    runtime: str, tmp_path: Path, base_image: str, state_dir: Path, clean_host: None
) -> None:
    ctx = _ctx(tmp_path, f"FROM {base_image}\nRUN echo started && sleep 60\n")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "ociworker",
            "build",
            "--root",
            str(state_dir),
            "--runtime",
            runtime,
            "--progress=plain",
            str(ctx),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    for line in proc.stderr:
        if line.rstrip().endswith(" started"):
            break
    assert leftovers(), "the step's bridge should exist while it runs"
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert not list((state_dir / "executor").glob("netns/*"))
    assert json.dumps(leftovers()) == "[]"
