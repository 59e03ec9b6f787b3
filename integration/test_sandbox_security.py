"""The sandbox of a RUN step, on runc and crun, as a user sees it in the step's log.

Docker's default seccomp profile refuses, for a step with Docker's default
capabilities: ``unshare`` (user and network namespaces: the profile allows
unshare/setns/mount only with CAP_SYS_ADMIN), ``mount`` (same rule) and
``keyctl`` (no rule allows it; the kernel's keyring is not namespaced), and
``ptrace`` of a process that is not a descendant of the caller (Yama's scope 1,
which Docker relies on the host for; we apply it ourselves, as this host's
kernel has no Yama), while a process may still seize its own child (``strace
CMD``). busybox has neither keyctl nor a ptrace tool, so tiny static x86_64 ELFs
made below call the syscalls and exit with the errno (0 on success). Expected
errnos come from the kernel's rules: the profile's defaultErrnoRet 1 = EPERM,
and Yama's EPERM for a non-descendant. The same probes succeed on the host (the
refusal is the sandbox's). ``RUN --security=insecure`` with ``--allow security.insecure``
mounts a tmpfs; without the entitlement the build fails naming the step.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import LEGS_MARK, current_cli
from ociworker.testing.daemon import spawn_daemon

pytestmark = pytest.mark.usefixtures("require_root")

OCIWORKER = [sys.executable, "-m", "ociworker"]
SYS_KEYCTL = 250
SYS_PTRACE = 101
PTRACE_ATTACH = 16
PTRACE_SEIZE = 0x4206
KEYCTL_GET_KEYRING_ID = 0
KEY_SPEC_SESSION_KEYRING = -3
EPERM = 1
#: the step's own output line in plain progress (not its name, which holds the text too)
LOGGED_OK = re.compile(r"^#\d+ \d+\.\d+ mounted-ok$", re.M)


def static_elf(code: bytes) -> bytes:
    """A static x86_64 ELF whose one loadable segment is ``code``, entered at its start."""
    base, hdrs = 0x400000, 64 + 56
    ehdr = struct.pack(
        "<4sBBBBB7xHHIQQQIHHHHHH",
        *(b"\x7fELF", 2, 1, 1, 0, 0, 2, 0x3E, 1, base + hdrs, 64, 0, 0, 64, 56, 1, 0, 0, 0),
    )
    size = hdrs + len(code)
    phdr = struct.pack("<IIQQQQQQ", 1, 5, 0, base, base, size, size, 0x1000)
    return ehdr + phdr + code


#: edi = eax < 0 ? -eax : 0; exit(edi)
_EXIT_ERRNO = b"\x89\xc7\xf7\xdf\x85\xc0\x7c\x02\x31\xff" + b"\xb8\x3c\x00\x00\x00\x0f\x05"


def syscall_probe(nr: int, a0: int = 0, a1: int = 0, a2: int = 0) -> bytes:
    """A static x86_64 ELF: ``syscall(nr, a0, a1, a2)``, exit(errno or 0)."""

    def imm(x: int) -> bytes:
        return struct.pack("<i", x)

    code = (
        b"\x48\xc7\xc0" + imm(nr)  # mov rax, nr
        + b"\x48\xc7\xc7" + imm(a0)  # mov rdi, a0
        + b"\x48\xc7\xc6" + imm(a1)  # mov rsi, a1
        + b"\x48\xc7\xc2" + imm(a2)  # mov rdx, a2
        + b"\x4d\x31\xd2\x0f\x05"  # xor r10, r10; syscall
        + _EXIT_ERRNO
    )  # fmt: skip
    return static_elf(code)


#: the child of a forking probe: pause(); jmp back
_PAUSE = b"\xb8\x22\x00\x00\x00\x0f\x05\xeb\xf7"

#: ptrace(PTRACE_SEIZE, r12d, 0, 0), its result in r13d
SEIZE_R12 = (
    b"\xbf\x06\x42\x00\x00"  # mov edi, 0x4206 (PTRACE_SEIZE)
    b"\x44\x89\xe6\x31\xd2\x45\x31\xd2"  # mov esi, r12d; xor edx, edx; xor r10d, r10d
    b"\xb8\x65\x00\x00\x00\x0f\x05"  # mov eax, 101 (ptrace); syscall
    b"\x41\x89\xc5"  # mov r13d, eax
)  # fmt: skip

#: process_vm_readv(r12d, {buf, 1}, 1, {0x400000, 1}, 1, 0): one byte of the
#: target's copy of a probe (loaded there), its result in r13d
VM_READ_R12 = (
    b"\x48\x83\xec\x40"  # sub rsp, 64
    b"\x48\x8d\x44\x24\x20\x48\x89\x04\x24"  # local iov at rsp: base rsp+32
    b"\x48\xc7\x44\x24\x08\x01\x00\x00\x00"  # ... len 1
    b"\x48\xc7\x44\x24\x10\x00\x00\x40\x00"  # remote iov at rsp+16: base 0x400000
    b"\x48\xc7\x44\x24\x18\x01\x00\x00\x00"  # ... len 1
    b"\x44\x89\xe7\x48\x89\xe6\xba\x01\x00\x00\x00"  # edi = r12d; rsi = rsp; edx = 1
    b"\x4c\x8d\x54\x24\x10\x41\xb8\x01\x00\x00\x00"  # r10 = rsp+16; r8d = 1
    b"\x45\x31\xc9\xb8\x36\x01\x00\x00\x0f\x05"  # r9d = 0; eax = 310; syscall
    b"\x41\x89\xc5"  # mov r13d, eax
)  # fmt: skip


def on_pid_probe(pid: int, call: bytes) -> bytes:
    """A static x86_64 ELF: ``call`` on ``pid``, exit(errno or 0)."""
    mov_r12 = b"\x41\xbc" + struct.pack("<i", pid)  # mov r12d, pid
    return static_elf(mov_r12 + call + b"\x44\x89\xe8" + _EXIT_ERRNO)  # eax = r13d


def on_child_probe(call: bytes) -> bytes:
    """A static x86_64 ELF: fork; the child pauses; the parent runs ``call`` on
    the child's pid, kills and reaps the child, exit(errno or 0)."""
    parent = (
        b"\x41\x89\xc4"  # mov r12d, eax (the child's pid)
        + call
        + b"\x44\x89\xe7\xbe\x09\x00\x00\x00"  # mov edi, r12d; mov esi, 9 (SIGKILL)
        + b"\xb8\x3e\x00\x00\x00\x0f\x05"  # mov eax, 62 (kill); syscall
        + b"\x44\x89\xe7\x31\xf6\x31\xd2\x45\x31\xd2"  # wait4(r12d, 0, 0, 0)
        + b"\xb8\x3d\x00\x00\x00\x0f\x05"  # mov eax, 61 (wait4); syscall
        + b"\x44\x89\xe8"  # mov eax, r13d
    )  # fmt: skip
    code = (
        b"\xb8\x39\x00\x00\x00\x0f\x05"  # mov eax, 57 (fork); syscall
        + b"\x85\xc0\x7f" + bytes([2 + len(_PAUSE)])  # test eax, eax; jg parent
        + b"\x75" + bytes([len(_PAUSE) + len(parent)])  # jnz done: fork failed
        + _PAUSE  # the child
        + parent
        + _EXIT_ERRNO  # done
    )  # fmt: skip
    return static_elf(code)


