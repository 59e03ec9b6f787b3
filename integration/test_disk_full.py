"""A full disk (issue 18 item 3): the worker's root, or an output's dest, on a small
filesystem this test makes (a file, ``mkfs.ext4``, a loop mount), embedded and over a
daemon; real runc, overlayfs and the local registry.

What a user sees is checked against the Dockerfile (the step's name as BuildKit prints
it, the kernel's "No space left on device" in the step's own output) and what the host
says (``statvfs`` of the small filesystem, each blob re-hashed, SQLite's own
``integrity_check``, mountinfo), never against ociworker's accounting.
"""

from __future__ import annotations

import hashlib
import os
import re
import sqlite3
import subprocess
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import buildkit_steps, mounts_under, plain_steps
from test_build import ow, write_context
from test_daemon import Daemon, cli, start_daemon, stop_daemon

pytestmark = pytest.mark.usefixtures("require_root", "registry")

#: the small filesystem: room for the base image and one ~60 MB step, not for two
FS_BYTES = 160 * 1024 * 1024
MB = 1_000_000


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """An ext4 of FS_BYTES mounted (loop) at ``tmp_path/small``; unmounted at the end
    with whatever a failing test left mounted below it."""
    image, mnt = tmp_path / "small.img", tmp_path / "small"
    with open(image, "wb") as f:
        f.truncate(FS_BYTES)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True, capture_output=True)
    mnt.mkdir()
    # -o loop: the loop device is set up here and freed by the umount (autoclear)
    subprocess.run(["mount", "-o", "loop", str(image), str(mnt)], check=True)
    try:
        yield mnt
    finally:
        for point in mounts_under(mnt):
            subprocess.run(["umount", "--lazy", str(point)], check=False, capture_output=True)
        image.unlink(missing_ok=True)


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


@dataclass
class Worker:
    """One way to reach a worker on ``root``: the CLI embedded, or a daemon's."""

    root: Path
    daemon: Daemon | None

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        if self.daemon is None:
            return ow(self.root, *args, check=False)
        return cli(self.daemon, *args, check=False)

    def assert_alive(self) -> None:
        """The daemon (if any) is still up and answers a request."""
        if self.daemon is not None:
            assert self.daemon.proc.poll() is None, "the daemon died"
        du = self.run("du")
        assert du.returncode == 0 and "Total:" in du.stdout, du.stderr


@pytest.fixture(params=["embedded", "daemon"])
def worker_on(request: pytest.FixtureRequest) -> Iterator[Callable[[Path], Worker]]:
    """Start a worker on a root of the caller's choosing (the daemon is stopped
    at the end, before the small filesystem is unmounted)."""
    started: list[Daemon] = []

    def make(root: Path) -> Worker:
        if request.param == "embedded":
            return Worker(root, None)
        d = start_daemon(root, root.parent / f"d-{uuid.uuid4().hex[:6]}.sock")
        started.append(d)
        return Worker(root, d)

    yield make
    for d in started:
        assert stop_daemon(d) == 0


