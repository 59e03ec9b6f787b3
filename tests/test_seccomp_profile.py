"""Docker's default seccomp profile, resolved per step.

Expectations are facts of moby's profile (seccomp/default.json) and of its
resolution rules (seccomp_linux.go), not read back from our data file.
"""

from __future__ import annotations

from typing import Any

from ociworker.executor.seccomp import default_profile, resolve
from ociworker.executor.spec import ALL_CAPABILITIES, DEFAULT_CAPABILITIES, SpecOptions, make_spec


def _allowed(profile: dict[str, Any]) -> set[str]:
    return {
        n
        for rule in profile["syscalls"]
        if rule["action"] == "SCMP_ACT_ALLOW" and "args" not in rule
        for n in rule["names"]
    }


def test_default_caps_on_x86_64() -> None:
    p = resolve(default_profile(), DEFAULT_CAPABILITIES, "x86_64", "6.1.0-18-amd64")
    assert p["defaultAction"] == "SCMP_ACT_ERRNO" and p["defaultErrnoRet"] == 1
    assert p["architectures"] == ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"]
    ok = _allowed(p)
    assert {"read", "write", "execve", "arch_prctl", "chroot", "ptrace"} <= ok
    # CAP_SYS_ADMIN rules are dropped; keyctl is never allowed
    for refused in ("mount", "umount2", "unshare", "setns", "keyctl", "add_key", "reboot"):
        assert refused not in ok
    # clone is allowed only without namespace flags (CLONE_NEW* mask 0x7E020000)
    clone = [r for r in p["syscalls"] if r["names"] == ["clone"] and "args" in r]
    assert clone[0]["args"] == [
        {"index": 0, "value": 2114060288, "valueTwo": 0, "op": "SCMP_CMP_MASKED_EQ"}
    ]
    # clone3 fails with ENOSYS so libc falls back to clone
    assert {"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": 38} in p["syscalls"]


def test_conditions_follow_caps_arch_and_kernel() -> None:
    admin = resolve(default_profile(), ALL_CAPABILITIES, "x86_64", "6.1")
    assert {"mount", "unshare", "setns", "clone3", "ptrace"} <= _allowed(admin)
    assert not any(r["names"] == ["clone3"] for r in admin["syscalls"] if "errnoRet" in r)
    arm = resolve(default_profile(), DEFAULT_CAPABILITIES, "aarch64", "6.1")
    assert arm["architectures"] == ["SCMP_ARCH_AARCH64", "SCMP_ARCH_ARM"]
    assert "arch_prctl" not in _allowed(arm) and "arm_fadvise64_64" in _allowed(arm)
    old = resolve(default_profile(), DEFAULT_CAPABILITIES, "x86_64", "4.4.0")
    assert "ptrace" not in _allowed(old)  # allowed from 4.8 only (minKernel)


def test_spec_sandbox_and_privileged() -> None:
    sandbox = make_spec(SpecOptions(args=("true",), machine="x86_64", kernel_release="6.1"))
    assert sandbox["process"]["noNewPrivileges"] is True
    assert "mount" not in _allowed(sandbox["linux"]["seccomp"])
    assert sandbox["linux"]["maskedPaths"] and sandbox["linux"]["readonlyPaths"]
    priv = make_spec(SpecOptions(args=("true",), privileged=True))
    linux = priv["linux"]
    assert "seccomp" not in linux and "maskedPaths" not in linux
    assert linux["resources"]["devices"] == [{"allow": True, "access": "rwm"}]
    assert "CAP_SYS_ADMIN" in priv["process"]["capabilities"]["bounding"]
    sysfs = next(m for m in priv["mounts"] if m["type"] == "sysfs")
    assert "ro" not in sysfs["options"]


# --- ptrace of a non-descendant goes to the supervisor (executor.ptrace_guard) ---

PTRACE_ATTACH, PTRACE_SEIZE = 16, 0x4206
U64 = (1 << 64) - 1


def _matches(arg: dict[str, Any], x: int) -> bool:
    """libseccomp's comparison of one argument (as the OCI spec names them)."""
    op, v, v2 = arg["op"], arg["value"] & U64, arg["valueTwo"] & U64
    return {
        "SCMP_CMP_EQ": x == v,
        "SCMP_CMP_NE": x != v,
        "SCMP_CMP_LT": x < v,
        "SCMP_CMP_LE": x <= v,
        "SCMP_CMP_GT": x > v,
        "SCMP_CMP_GE": x >= v,
        "SCMP_CMP_MASKED_EQ": x & v == v2,
    }[op]


def _actions(profile: dict[str, Any], name: str, args: tuple[int, ...]) -> list[str]:
    """The actions of every rule of ``profile`` a call ``name(*args)`` matches."""
    return [
        r["action"]
        for r in profile["syscalls"]
        if name in r["names"] and all(_matches(a, args[a["index"]]) for a in r.get("args", []))
    ]


def _guarded() -> dict[str, Any]:
    spec = make_spec(
        SpecOptions(
            args=("true",), machine="x86_64", kernel_release="6.1", seccomp_listener="/run/g.sock"
        )
    )
    return spec


def test_attaching_ptrace_is_notified_the_rest_allowed() -> None:
    p = _guarded()["linux"]["seccomp"]
    # Every request but ATTACH and SEIZE matches exactly one rule, ALLOW; those
    # two match exactly one, NOTIFY (rules of one syscall must not overlap).
    requests = [*range(0x4300), 0x7FFFFFFF, 0xFFFFFFFF, 1 << 32 | PTRACE_ATTACH, U64]
    for req in requests:
        want = "SCMP_ACT_NOTIFY" if req in (PTRACE_ATTACH, PTRACE_SEIZE) else "SCMP_ACT_ALLOW"
        assert _actions(p, "ptrace", (req, 1, 0, 0)) == [want], hex(req)
    for name in ("process_vm_readv", "process_vm_writev"):
        assert _actions(p, name, (1, 0, 0, 0, 0, 0)) == ["SCMP_ACT_NOTIFY"]
    # Numbers crun reads as signed 64-bit: none above 2**63.
    assert all(a["value"] < 1 << 63 for r in p["syscalls"] for a in r.get("args", []))
    # Nothing else changed: the calls Docker's profile allows are still allowed.
    plain = resolve(default_profile(), DEFAULT_CAPABILITIES, "x86_64", "6.1")
    assert _allowed(plain) - _allowed(p) == {"ptrace", "process_vm_readv", "process_vm_writev"}


def test_listener_is_named_for_runc_and_crun() -> None:
    spec = _guarded()
    assert spec["linux"]["seccomp"]["listenerPath"] == "/run/g.sock"
    assert spec["annotations"] == {"run.oci.seccomp.receiver": "/run/g.sock"}
    # Without a listener, or without seccomp, or without a ptrace rule at all
    # (before 4.8), Docker's profile as it is and no listener.
    for opts in (
        SpecOptions(args=("true",), machine="x86_64", kernel_release="6.1"),
        SpecOptions(args=("true",), privileged=True, seccomp_listener="/run/g.sock"),
        SpecOptions(
            args=("true",), machine="x86_64", kernel_release="4.4", seccomp_listener="/run/g"
        ),
    ):
        s = make_spec(opts)
        assert "annotations" not in s
        seccomp = s["linux"].get("seccomp", {"syscalls": []})
        assert "listenerPath" not in seccomp
        assert all(r["action"] != "SCMP_ACT_NOTIFY" for r in seccomp["syscalls"])