def seize_child_probe() -> bytes:
    return on_child_probe(SEIZE_R12)


def build(ctx: Path, root: Path, runtime: str, *flags: str) -> subprocess.CompletedProcess[str]:
    args = ["build", "--progress=plain", "--no-cache", "--root", str(root), "--runtime", runtime]
    # as root, or as the test user in a test's rootless leg
    return current_cli().run(*args, *flags, str(ctx), timeout=300, check=False)


def test_probe_works_on_the_host(tmp_path: Path) -> None:
    # The probe itself is sound: outside the sandbox keyctl succeeds.
    probe = tmp_path / "keyctl"
    probe.write_bytes(syscall_probe(SYS_KEYCTL, KEYCTL_GET_KEYRING_ID, KEY_SPEC_SESSION_KEYRING))
    probe.chmod(0o755)
    assert subprocess.run([str(probe)], check=False).returncode == 0


@LEGS_MARK  # the host probes and the daemon tests run as root only
def test_default_profile_refuses(
    tmp_path: Path, base_image: str, runtime: str, state_dir: Path
) -> None:
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "keyctl").write_bytes(
        syscall_probe(SYS_KEYCTL, KEYCTL_GET_KEYRING_ID, KEY_SPEC_SESSION_KEYRING)
    )
    os.chmod(ctx / "keyctl", 0o755)
    (ctx / "Dockerfile").write_text(
        f"FROM {base_image}\n"
        "COPY keyctl /probe/keyctl\n"
        'RUN /probe/keyctl; echo "keyctl=$?"; unshare -U true; echo "unshare-U=$?"; '
        'unshare -n true; echo "unshare-n=$?"; mkdir -p /mnt; '
        'mount -t tmpfs none /mnt; echo "mount=$?"; echo ordinary > /ok; cat /ok\n'
    )
    r = build(ctx, state_dir, runtime)
    assert r.returncode == 0, r.stderr
    assert f"keyctl={EPERM}" in r.stderr
    for refused in ("unshare-U=1", "unshare-n=1", "mount=1"):
        assert refused in r.stderr, r.stderr
    assert "ordinary" in r.stderr  # an ordinary command still runs in the same step