def assert_store_consistent(root: Path) -> None:
    """What a crash-consistency check asks of a root after a failure: every blob hashes
    to its name, no half-written ingest is left, every SQLite database passes its own
    integrity check, and nothing is mounted below it."""
    blobs = root / "content" / "blobs" / "sha256"
    for blob in blobs.iterdir() if blobs.exists() else ():
        h = hashlib.sha256()
        with open(blob, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        assert h.hexdigest() == blob.name, f"blob {blob} does not hash to its name"
    ingest = root / "content" / "ingest"
    assert not ingest.exists() or not any(ingest.iterdir()), list(ingest.iterdir())
    dbs = list(root.rglob("*.db"))
    assert dbs, f"no database under {root}"
    for db in dbs:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        try:
            assert con.execute("PRAGMA integrity_check").fetchall() == [("ok",)], db
        finally:
            con.close()
    assert mounts_under(root) == []


def step_lines(stderr: str, name: str) -> list[str]:
    """The lines plain progress printed under the step shown as ``name``."""
    (n,) = [s.number for s in plain_steps(stderr) if s.name == name]
    return [ln for ln in stderr.splitlines() if ln.startswith(f"#{n} ")]


def error_line(stderr: str) -> str:
    last = [ln for ln in stderr.splitlines() if ln.startswith("ERROR:")]
    assert len(last) == 1, stderr[-3000:]
    return last[0]


def test_run_that_fills_the_disk_fails_named_and_prune_makes_room(
    small_fs: Path, worker_on: Callable[[Path], Worker], tmp_path: Path, base_image: str
) -> None:
    w = worker_on(small_fs / "root")
    fill = f"FROM {base_image}\nRUN head -c {60 * MB} /dev/urandom > /fill\n"
    first = w.run("build", "--progress", "plain", str(write_context(tmp_path, fill, name="a")))
    assert first.returncode == 0, first.stderr[-3000:]

    too_big = f"FROM {base_image}\nRUN dd if=/dev/zero of=/big bs=1M count=400\n"
    failed = w.run("build", "--progress", "plain", str(write_context(tmp_path, too_big)))
    assert failed.returncode == 1
    step = buildkit_steps(too_big)[-1].name  # "[2/2] RUN dd ..."
    assert "Traceback" not in failed.stderr
    # the step's own output carries the kernel's word, and the last line names the step
    assert any("No space left on device" in ln for ln in step_lines(failed.stderr, step))
    assert step in error_line(failed.stderr)
    w.assert_alive()
    assert_store_consistent(w.root)

    # 90 MB more does not fit beside the first build's 60 MB; once pruned it does
    need = 90 * MB
    before = free_bytes(small_fs)
    assert before < need + 10 * MB, before
    pruned = w.run("prune", "--all")
    assert pruned.returncode == 0, pruned.stderr
    after = free_bytes(small_fs)
    assert after - before >= 55 * MB, (before, after)
    assert_store_consistent(w.root)
    fits = f"FROM {base_image}\nRUN head -c {need} /dev/urandom > /x && wc -c < /x > /n\n"
    out = tmp_path / "out"
    ok = w.run(
        "build",
        "--progress",
        "plain",
        "-o",
        f"type=local,dest={out}",
        str(write_context(tmp_path, fits, name="c")),
    )
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert (out / "n").read_text().strip() == str(need)
    w.assert_alive()


def test_copy_of_a_context_that_does_not_fit_fails_and_leaves_no_space_taken(
    small_fs: Path, worker_on: Callable[[Path], Worker], tmp_path: Path, base_image: str
) -> None:
    w = worker_on(small_fs / "root")
    # a base image pulled first, so what the failed build leaves is measured alone
    warm = w.run("build", str(write_context(tmp_path, f"FROM {base_image}\n", name="w")))
    assert warm.returncode == 0, warm.stderr
    before = free_bytes(small_fs)
    df = f"FROM {base_image}\nCOPY big.bin /big.bin\n"
    ctx = write_context(tmp_path, df, name="big")
    chunk = os.urandom(1 << 20)
    with open(ctx / "big.bin", "wb") as f:
        for _ in range(FS_BYTES // len(chunk) + 10):  # more than the whole filesystem
            f.write(chunk)
    failed = w.run("build", "--progress", "plain", str(ctx))
    assert failed.returncode == 1
    assert "Traceback" not in failed.stderr and "[Errno" not in failed.stderr
    last = error_line(failed.stderr)
    assert "no space left on device" in last, last
    # embedded, the COPY writes the file; over a daemon, the context's transfer does
    where = buildkit_steps(df)[-1].name if w.daemon is None else "[internal] load build context"
    shown = step_lines(failed.stderr, where)
    assert any(re.search(r"ERROR: .*no space left on device", ln) for ln in shown), shown
    w.assert_alive()
    assert_store_consistent(w.root)
    # what the failed copy wrote is given back (ext4 keeps a few blocks for its journal
    # and directories: 2 MB of slack)
    assert free_bytes(small_fs) >= before - 2 * MB, (before, free_bytes(small_fs))


@pytest.mark.parametrize("output", ["oci", "tar"])
def test_archive_output_that_does_not_fit_leaves_no_file(
    small_fs: Path,
    worker_on: Callable[[Path], Worker],
    tmp_path: Path,
    base_image: str,
    output: str,
) -> None:
    # the worker's root is on the big disk; only the output's dir is small
    w = worker_on(tmp_path / "root")
    dest_dir = small_fs / "out"
    dest_dir.mkdir()
    # leave 20 MB free for an image with 40 MB of random bytes
    filler = small_fs / "filler"
    subprocess.run(
        ["fallocate", "-l", str(free_bytes(small_fs) - 20 * MB), str(filler)], check=True
    )
    before = free_bytes(small_fs)
    df = f"FROM {base_image}\nRUN head -c {40 * MB} /dev/urandom > /r\n"
    dest = dest_dir / f"image.{output}.tar"
    failed = w.run(
        "build",
        "--progress",
        "plain",
        "-o",
        f"type={output},dest={dest}",
        str(write_context(tmp_path, df)),
    )
    assert failed.returncode == 1
    assert "Traceback" not in failed.stderr and "[Errno" not in failed.stderr
    last = error_line(failed.stderr)
    assert f"type={output}" in last and str(dest) in last, last
    assert "no space left on device" in last, last
    # nothing partial: no dest, no temp file beside it, the space given back
    assert list(dest_dir.iterdir()) == []
    assert free_bytes(small_fs) >= before - MB, (before, free_bytes(small_fs))
    w.assert_alive()
    assert_store_consistent(w.root)
    # with room again, the same build writes its archive
    filler.unlink()
    ok = w.run(
        "build", "--progress", "plain", "-o", f"type={output},dest={dest}",
        str(write_context(tmp_path, df)),
    )  # fmt: skip
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert dest.stat().st_size > 40 * MB


def test_layer_that_does_not_fit_in_the_content_store_fails_and_leaves_no_blob(
    small_fs: Path, worker_on: Callable[[Path], Worker], tmp_path: Path, base_image: str
) -> None:
    # 90 MB of random bytes fit in the step's snapshot; their layer (incompressible,
    # as big again) does not fit beside it in the content store on the same disk
    w = worker_on(small_fs / "root")
    df = f"FROM {base_image}\nRUN head -c {90 * MB} /dev/urandom > /r\n"
    ctx = write_context(tmp_path, df)
    built = w.run("build", str(ctx))
    assert built.returncode == 0, built.stderr[-3000:]
    before = free_bytes(small_fs)
    assert before < 90 * MB, before
    dest = tmp_path / "image.tar"  # on the big disk: only the layer's blob is short of room
    failed = w.run("build", "--progress", "plain", "-o", f"type=oci,dest={dest}", str(ctx))
    assert failed.returncode == 1
    assert "Traceback" not in failed.stderr and "[Errno" not in failed.stderr
    last = error_line(failed.stderr)
    assert "layer" in last and "no space left on device" in last, last
    assert not dest.exists()
    assert free_bytes(small_fs) >= before - MB, (before, free_bytes(small_fs))
    w.assert_alive()
    assert_store_consistent(w.root)
