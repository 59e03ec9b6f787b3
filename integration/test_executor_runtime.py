"""OCIRuntimeExecutor on real runc and crun, on a busybox-static rootfs.

Every test runs once per runtime (the ``runtime`` fixture) and, through
``clean_executor``, checks after the run that the runtime lists no container,
no mount is left under the state dir, and no mount stub was left in the rootfs.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from ociworker.core.mounts import Mount
from ociworker.errors import UserError
from ociworker.executor import OCIRuntimeExecutor, ProcessSpec
from ociworker.testing.executor_suite import CHECKS as EXECUTOR_CHECKS
from ociworker.testing.executor_suite import ExecutorSuiteContext

pytestmark = pytest.mark.usefixtures("require_root")

# Docker's default capability set as a /proc/<pid>/status mask: CHOWN(0)
# DAC_OVERRIDE(1) FOWNER(3) FSETID(4) KILL(5) SETGID(6) SETUID(7) SETPCAP(8)
# NET_BIND_SERVICE(10) NET_RAW(13) SYS_CHROOT(18) MKNOD(27) AUDIT_WRITE(29) SETFCAP(31).
DOCKER_CAPS = "00000000a80425fb"

PASSWD = "root:x:0:0:root:/root:/bin/sh\nbuilder:x:1234:2345:b:/home/builder:/bin/sh\n"
GROUP = "root:x:0:\nmain:x:2345:\nstaff:x:3000:other,builder\n"


@dataclass
class Output:
    chunks: list[tuple[float, str, bytes]] = field(default_factory=list)

    def __call__(self, name: str, data: bytes) -> None:
        self.chunks.append((time.monotonic(), name, data))

    def text(self, name: str) -> str:
        return b"".join(d for _, n, d in self.chunks if n == name).decode()


@pytest.fixture(scope="session")
def busybox_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    busybox = shutil.which("busybox")
    if busybox is None:
        pytest.fail("busybox-static is not installed")
    root = tmp_path_factory.mktemp("busybox") / "rootfs"
    (root / "bin").mkdir(parents=True)
    shutil.copy2(busybox, root / "bin" / "busybox")
    applets = subprocess.run([busybox, "--list"], capture_output=True, text=True, check=True)
    for name in applets.stdout.split():
        if name != "busybox":
            (root / "bin" / name).symlink_to("busybox")
    return root


@pytest.fixture
def rootfs(busybox_tree: Path, tmp_path: Path) -> Path:
    """A fresh copy per test, with a crafted /etc/passwd and /etc/group."""
    root = tmp_path / "rootfs"
    shutil.copytree(busybox_tree, root, symlinks=True)
    (root / "etc").mkdir()
    (root / "etc" / "passwd").write_text(PASSWD)
    (root / "etc" / "group").write_text(GROUP)
    return root


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if "bin" not in p.parts}


@pytest.fixture
async def executor(
    runtime: str,
    state_dir: Path,
    rootfs: Path,
    mounts_under: Callable[[Path], list[Path]],
) -> AsyncIterator[OCIRuntimeExecutor]:
    before = _tree(rootfs)
    ex = OCIRuntimeExecutor(state_dir, runtime)
    yield ex
    listed = subprocess.run(
        [runtime, "--root", str(ex.runtime_root), "list", "-q"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert listed.stdout.strip() == ""
    assert mounts_under(state_dir) == []
    assert list((state_dir / "bundles").iterdir()) == []
    netns = state_dir / "netns"
    assert not netns.exists() or list(netns.iterdir()) == []
    # Mount points the runtime created (/proc, /dev, /sys, /etc/hosts...) are gone.
    assert _tree(rootfs) - before <= {"work", "work/dir"}


def _root(rootfs: Path) -> list[Mount]:
    return [Mount(type="bind", source=str(rootfs), options=("rbind",))]


async def _run(
    ex: OCIRuntimeExecutor, rootfs: Path, *args: str, mounts: tuple[Mount, ...] = (), **kw: Any
) -> tuple[int, Output]:
    out = Output()
    process = ProcessSpec(args=args, **kw)
    code = await ex.run(_root(rootfs), process, mounts, out)
    return code, out


async def test_output_streams_separately_in_order(
    executor: OCIRuntimeExecutor, rootfs: Path
) -> None:
    script = "echo out1; echo err1 >&2; echo out2; echo err2 >&2"
    code, out = await _run(executor, rootfs, "sh", "-c", script)
    assert code == 0
    assert out.text("stdout") == "out1\nout2\n"
    assert out.text("stderr") == "err1\nerr2\n"


async def test_output_arrives_while_running(
    executor: OCIRuntimeExecutor, rootfs: Path, tmp_path: Path
) -> None:
    # Causal, not timed: the container prints "first" and then waits until the
    # test has *received* that chunk and answered through a shared dir. Output
    # held back until exit would leave it waiting, and it prints "never-released".
    sync = tmp_path / "sync"
    sync.mkdir()

    class Answering(Output):
        def __call__(self, name: str, data: bytes) -> None:
            super().__call__(name, data)
            if b"first" in data:
                (sync / "go").touch()

    out = Answering()
    script = (
        "echo first; i=0; while [ ! -e /sync/go ] && [ $i -lt 300 ]; do sleep 0.1; "
        "i=$((i+1)); done; [ -e /sync/go ] && echo second || echo never-released"
    )
    mounts = (Mount(type="bind", source=str(sync), options=("ro",), target="/sync"),)
    code = await executor.run(_root(rootfs), ProcessSpec(args=("sh", "-c", script)), mounts, out)
    assert code == 0
    assert out.text("stdout") == "first\nsecond\n"


async def test_exit_code(executor: OCIRuntimeExecutor, rootfs: Path) -> None:
    code, _ = await _run(executor, rootfs, "sh", "-c", "exit 3")
    assert code == 3


async def test_env_cwd_defaults(executor: OCIRuntimeExecutor, rootfs: Path) -> None:
    code, out = await _run(
        executor,
        rootfs,
        "sh",
        "-c",
        'echo "$FOO"; pwd; echo "$PATH"; echo "$HOME"',
        env=("FOO=bar baz",),
        cwd="/work/dir",
    )
    assert code == 0
    assert out.text("stdout").splitlines() == [
        "bar baz",
        "/work/dir",
        "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "/root",
    ]
    assert (rootfs / "work" / "dir").is_dir()


async def test_numeric_user(executor: OCIRuntimeExecutor, rootfs: Path) -> None:
    code, out = await _run(
        executor, rootfs, "sh", "-c", "id -u; id -g; echo $HOME", user="1000:1000"
    )
    assert code == 0
    assert out.text("stdout").splitlines() == ["1000", "1000", "/"]


async def test_named_user_with_supplementary_groups(
    executor: OCIRuntimeExecutor, rootfs: Path
) -> None:
    code, out = await _run(executor, rootfs, "sh", "-c", "id; echo $HOME", user="builder")
    assert code == 0
    ident, home = out.text("stdout").splitlines()
    assert ident.startswith("uid=1234(builder) gid=2345(main)")
    assert "3000(staff)" in ident
    assert home == "/home/builder"


async def test_named_user_explicit_group(executor: OCIRuntimeExecutor, rootfs: Path) -> None:
    code, out = await _run(executor, rootfs, "id", user="builder:staff")
    assert code == 0
    # BuildKit v0.32 lists the primary group among the supplementary ones too
    # (the issue 13 gap: ``USER uid:gid`` prints ``groups=GID`` there)
    assert out.text("stdout").strip() == "uid=1234(builder) gid=3000(staff) groups=3000(staff)"


async def test_missing_user_is_a_user_error(executor: OCIRuntimeExecutor, rootfs: Path) -> None:
    with pytest.raises(UserError, match="unable to find user nobody: no matching entries"):
        await _run(executor, rootfs, "id", user="nobody")


async def test_hostname_and_hosts(executor: OCIRuntimeExecutor, rootfs: Path) -> None:
    code, out = await _run(
        executor, rootfs, "sh", "-c", "hostname; cat /etc/hosts", hostname="stepbox"
    )
    assert code == 0
    lines = out.text("stdout").splitlines()
    assert lines[0] == "stepbox"
    assert "127.0.0.1\tlocalhost stepbox" in lines


async def test_network_none_has_only_loopback_up(
    executor: OCIRuntimeExecutor, rootfs: Path
) -> None:
    code, out = await _run(
        executor,
        rootfs,
        "sh",
        "-c",
        "ls /sys/class/net; cat /sys/class/net/lo/flags",
        network="none",
    )
    assert code == 0, out.text("stderr")
    *names, flags = out.text("stdout").split()
    assert names == ["lo"]
    assert int(flags, 16) & 0x1  # IFF_UP


async def test_network_host_sees_host_interfaces(
    executor: OCIRuntimeExecutor, rootfs: Path
) -> None:
    code, out = await _run(executor, rootfs, "ls", "/sys/class/net", network="host")
    assert code == 0, out.text("stderr")
    assert set(out.text("stdout").split()) == set(os.listdir("/sys/class/net"))


async def test_capabilities_are_dockers_default(executor: OCIRuntimeExecutor, rootfs: Path) -> None:
    code, out = await _run(executor, rootfs, "grep", "Cap", "/proc/self/status")
    assert code == 0
    caps = dict(line.split(":\t") for line in out.text("stdout").splitlines())
    assert caps["CapEff"] == DOCKER_CAPS
    assert caps["CapPrm"] == DOCKER_CAPS
    assert caps["CapBnd"] == DOCKER_CAPS
    assert caps["CapInh"] == "0000000000000000"
    assert caps["CapAmb"] == "0000000000000000"


async def test_extra_mounts(executor: OCIRuntimeExecutor, rootfs: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "hello").write_text("from host\n")
    mounts = (
        Mount(type="bind", source=str(data), options=("ro",), target="/data"),
        Mount(type="tmpfs", source="tmpfs", options=("size=1m",), target="/scratch"),
    )
    script = "cat /data/hello; touch /data/x || echo ro; echo hi > /scratch/f && cat /scratch/f"
    code, out = await _run(executor, rootfs, "sh", "-c", script, mounts=mounts)
    assert code == 0
    assert out.text("stdout").splitlines() == ["from host", "ro", "hi"]
    assert sorted(os.listdir(data)) == ["hello"]


def _pids_running(marker: str) -> list[str]:
    """PIDs whose command line holds ``marker``."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if marker.encode() in cmdline:
            found.append(pid)
    return found