def _probe(path: Path, code: bytes) -> Path:
    path.write_bytes(code)
    path.chmod(0o755)
    return path


def test_ptrace_probes_work_on_the_host(tmp_path: Path) -> None:
    # Outside the sandbox root attaches to a process that is not its child (a
    # sleep this test started: a sibling of the probe), and seizes its own child.
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        for name, req in (("attach", PTRACE_ATTACH), ("seize1", PTRACE_SEIZE)):
            probe = _probe(tmp_path / name, syscall_probe(SYS_PTRACE, req, sleeper.pid))
            # (ATTACH leaves the sleep stopped; SEIZE attaches to it all the same)
            assert subprocess.run([str(probe)], check=False).returncode == 0, name
    finally:
        sleeper.kill()
        sleeper.wait()
    seize = _probe(tmp_path / "seize", seize_child_probe())
    assert subprocess.run([str(seize)], check=False).returncode == 0
    # process_vm_readv of a process that is not its child: a probe-like static
    # ELF (its first byte at 0x400000), and of its own child.
    target = subprocess.Popen([str(_probe(tmp_path / "pause", static_elf(_PAUSE)))])
    try:
        read = _probe(tmp_path / "vmread", on_pid_probe(target.pid, VM_READ_R12))
        assert subprocess.run([str(read)], check=False).returncode == 0
    finally:
        target.kill()
        target.wait()
    read_child = _probe(tmp_path / "vmread-child", on_child_probe(VM_READ_R12))
    assert subprocess.run([str(read_child)], check=False).returncode == 0


def _sockets_under(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_socket()]


def _notify_fds(pid: int) -> int:
    """How many seccomp notify fds process ``pid`` holds."""
    n = 0
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            n += os.readlink(fd) == "anon_inode:seccomp notify"
    return n


def _wait_until(cond: Callable[[], bool], tries: int = 100) -> bool:
    for _ in range(tries):
        if cond():
            return True
        time.sleep(0.1)
    return cond()


@LEGS_MARK
def test_ptrace_of_a_non_child_is_refused(
    tmp_path: Path, base_image: str, runtime: str, state_dir: Path
) -> None:
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    # pid 1 of the step is its shell: the probe's parent, not its descendant.
    _probe(ctx / "attach", syscall_probe(SYS_PTRACE, PTRACE_ATTACH, 1))
    _probe(ctx / "seize1", syscall_probe(SYS_PTRACE, PTRACE_SEIZE, 1))
    _probe(ctx / "seize", seize_child_probe())
    _probe(ctx / "vmread1", on_pid_probe(1, VM_READ_R12))
    _probe(ctx / "vmread-child", on_child_probe(VM_READ_R12))
    (ctx / "Dockerfile").write_text(
        f"FROM {base_image}\n"
        "COPY attach seize1 seize vmread1 vmread-child /probe/\n"
        # An ATTACH that succeeded would leave the shell stopped (its SIGSTOP)
        # and the step hanging: tried only once SEIZE, which stops nothing, was
        # refused, so a regression fails the test instead.
        'RUN /probe/seize1; s=$?; echo "seize-parent=$s"; '
        'if [ $s = 1 ]; then /probe/attach; echo "attach-parent=$?"; fi; '
        '/probe/seize; echo "seize-child=$?"; /probe/vmread1; echo "vmread-parent=$?"; '
        '/probe/vmread-child; echo "vmread-child=$?"; echo ordinary > /ok; cat /ok\n'
    )
    r = build(ctx, state_dir, runtime)
    assert r.returncode == 0, r.stderr
    assert f"attach-parent={EPERM}" in r.stderr, r.stderr
    assert f"seize-parent={EPERM}" in r.stderr, r.stderr
    assert "seize-child=0" in r.stderr, r.stderr
    # process_vm_readv: the same access check in the kernel, the same rule
    assert f"vmread-parent={EPERM}" in r.stderr, r.stderr
    assert "vmread-child=0" in r.stderr, r.stderr
    assert "ordinary" in r.stderr
    # The worker stopped: its supervisor's socket is gone with it.
    assert _sockets_under(state_dir) == []


@LEGS_MARK
def test_insecure_step_may_attach_anywhere(
    tmp_path: Path, base_image: str, runtime: str, state_dir: Path
) -> None:
    # RUN --security=insecure has no seccomp filter (and CAP_SYS_PTRACE): the
    # kernel alone decides, as on the host. SEIZE, not ATTACH: an attached shell
    # would stay stopped by ATTACH's SIGSTOP once the probe exits.
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    _probe(ctx / "seize1", syscall_probe(SYS_PTRACE, PTRACE_SEIZE, 1))
    (ctx / "Dockerfile").write_text(
        f"FROM {base_image}\n"
        "COPY seize1 /probe/\n"
        'RUN --security=insecure /probe/seize1; echo "seize-parent=$?"\n'
    )
    r = build(ctx, state_dir, runtime, "--allow", "security.insecure")
    assert r.returncode == 0, r.stderr
    assert "seize-parent=0" in r.stderr, r.stderr


