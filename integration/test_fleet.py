"""A fleet: three real daemons, builds through the CLI with three ``--addr``.

Where each build ran is read on the daemons' side (each logs ``build accepted``
with the build's context key) and compared with a placement this test works
out on its own from the rendezvous rule documented in docs/scale-out.md:
highest ``sha256(addr NUL absolute context path)`` first.
"""

from __future__ import annotations

import collections
import hashlib
import json
import re
import signal
import socket
import subprocess
import sys
import tarfile
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from ociworker.testing.daemon import spawn_daemon
from test_build import write_context


@dataclass
class Node:
    addr: str
    log: Path
    proc: subprocess.Popen[bytes]


def rendezvous_order(ctx: Path, addrs: list[str]) -> list[str]:
    key = str(ctx.resolve())

    def weight(addr: str) -> int:
        return int.from_bytes(hashlib.sha256(f"{addr}\0{key}".encode()).digest()[:8], "big")

    return sorted(addrs, key=weight, reverse=True)


def context_key(ctx: Path) -> str:
    # what the client sends as SolveRequest.context_key (buildx's shared key:
    # this host, this context dir, this Dockerfile), worked out here
    return hashlib.sha256(f"{socket.gethostname()}:{ctx.resolve()}:Dockerfile".encode()).hexdigest()


def accepted(node: Node) -> collections.Counter[str]:
    """Context keys of the builds this daemon took, from its own log."""
    text = node.log.read_text(errors="replace")
    found = re.findall(r"event='build accepted'.*?context_key='([0-9a-f]+)'", text)
    return collections.Counter(found)


@pytest.fixture
def fleet(
    tmp_path: Path,
    require_root: None,
    registry: str,
    mounts_under: Callable[[Path], list[Path]],
) -> Iterator[list[Node]]:
    nodes: list[Node] = []
    try:
        for i in range(3):
            sock = tmp_path / f"w{i}.sock"
            log = tmp_path / f"w{i}.log"
            args = ("--addr", f"unix://{sock}", "--root", str(tmp_path / f"root{i}"))
            nodes.append(Node(f"unix://{sock}", log, spawn_daemon(args, log)))
        yield nodes
    finally:
        for n in nodes:
            if n.proc.poll() is None:
                n.proc.send_signal(signal.SIGTERM)
        for n in nodes:
            n.proc.wait(timeout=60)
        # A daemon killed mid-build leaves its network, cgroups and mounts for the
        # next worker on its root to remove: one is started on each root (a ``du``)
        # so nothing of it outlives the test.
        for i in range(len(nodes)):
            cmd = [sys.executable, "-m", "ociworker", "du", "--root", str(tmp_path / f"root{i}")]
            subprocess.run(cmd, check=False, capture_output=True, timeout=120)
        for point in mounts_under(tmp_path):
            subprocess.run(["umount", "--lazy", str(point)], check=False, capture_output=True)


def build(
    addrs: list[str], ctx: Path, meta: Path, *, check: bool = True
) -> subprocess.CompletedProcess[str]:
    flags = [a for addr in addrs for a in ("--addr", addr)]
    cmd = [sys.executable, "-m", "ociworker", "build", *flags, "--progress", "plain"]
    cmd += ["--metadata-file", str(meta), "-o", f"type=tar,dest={meta.with_suffix('.tar')}"]
    proc = subprocess.run([*cmd, str(ctx)], capture_output=True, text=True, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"build of {ctx.name} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


def spread_contexts(tmp_path: Path, addrs: list[str], base_image: str) -> list[Path]:
    """Four contexts that land on all three workers (by this test's own reckoning)."""
    chosen: list[Path] = []
    covered: set[str] = set()
    for i in range(200):
        ctx = tmp_path / f"project-{i}"
        top = rendezvous_order(ctx, addrs)[0]
        if top in covered and len(chosen) + (3 - len(covered)) >= 4:
            continue
        write_context(
            tmp_path,
            f"FROM {base_image}\nCOPY id.txt /id.txt\nRUN cat /id.txt > /built.txt\n",
            {"id.txt": f"project-{i}\n"},
            name=ctx.name,
        )
        chosen.append(ctx)
        covered.add(top)
        if len(chosen) == 4:
            return chosen
    raise AssertionError("no four context names spread over three workers")


def test_builds_stick_to_a_worker_and_move_when_it_dies(
    fleet: list[Node], tmp_path: Path, base_image: str
) -> None:
    addrs = [n.addr for n in fleet]
    ctxs = spread_contexts(tmp_path, addrs, base_image)
    expected = {c: rendezvous_order(c, addrs) for c in ctxs}
    assert {order[0] for order in expected.values()} == set(addrs)  # the choice above held

    def five_builds(ctx: Path, live: list[str], tag: str) -> list[str]:
        said = []
        for n in range(5):
            meta = tmp_path / f"{ctx.name}-{tag}{n}.json"
            proc = build(live, ctx, meta)
            # what the user is told, and what the metadata file records
            line = re.findall(r'^building with worker "([^"]+)"', proc.stderr, re.M)
            assert len(line) == 1, proc.stderr
            assert json.loads(meta.read_text())["ociworker.worker"] == line[0]
            with tarfile.open(meta.with_suffix(".tar")) as tf:
                built = tf.extractfile("built.txt")
                assert built is not None
                # the build ran, and is this context's
                assert built.read().decode() == f"{ctx.name}\n"
            said.append(line[0])
        return said

    # 20 builds: 5 of each context, the four contexts concurrently
    with ThreadPoolExecutor(4) as pool:
        said = dict(zip(ctxs, pool.map(lambda c: five_builds(c, addrs, "a"), ctxs), strict=True))

    by_node = {n.addr: accepted(n) for n in fleet}
    for ctx in ctxs:
        home = expected[ctx][0]
        counts = {addr: got[context_key(ctx)] for addr, got in by_node.items()}
        assert counts == {a: (5 if a == home else 0) for a in addrs}, (ctx.name, counts)
        assert said[ctx] == [home] * 5

    # one worker dies without a word; its contexts move to their next choice,
    # the others stay where they were
    victim = fleet[[n.addr for n in fleet].index(expected[ctxs[0]][0])]
    victim.proc.send_signal(signal.SIGKILL)
    victim.proc.wait(timeout=30)
    survivors = [n for n in fleet if n is not victim]
    before = {n.addr: accepted(n) for n in survivors}
    with ThreadPoolExecutor(4) as pool:
        said = dict(zip(ctxs, pool.map(lambda c: five_builds(c, addrs, "b"), ctxs), strict=True))

    for ctx in ctxs:
        order = expected[ctx]
        home = order[1] if order[0] == victim.addr else order[0]
        assert said[ctx] == [home] * 5, ctx.name
        counts = {
            n.addr: accepted(n)[context_key(ctx)] - before[n.addr][context_key(ctx)]
            for n in survivors
        }
        assert counts == {n.addr: (5 if n.addr == home else 0) for n in survivors}, counts


def test_all_workers_down_is_one_clear_error(tmp_path: Path, base_image: str) -> None:
    ctx = write_context(tmp_path, f"FROM {base_image}\n")
    addrs = [f"unix://{tmp_path}/none{i}.sock" for i in range(3)]
    proc = build(addrs, ctx, tmp_path / "m.json", check=False)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("ERROR: no worker of the fleet took the build (3 tried)"), proc.stderr
    for addr in addrs:
        assert addr in last
    assert not (tmp_path / "m.json").exists()
