"""Crash consistency (issue 18 item 1): SIGKILL a worker at random points of many
builds and check, by means of our own, that it loses nothing and leaves nothing.

Each trial starts a build that must do real work (``--no-cache``, or a fresh root
for the pull), waits for the progress line that opens the phase it aims at
(pull, RUN, the snapshot commit after RUN, the diff, the export, the context
upload to a daemon), sleeps a random extra moment and kills the worker: an
embedded build's whole process group, or the daemon (``ociworker serve``) alone,
as an OOM kill would. Then the daemon is restarted, or the next embedded build
runs, and the root is checked without the worker's code:

- the worker starts (the daemon serves; the next build runs) and ``du`` works;
- nothing of ours is left: no mount under the root (``/proc/self/mountinfo``), no
  container (``runc``/``crun --root ... list``), no bundle, and nothing named
  after a dead worker process (its links, nft tables, netns, scratch dir, lock),
  no snapshot in use (active, view) and no unfinished blob in the ingest dir;
- every blob in the content store hashes (``hashlib``) to its file name;
- every cache record of a snapshot names a committed snapshot whose directory
  exists, every committed snapshot's parent too (``sqlite3``);
- every SQLite database passes ``PRAGMA integrity_check``;
- the next build (with the cache) gives an image equal to a clean build's on a
  fresh root: the same manifest digest (oci archive, image store), the same
  config and layers (docker archive), the same tree (local dir).

The random numbers come from a seed printed in every failure message; set
``OCIWORKER_CRASH_SEED`` to replay a run. ``OCIWORKER_CRASH_TRIALS`` sets the
number of trials (default 14, two of each phase, about three minutes; the issue's long run is
``OCIWORKER_CRASH_TRIALS=100``).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import json
import os
import random
import signal
import sqlite3
import stat
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from conftest import mounts_under, oci_archive_image
from ociworker.executor.runtime import recover_state_dir
from ociworker.testing.daemon import spawn_daemon
from test_build import write_context

pytestmark = pytest.mark.stress

TRIALS = int(os.environ.get("OCIWORKER_CRASH_TRIALS", "14"))
SEED = int(os.environ.get("OCIWORKER_CRASH_SEED") or random.SystemRandom().randrange(1 << 32))
#: the image is the same whenever it is built: file times are clamped to the epoch
EPOCH_ENV = {"SOURCE_DATE_EPOCH": "0"}
IMAGE_NAME = "crash-test:latest"
OUTPUT_KINDS = ("oci", "docker", "local", "image")


def _vertex_line(text: str) -> Callable[[list[str]], bool]:
    """A progress line that opens the vertex named ``text`` (``#N text``)."""
    return lambda lines: any(
        line.startswith("#") and text in line.partition(" ")[2] for line in lines
    )


def _run_output(lines: list[str]) -> bool:
    """The RUN step printed its last line: it is about to end, and its
    snapshot is committed and diffed next."""
    return any(line.split()[-1:] == ["run-done"] and "RUN" not in line for line in lines)


def _layers_done(lines: list[str]) -> bool:
    """``exporting layers`` ended: the exporter writes the output next."""
    nums = [line.split()[0] for line in lines if line.split()[1:3] == ["exporting", "layers"]]
    return bool(nums) and any(line.split()[:2] == [nums[0], "DONE"] for line in lines)


@dataclass(frozen=True)
class Phase:
    """Where a trial aims: the progress ``marker`` to wait for, then up to
    ``delay`` seconds more (random) before the kill."""

    marker: Callable[[list[str]], bool]
    delay: float
    fresh_root: bool = False
    daemon_only: bool = False


PHASES = {
    # a fresh root pulls the base from the registry
    "pull": Phase(_vertex_line("[1/3] FROM"), 0.6, fresh_root=True),
    "run": Phase(_vertex_line("[2/3] RUN"), 0.8),
    "commit": Phase(_run_output, 0.3),
    "diff": Phase(_vertex_line("exporting layers"), 1.0),
    "export": Phase(_layers_done, 0.15),
    # the context's upload through the daemon's session
    "sync": Phase(_vertex_line("[internal] load build context"), 0.6, daemon_only=True),
    # a worker killed mid-RUN, then the one recovering after it, early in its start
    "recovery": Phase(lambda _: True, 1.5),
}

DOCKERFILE = """\
FROM {base}
RUN seq 1 2000000 > /big && mkdir -p /d && echo run && echo run-done
COPY data /data
"""


class Lines:
    """A process's stderr, read line by line in a thread."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stderr is not None
        self._stream = proc.stderr
        self.lines: list[str] = []
        self._cv = threading.Condition()
        self._eof = False
        self._thread = threading.Thread(target=self._pump, daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        for line in self._stream:
            with self._cv:
                self.lines.append(line.rstrip("\n"))
                self._cv.notify_all()
        with self._cv:
            self._eof = True
            self._cv.notify_all()

    def wait_for(self, pred: Callable[[list[str]], bool], timeout: float) -> bool:
        with self._cv:
            self._cv.wait_for(lambda: self._eof or pred(self.lines), timeout)
            return pred(self.lines)

    def close(self) -> str:
        self._thread.join(timeout=60)
        self._stream.close()
        return "\n".join(self.lines)


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "ociworker", *args]


def _outputs(kind: str, dest: Path) -> list[str]:
    if kind == "image":
        return ["--output", f"type=image,name={IMAGE_NAME},rewrite-timestamp=true"]
    if kind == "local":
        return ["--output", f"type=local,dest={dest}"]
    return ["--output", f"type={kind},dest={dest},rewrite-timestamp=true"]


# --- what an output holds, read without the worker's code ----------------------------


def _tree(root: Path) -> dict[str, tuple[object, ...]]:
    """Every entry below ``root``: type, mode, owner and content (not times:
    a local output keeps the files' own)."""
    out: dict[str, tuple[object, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            what: object
            if stat.S_ISREG(st.st_mode):
                what = hashlib.sha256(p.read_bytes()).hexdigest()
            elif stat.S_ISLNK(st.st_mode):
                what = os.readlink(p)
            else:
                what = None
            out[str(p.relative_to(root))] = (st.st_mode, st.st_uid, st.st_gid, what)
    return out


def _docker_image(archive: Path) -> tuple[object, ...]:
    """A docker archive's manifest.json entry and the hash of each file it names."""
    with tarfile.open(archive) as tf:
        f = tf.extractfile("manifest.json")
        assert f is not None, f"{archive}: no manifest.json"
        manifest = json.load(f)
        assert len(manifest) == 1, manifest
        entry = manifest[0]
        hashes = []
        for name in [entry["Config"], *entry["Layers"]]:
            member = tf.extractfile(name)
            assert member is not None, f"{archive}: no {name}"
            hashes.append(hashlib.sha256(member.read()).hexdigest())
    return (entry["Config"], tuple(entry["Layers"]), tuple(hashes))


def _stored_image(root: Path) -> str:
    """The manifest digest the image store holds for IMAGE_NAME."""
    with sqlite3.connect(root / "images" / "images.db") as db:
        rows = db.execute("SELECT name, descriptor FROM images").fetchall()
    digests = {json.loads(desc)["digest"] for name, desc in rows if "crash-test" in name}
    assert len(digests) == 1, rows
    return str(digests.pop())


def _image(kind: str, dest: Path, root: Path) -> object:
    if kind == "oci":
        return oci_archive_image(dest).manifest_digest
    if kind == "docker":
        return _docker_image(dest)
    if kind == "local":
        return _tree(dest)
    return _stored_image(root)


# --- the root's state, read without the worker's code --------------------------------


def _containers(root: Path) -> set[str]:
    """Containers either runtime lists in the worker's state dir or in a step's
    private one (in its bundle)."""
    executor = root / "executor"
    found = set()
    for state in [executor / "runtime", *executor.glob("bundles/*/runtime")]:
        for rt in ("runc", "crun"):
            if (state / rt).is_dir():
                out = subprocess.run(
                    [rt, "--root", str(state / rt), "list", "-q"], capture_output=True, text=True
                )
                assert out.returncode == 0, out.stderr
                found |= {f"{rt}:{c}" for c in out.stdout.split()}
    return found


def _held(lock: Path) -> bool:
    """Whether a live process holds the owner lock ``lock``."""
    fd = os.open(lock, os.O_RDWR | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def _named_after(ident: str) -> list[str]:
    """Host links and nft tables whose name holds the owner id ``ident``."""
    links = subprocess.run(["ip", "-j", "link", "show"], capture_output=True, text=True, check=True)
    names = [str(link["ifname"]) for link in json.loads(links.stdout) if ident in link["ifname"]]
    tables = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True, check=True)
    return names + [t for t in tables.stdout.splitlines() if ident in t]


def _blob_mismatches(root: Path) -> list[str]:
    bad = []
    for p in (root / "content" / "blobs" / "sha256").iterdir():
        h = hashlib.sha256()
        with open(p, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        if h.hexdigest() != p.name:
            bad.append(p.name)
    return bad


def _dangling_records(root: Path) -> list[str]:
    """Cache records of snapshots (and snapshots' parents) that do not resolve
    to a committed snapshot with its directory."""
    with sqlite3.connect(root / "snapshots" / "metadata.db") as snaps:
        rows = snaps.execute("SELECT id, key, kind, parent FROM snapshots").fetchall()
    by_key = {key: (sid, kind) for sid, key, kind, _ in rows}
    ids = {sid for sid, *_ in rows}
    bad = [
        f"snapshot {sid} has no parent {parent}"
        for sid, _, _, parent in rows
        if parent is not None and parent not in ids
    ]
    for sid, key, kind, _ in rows:
        if kind == "committed" and not (root / "snapshots" / "snapshots" / str(sid)).is_dir():
            bad.append(f"committed snapshot {key} ({sid}) has no directory")
    with sqlite3.connect(root / "cache.db") as cache:
        records = cache.execute("SELECT key, ref FROM records WHERE kind = 'snapshot'").fetchall()
    for key, ref in records:
        if by_key.get(ref, (0, ""))[1] != "committed":
            bad.append(f"record {key} -> {ref}: {by_key.get(ref)}")
    return bad


def _integrity(root: Path) -> dict[str, object]:
    bad: dict[str, object] = {}
    for db in root.rglob("*.db"):
        with sqlite3.connect(db) as conn:
            got = conn.execute("PRAGMA integrity_check").fetchall()
        if got != [("ok",)]:
            bad[str(db)] = got
    return bad


def _owners(root: Path) -> dict[str, Path]:
    owners = root / "executor" / "owners"
    return {p.stem: p for p in owners.glob("*.lock")} if owners.is_dir() else {}


def _check_root(root: Path, dead: set[str], du: list[str], where: str) -> None:
    """Everything the module docstring lists but the image, on an idle root."""
    got = subprocess.run(du, capture_output=True, text=True, timeout=120)
    assert got.returncode == 0, f"{where}: du failed: {got.stderr[-2000:]}"
    assert "Total:" in got.stdout, f"{where}: du printed {got.stdout!r}"
    assert mounts_under(root) == [], f"{where}: mounts left: {mounts_under(root)}"
    assert _containers(root) == set(), f"{where}: containers left: {_containers(root)}"
    bundles = root / "executor" / "bundles"
    left = sorted(p.name for p in bundles.iterdir()) if bundles.is_dir() else []
    assert left == [], f"{where}: bundles left: {left}"
    for ident, lock in _owners(root).items():
        assert _held(lock), f"{where}: the lock of dead owner {ident} was not recovered"
    for ident in dead:
        named = _named_after(ident)
        named += [str(p) for p in (root / "executor").glob(f"netns/*{ident}*")]
        named += [str(p) for p in (root / "tmp").glob(f"{ident}*")]
        assert named == [], f"{where}: left by dead owner {ident}: {named}"
    # nothing in use on an idle root: no snapshot but committed ones, no unfinished blob
    with sqlite3.connect(root / "snapshots" / "metadata.db") as snaps:
        used = snaps.execute("SELECT key FROM snapshots WHERE kind != 'committed'").fetchall()
    assert used == [], f"{where}: snapshots left in use: {used}"
    ingests = os.listdir(root / "content" / "ingest")
    assert ingests == [], f"{where}: unfinished blobs left: {ingests}"
    assert _blob_mismatches(root) == [], f"{where}: blobs that do not match their name"
    assert _dangling_records(root) == [], f"{where}: {_dangling_records(root)}"
    assert _integrity(root) == {}, f"{where}: {_integrity(root)}"


# --- the trials -------------------------------------------------------------------


@dataclass
class Daemon:
    root: Path
    runtime: str
    logs: Path
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0

    @property
    def addr(self) -> str:
        return f"unix://{self.root.parent / (self.root.name + '.sock')}"

    def args(self) -> tuple[str, ...]:
        return ("--addr", self.addr, "--root", str(self.root), "--runtime", self.runtime)

    def start(self) -> None:
        self.starts += 1
        self.proc = spawn_daemon(self.args(), self.logs / f"{self.root.name}-{self.starts}.log")

    def kill_while_starting(self, delay: float) -> None:
        """Start it and kill it ``delay`` seconds later, serving or not (its
        start-up recovery may be under way)."""
        self.starts += 1
        with open(self.logs / f"{self.root.name}-{self.starts}.log", "wb") as log:
            proc = subprocess.Popen(
                _cli("serve", *self.args()), stdout=log, stderr=subprocess.STDOUT
            )
        time.sleep(delay)
        proc.kill()
        proc.wait()

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@dataclass
class Tally:
    """What the trials did, printed at the end (the figures of the long run)."""

    trials: int = 0
    landed: dict[str, int] = field(default_factory=dict)
    finished_first: int = 0
    #: trials whose kill left mounts or containers for the recovery to remove
    left_something: int = 0

    def line(self) -> str:
        return (
            f"crash trials: {self.trials} survived (seed {SEED}); killed mid-build per phase: "
            f"{dict(sorted(self.landed.items()))}; build ended before its kill: "
            f"{self.finished_first}; kills that left mounts or containers: {self.left_something}"
        )


def _touch_all(ctx: Path) -> None:
    """New times on every context file, so a daemon's session uploads them
    again (the image does not change: its times are clamped to the epoch)."""
    now = time.time()
    for p in ctx.rglob("*"):
        os.utime(p, (now, now))


@pytest.fixture
def crash_ctx(tmp_path: Path, base_image: str) -> Path:
    rng = random.Random(1)  # the same files every run: the image is compared
    files: dict[str, str | bytes] = {f"data/f{i}": rng.randbytes(1 << 20) for i in range(24)}
    return write_context(tmp_path, DOCKERFILE.format(base=base_image), files, name="ctx")


@dataclass(frozen=True)
class Kill:
    """How one build was killed: whether the worker was still building, and
    the progress it had shown."""

    landed: bool
    text: str
    seen: bool
    returncode: int


def _build_and_kill(
    cmd: list[str],
    env: dict[str, str],
    marker: Callable[[list[str]], bool],
    delay: float,
    daemon: Daemon | None,
) -> Kill:
    """Run ``cmd`` (a build), wait for ``marker`` in its progress, sleep ``delay``
    and SIGKILL the worker: the daemon if one is given, else the build's
    process group (the CLI and the runtimes it started)."""
    proc = subprocess.Popen(
        cmd,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    lines = Lines(proc)
    try:
        seen = lines.wait_for(marker, timeout=300)
        if seen:
            time.sleep(delay)
        landed = proc.poll() is None
        if daemon is None:
            with contextlib.suppress(ProcessLookupError):  # it ended first
                os.killpg(proc.pid, signal.SIGKILL)
        else:
            assert daemon.proc is not None
            landed = landed and daemon.proc.poll() is None
            daemon.kill()
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        text = lines.close()
    return Kill(landed, text, seen, proc.returncode)


def test_sigkill_at_random_points_loses_nothing_and_leaves_nothing(
    tmp_path: Path, crash_ctx: Path, require_root: None
) -> None:
    rng = random.Random(SEED)
    env = {**os.environ, **EPOCH_ENV}
    # A clean build of every output kind, each on a fresh root.
    expected: dict[str, object] = {}
    for kind in OUTPUT_KINDS:
        root, dest = tmp_path / f"clean-{kind}", tmp_path / f"clean.{kind}"
        cmd = _cli("build", "--root", str(root), *_outputs(kind, dest), str(crash_ctx))
        got = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        assert got.returncode == 0, got.stderr[-3000:]
        expected[kind] = _image(kind, dest, root)

    embedded_root = tmp_path / "embedded"
    daemon = Daemon(tmp_path / "daemon", "crun", tmp_path)
    daemon.start()
    extra: list[Daemon] = []
    tally = Tally()
    phases = list(PHASES)
    try:
        for trial in range(TRIALS):
            phase_name = phases[trial % len(phases)]
            phase = PHASES[phase_name]
            mode = "daemon" if phase.daemon_only or (trial // len(phases)) % 2 else "embedded"
            kind = rng.choice(OUTPUT_KINDS)
            delay = rng.uniform(0, phase.delay)
            where = (
                f"seed {SEED} trial {trial}: {mode} killed {delay:.3f}s into {phase_name} "
                f"(output {kind})"
            )
            d = daemon
            if mode == "embedded":
                root = tmp_path / f"pull-{trial}" if phase.fresh_root else embedded_root
                runtime = rng.choice(("runc", "crun"))
                base = _cli("build", "--root", str(root), "--runtime", runtime)
                du = _cli("du", "--root", str(root))
            else:
                if phase.fresh_root:
                    d = Daemon(tmp_path / f"pull-{trial}", rng.choice(("runc", "crun")), tmp_path)
                    extra.append(d)
                    d.start()
                root = d.root
                base = _cli("build", "--addr", d.addr)
                du = _cli("du", "--addr", d.addr)
            if phase_name == "sync":
                _touch_all(crash_ctx)
            dest = tmp_path / f"out-{trial}.{kind}"
            no_cache = [] if phase.fresh_root else ["--no-cache"]
            cmd = [*base, "--progress", "plain", *no_cache, *_outputs(kind, dest), str(crash_ctx)]
            before = set(_owners(root))
            if phase_name == "recovery":
                # a first kill mid-RUN leaves a step behind; then the worker that
                # would recover it is killed too, at a random moment of its start
                first = _build_and_kill(
                    cmd, env, PHASES["run"].marker, 0.3, None if mode == "embedded" else d
                )
                assert first.seen, f"{where}: the build failed early:\n{first.text[-3000:]}"
                before |= set(_owners(root))
                if mode == "embedded":
                    kill = _build_and_kill(cmd, env, lambda _: True, delay, None)
                else:
                    d.kill_while_starting(delay)
                    kill = Kill(True, "", True, 0)
            else:
                kill = _build_and_kill(
                    cmd, env, phase.marker, delay, None if mode == "embedded" else d
                )
            assert kill.seen or kill.returncode == 0, (
                f"{where}: the build failed early:\n{kill.text[-3000:]}"
            )
            if kill.landed:
                tally.landed[phase_name] = tally.landed.get(phase_name, 0) + 1
            else:
                tally.finished_first += 1
            if mounts_under(root) or _containers(root):
                tally.left_something += 1
            before |= set(_owners(root))
            if mode == "daemon":
                d.start()
            dead = before - {p.stem for p in _owners(root).values() if _held(p)}

            if kind in ("oci", "docker") and dest.exists():
                # an archive appears whole or not at all
                assert _image(kind, dest, root) == expected[kind], f"{where}: a partial archive"

            # The next build of the case, with the cache, on the same root.
            dest = tmp_path / f"next-{trial}.{kind}"
            nxt = subprocess.run(
                [*base, "--progress", "plain", *_outputs(kind, dest), str(crash_ctx)],
                env=env,
                capture_output=True,
                text=True,
                timeout=600,
            )
            assert nxt.returncode == 0, f"{where}: the next build failed:\n{nxt.stderr[-3000:]}"
            assert _image(kind, dest, root) == expected[kind], f"{where}: another image"
            _check_root(root, dead, du, where)
            if d is not daemon:
                d.stop()
                _check_root(root, set(), _cli("du", "--root", str(root)), where + " (stopped)")
            tally.trials += 1
            print(f"{where}: survived (landed {kill.landed})", flush=True)
    finally:
        for dd in [daemon, *extra]:
            dd.stop()
        print(tally.line())
    assert mounts_under(tmp_path) == []
    assert tally.trials == TRIALS


@pytest.fixture(autouse=True)
def _recover_what_failed(tmp_path: Path) -> Iterator[None]:
    """A failed trial must not leave its containers and mounts for the next tests."""
    yield
    for executor in tmp_path.glob("*/executor"):
        asyncio.run(recover_state_dir(executor))
    for point in mounts_under(tmp_path):
        subprocess.run(["umount", "--lazy", str(point)], check=False, capture_output=True)