@LEGS_MARK
def test_insecure_needs_the_entitlement(
    tmp_path: Path, base_image: str, runtime: str, state_dir: Path
) -> None:
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "Dockerfile").write_text(
        f"FROM {base_image}\n"
        "RUN --security=insecure mkdir -p /mnt && mount -t tmpfs none /mnt && "
        "grep -q ' /mnt tmpfs ' /proc/mounts && echo mounted-ok\n"
    )
    refused = build(ctx, state_dir, runtime)
    assert refused.returncode == 1
    assert "entitlement security.insecure is not allowed" in refused.stderr
    assert "[2/2] RUN --security=insecure mkdir -p /mnt" in refused.stderr
    assert "--allow security.insecure" in refused.stderr
    assert not LOGGED_OK.search(refused.stderr)  # the step never ran

    allowed = build(ctx, state_dir, runtime, "--allow", "security.insecure")
    assert allowed.returncode == 0, allowed.stderr
    assert LOGGED_OK.search(allowed.stderr), allowed.stderr


@LEGS_MARK
def test_unknown_entitlement_is_refused(tmp_path: Path, state_dir: Path) -> None:
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "Dockerfile").write_text("FROM scratch\n")
    r = build(ctx, state_dir, "runc", "--allow", "network.bridge")
    assert r.returncode == 1
    assert "unknown entitlement network.bridge" in r.stderr


@pytest.mark.parametrize("granted", [False, True])
def test_daemon_grants_only_its_configured_entitlements(
    tmp_path: Path, base_image: str, granted: bool
) -> None:
    # --allow crosses the wire in the Solve request; the daemon's config is the other key.
    config = tmp_path / "d.toml"
    config.write_text('entitlements = ["security.insecure"]\n' if granted else "")
    sock = tmp_path / "d.sock"
    args = ("--addr", f"unix://{sock}", "--root", str(tmp_path / "droot"), "--config", str(config))
    proc = spawn_daemon(args, tmp_path / "daemon.log")
    try:
        ctx = tmp_path / "ctx"
        ctx.mkdir()
        (ctx / "Dockerfile").write_text(
            f"FROM {base_image}\nRUN --security=insecure mkdir -p /mnt && "
            "mount -t tmpfs none /mnt && echo mounted-ok\n"
        )
        flags = ["--progress=plain", "--addr", f"unix://{sock}", "--allow", "security.insecure"]
        r = subprocess.run(
            [*OCIWORKER, "build", *flags, str(ctx)],
            capture_output=True,
            text=True,
            timeout=300,
        )
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    if granted:
        assert r.returncode == 0, r.stderr
        assert LOGGED_OK.search(r.stderr), r.stderr
    else:
        assert r.returncode == 1
        assert "entitlement security.insecure is not allowed" in r.stderr
        assert "the worker does not grant it" in r.stderr
        assert not LOGGED_OK.search(r.stderr)


def test_daemon_guards_ptrace_and_leaves_no_socket(tmp_path: Path, base_image: str) -> None:
    # `ociworker serve` runs the same supervisor; it lives as long as the daemon.
    sock = tmp_path / "d.sock"
    droot = tmp_path / "droot"
    proc = spawn_daemon(("--addr", f"unix://{sock}", "--root", str(droot)), tmp_path / "d.log")
    try:
        ctx = tmp_path / "ctx"
        ctx.mkdir()
        _probe(ctx / "seize1", syscall_probe(SYS_PTRACE, PTRACE_SEIZE, 1))
        _probe(ctx / "seize", seize_child_probe())
        (ctx / "Dockerfile").write_text(
            f"FROM {base_image}\nCOPY seize1 seize /probe/\n"
            'RUN /probe/seize1; echo "seize-parent=$?"; /probe/seize; echo "seize-child=$?"\n'
        )
        r = subprocess.run(
            [*OCIWORKER, "build", "--progress=plain", "--addr", f"unix://{sock}", str(ctx)],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert r.returncode == 0, r.stderr
        assert f"seize-parent={EPERM}" in r.stderr and "seize-child=0" in r.stderr, r.stderr
        assert len(_sockets_under(droot)) == 1  # the supervisor's, while the daemon runs
        # The step's notify fd was closed when the step ended (the kernel's POLLHUP).
        assert _wait_until(lambda: _notify_fds(proc.pid) == 0), _notify_fds(proc.pid)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    assert _sockets_under(droot) == []