async def test_cancel_kills_and_cleans_up_before_returning(
    executor: OCIRuntimeExecutor, rootfs: Path
) -> None:
    marker = secrets.token_hex(6)
    out = Output()
    process = ProcessSpec(args=("sh", "-c", f"sleep 30; echo {marker}"), network="none")
    task = asyncio.create_task(executor.run(_root(rootfs), process, (), out))
    # cancel only once the container's process runs (a cancel before the start would
    # prove nothing about killing it)
    for _ in range(200):
        if _pids_running(marker) or task.done():
            break
        await asyncio.sleep(0.05)
    assert not task.done(), "the container ended before it could be cancelled"
    assert _pids_running(marker), "the container's process never appeared in /proc"
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # when the cancellation returns, the container is gone (timing: benchmarks)
    assert _pids_running(marker) == [], "the container's process survived the cancel"
    # the executor fixture checks: no container listed, no mount, no bundle, no netns


async def test_killed_container_reports_128_plus_signal(
    executor: OCIRuntimeExecutor, rootfs: Path, runtime: str
) -> None:
    task = asyncio.create_task(_run(executor, rootfs, "sleep", "30"))
    listing: list[str] = []
    for _ in range(100):
        await asyncio.sleep(0.05)
        listing = subprocess.run(
            [runtime, "--root", str(executor.runtime_root), "list", "-q"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        if listing:
            break
    assert len(listing) == 1
    subprocess.run(
        [runtime, "--root", str(executor.runtime_root), "kill", listing[0], "KILL"], check=True
    )
    code, _ = await asyncio.wait_for(task, 5)
    assert code == 128 + 9


@pytest.mark.parametrize("name", sorted(EXECUTOR_CHECKS))
async def test_executor_suite(name: str, executor: OCIRuntimeExecutor, rootfs: Path) -> None:
    # the shared suite FakeExecutor is held to in tests/test_fakes_suites.py
    await EXECUTOR_CHECKS[name](ExecutorSuiteContext(executor, _root(rootfs)))
