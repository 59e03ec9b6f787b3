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
