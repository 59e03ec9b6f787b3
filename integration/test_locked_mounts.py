"""Read-only binds of a source whose mount has nosuid/nodev/noexec, inside a user namespace.

A rootless worker nested in a RUN --security=insecure step (scripts/test-in-container --engine
ociworker) sees the step's tmpfs mounts with those flags, made by a more privileged namespace,
so the kernel locks them: a read-only remount that leaves one out fails with EPERM. The
expectation here is the kernel's own answer (a write gets EROFS, the flags read back from
/proc/self/mountinfo), not what the code under test reports.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from ociworker.core.mounts import Mount
from ociworker.executor.spec import user_mount

SRC = Path(__file__).resolve().parents[1] / "src"

_CHILD = r"""
import errno, os, sys
sys.path.insert(0, sys.argv[1])
from ociworker.core.mounts import Mount
from ociworker.fs.mount import _mount_one
src, dst = sys.argv[2], sys.argv[3]
_mount_one(Mount(type="bind", source=src, target=dst, options=("rbind", "ro")), dst)
try:
    open(os.path.join(dst, "new"), "w").close()
    print("writable")
except OSError as exc:
    print("EROFS" if exc.errno == errno.EROFS else f"errno {exc.errno}")
for line in open("/proc/self/mountinfo"):
    fields = line.split()
    if fields[4] == dst:
        print(fields[5])
"""


@pytest.fixture
def locked_tmpfs(require_root: None, tmp_path: Path) -> Iterator[Path]:
    top = tmp_path / "t"
    top.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "nosuid,nodev,noexec", "tmpfs", str(top)], check=True
    )
    try:
        (top / "src").mkdir()
        (top / "dst").mkdir()
        yield top
    finally:
        subprocess.run(["umount", "-l", str(top)], check=False)


def test_read_only_bind_in_a_user_namespace_keeps_locked_flags(locked_tmpfs: Path) -> None:
    proc = subprocess.run(
        [
            "unshare",
            "-U",
            "-m",
            "-r",
            sys.executable,
            "-c",
            _CHILD,
            str(SRC),
            str(locked_tmpfs / "src"),
            str(locked_tmpfs / "dst"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    result, options = proc.stdout.split()
    assert result == "EROFS"
    assert {"ro", "nosuid", "nodev", "noexec"} <= set(options.split(","))


def test_runtime_spec_repeats_the_source_mounts_flags_on_a_read_only_bind(
    locked_tmpfs: Path,
) -> None:
    src = str(locked_tmpfs / "src")
    ro = user_mount(Mount(type="bind", source=src, target="/in", options=("ro",)))
    assert {"ro", "nosuid", "nodev", "noexec"} <= set(ro["options"])
    # a writable bind is left as asked: no remount, so nothing to repeat
    rw = user_mount(Mount(type="bind", source=src, target="/in", options=()))
    assert rw["options"] == ["bind"]
