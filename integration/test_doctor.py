"""``ociworker doctor`` on this very host, as root and as the rootless test user: each check it
reports is compared with what this test finds on the host itself (the subid files it parses,
``runc --version`` it runs, the namespaces it enters), and on a host whose /etc/subuid lost
the user's entry (a bind mount over it in a private mount namespace, so the real file and the
tests running beside this one never see the change).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import pwd
import re
import shutil
import stat
import subprocess
from pathlib import Path
from typing import Any

import pytest

from conftest import CLI, root_cli

_LINE = re.compile(r"^(ok|warn|FAIL)\s+(\S+)\s+(.*)$")


def _json_report(cli: CLI, argv: list[str] | None = None) -> tuple[int, dict[str, Any]]:
    proc = cli.run("doctor", "--format", "json", check=False, argv=argv or ())
    assert proc.returncode in (0, 1), proc.stderr
    return proc.returncode, json.loads(proc.stdout)


def _checks(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in report["checks"]}


def _version(tool: str) -> str:
    out = subprocess.run([tool, "--version"], capture_output=True, text=True, check=True).stdout
    m = re.match(rf"{tool} version (\d+\.\d+(?:\.\d+)?)", out)
    assert m, out
    return m.group(1)


def _cgroup_mode() -> tuple[str, list[str]]:
    """('v2' | 'hybrid' | 'v1', the controllers on the v2 side of a hybrid host), from stat."""
    fs = subprocess.run(
        ["stat", "-f", "-c", "%T", "/sys/fs/cgroup"], capture_output=True, text=True, check=True
    ).stdout.strip()
    if fs == "cgroup2fs":
        return "v2", []
    unified = Path("/sys/fs/cgroup/unified/cgroup.controllers")
    if unified.exists():
        return "hybrid", unified.read_text().split()
    return "v1", []


def _overlay_mounts_as_root(tmp: Path) -> bool:
    for d in ("l", "u", "w", "m"):
        (tmp / d).mkdir()
    opts = f"lowerdir={tmp / 'l'},upperdir={tmp / 'u'},workdir={tmp / 'w'}"
    cmd = ["unshare", "-m", "mount", "-t", "overlay", "overlay", "-o", opts, str(tmp / "m")]
    return subprocess.run(cmd, capture_output=True, check=False).returncode == 0


def _common_checks(checks: dict[str, dict[str, Any]]) -> None:
    """What holds for root and user alike: runtimes and cgroups as the host has them."""
    for tool in ("runc", "crun"):
        assert checks[tool]["status"] == "ok", checks[tool]
        assert f"version {_version(tool)}" in checks[tool]["detail"]
        # the binary it names is the one on PATH (a user's PATH may reach it by another link)
        named = checks[tool]["detail"].split()[0]
        assert os.path.realpath(named) == os.path.realpath(shutil.which(tool) or "?")
    mode, on_v2 = _cgroup_mode()
    assert f"cgroup {mode}" in checks["cgroups"]["detail"]
    crun = checks["crun-cgroups"]
    if on_v2:  # a host where setup-host's v1 mounts are missing: crun is refused
        assert crun["status"] in ("warn", "FAIL")
        assert all(f"-o {c} cgroup /sys/fs/cgroup/{c}" in crun["fix"][0] for c in on_v2)
    else:
        assert crun["status"] == "ok"


def _in_container() -> list[str]:
    """This test's own look at whether it runs in a container (the markers engines leave,
    the root filesystem's type from stat -f)."""
    found = [p for p in ("/.dockerenv", "/run/.containerenv") if os.path.exists(p)]
    root_fs = subprocess.run(
        ["stat", "-f", "-c", "%T", "/"], capture_output=True, text=True, check=True
    ).stdout.strip()
    if root_fs == "overlayfs":
        found.append("/ is overlay")
    return found


def _fs_of(path: str) -> tuple[str, str]:
    """(filesystem type, mount point) of ``path`` by findmnt, not by mountinfo parsing."""
    out = subprocess.run(
        ["findmnt", "-n", "-o", "FSTYPE,TARGET", "-T", path],
        capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    return out[0], out[1]


_CONTAINER_CHECKS = {"container", "privileged", "cgroup-mounts", "dev-fuse"}


def _container_checks(checks: dict[str, dict[str, Any]]) -> None:
    hints = _in_container()
    assert bool(_CONTAINER_CHECKS & set(checks)) == bool(hints), (hints, list(checks))
    if not hints:
        return
    assert all(h in checks["container"]["detail"] for h in hints), hints
    # privileged: this process's own bounding set and seccomp mode
    status = {
        k: v.strip()
        for k, _, v in (
            ln.partition(":") for ln in Path("/proc/self/status").read_text().splitlines()
        )
    }
    admin = int(status["CapBnd"], 16) >> 21 & 1
    want = "FAIL" if not admin else ("warn" if status["Seccomp"] == "2" else "ok")
    assert checks["privileged"]["status"] == want
    # cgroup mounts by findmnt: a namespace-less v1 container sees binds of its own cgroup
    found = subprocess.run(
        ["findmnt", "-n", "-r", "-o", "FSROOT,TARGET,OPTIONS", "-t", "cgroup,cgroup2"],
        capture_output=True, text=True, check=False,
    ).stdout.split("\n")  # fmt: skip
    mounts = [ln.split() for ln in found if ln.startswith("/") and " /sys/fs/cgroup" in ln]
    if not mounts or any("ro" in m[2].split(",") for m in mounts):
        want_cg = "FAIL"
    elif all(m[0] != "/" for m in mounts):
        want_cg = "warn"
    else:
        want_cg = "ok"
    assert checks["cgroup-mounts"]["status"] == want_cg, (mounts, checks["cgroup-mounts"])
    fuse = os.path.exists("/dev/fuse")
    assert ("/dev/fuse usable" in checks["dev-fuse"]["detail"]) == (
        fuse and os.access("/dev/fuse", os.R_OK | os.W_OK)
    )


def test_doctor_as_root(require_root: None, tmp_path: Path) -> None:
    root = root_cli(tmp_path)
    code, report = _json_report(root)
    assert (report["mode"], report["user"], report["uid"]) == ("root", "root", 0)
    checks = _checks(report)
    # root builds need no subordinate ids, user namespaces or user-mode networking
    assert set(checks) - _CONTAINER_CHECKS == {
        "state-fs", "overlay", "snapshotter", "cgroups", "runc", "crun", "crun-cgroups",
        "network",
    }  # fmt: skip
    _container_checks(checks)
    state = os.environ.get("OCIWORKER_ROOT") or "/var/lib/ociworker"
    fstype, point = _fs_of(state if os.path.exists(state) else os.path.dirname(state))
    assert checks["state-fs"]["detail"].startswith(f"{state} is on {fstype} ({point})")
    assert checks["state-fs"]["status"] == ("FAIL" if fstype == "overlay" else "ok")
    nft = shutil.which("nft")
    assert checks["network"]["status"] == ("ok" if nft else "FAIL")
    assert f"({nft})" in checks["network"]["detail"]
    _common_checks(checks)
    probe = tmp_path / "probe"
    probe.mkdir()
    assert checks["overlay"]["status"] == ("ok" if _overlay_mounts_as_root(probe) else "warn")
    assert checks["cgroups"]["status"] == "ok"
    failed = [c for c in checks.values() if c["status"] == "FAIL"]
    assert (code, report["ready"]) == ((1, False) if failed else (0, True))
    assert code == 0, "this host is prepared by scripts/setup-host: root builds must be able to run"

    # The text report says the same, one line per check, in the same order.
    text = root.run("doctor").stdout.splitlines()
    shown = [m.groups() for m in map(_LINE.match, text) if m]
    assert [(s, n) for s, n, _ in shown] == [(c["status"], c["name"]) for c in report["checks"]]
    assert text[-1] == "builds can run (as root; 0 warnings)" or text[-1].startswith(
        "builds can run (as root; "
    )


def _subids(user: str, uid: int, path: str) -> list[tuple[int, int]]:
    out = []
    for line in Path(path).read_text().splitlines():
        f = line.split(":")
        if len(f) == 3 and f[0] in (user, str(uid)):
            out.append((int(f[1]), int(f[2])))
    return out


def _as(user: str, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["runuser", "-u", user, "--", *argv], capture_output=True, text=True, check=False, cwd="/"
    )


def test_doctor_as_the_test_user(as_user: CLI) -> None:
    assert as_user.user is not None
    user = as_user.user
    pw = pwd.getpwnam(user)
    code, report = _json_report(as_user)
    assert (report["mode"], report["user"], report["uid"]) == ("rootless", user, pw.pw_uid)
    checks = _checks(report)

    for kind in ("uid", "gid"):
        # the worker maps the user's first range: it must hold 65536 ids
        (start, n), *_ = _subids(user, pw.pw_uid, f"/etc/sub{kind}")
        check = checks[f"sub{kind}"]
        assert check["status"] == ("ok" if n >= 65536 else "FAIL")
        assert f"{n} subordinate {kind}s ({start}-{start + n - 1})" in check["detail"]

    for tool in ("newuidmap", "newgidmap"):
        path = shutil.which(tool)
        assert path, f"{tool} missing on a prepared host"
        st = os.stat(path)
        assert st.st_mode & stat.S_ISUID and st.st_uid == 0  # Debian's uidmap: setuid root
        assert checks[tool] == {
            "name": tool,
            "status": "ok",
            "detail": f"{path} (setuid root)",
            "fix": [],
        }

    userns = _as(user, "unshare", "--user", "--map-root-user", "true").returncode == 0
    assert checks["userns"]["status"] == ("ok" if userns else "FAIL")
    uid_map = _as(user, "unshare", "--user", "--map-auto", "--map-root-user", "cat",
                  "/proc/self/uid_map")  # fmt: skip
    mapped = sum(int(line.split()[2]) for line in uid_map.stdout.splitlines())
    assert f"maps {mapped} uids" in checks["idmap"]["detail"]

    # Kernel overlayfs mounts in a user namespace from Linux 5.11 on.
    major, minor = (int(x) for x in platform.release().split(".")[:2])
    assert checks["overlay"]["status"] == ("ok" if (major, minor) >= (5, 11) else "warn")
    assert "in a user namespace" in checks["overlay"]["detail"]

    fuse = os.stat("/dev/fuse")
    fuse_open = (fuse.st_mode & 0o006) == 0o006 or (
        fuse.st_uid == pw.pw_uid and fuse.st_mode & 0o600 == 0o600
    )
    detail = checks["fuse-overlayfs"]["detail"]
    if fuse_open:
        assert "/dev/fuse usable" in detail
    else:
        assert f"/dev/fuse is {stat.filemode(fuse.st_mode)}" in detail

    net = checks["network"]
    for tool in ("pasta", "slirp4netns"):
        found = shutil.which(tool)
        assert (f"{tool} ({found})" in net["detail"]) == bool(found)
    tun = os.stat("/dev/net/tun")
    tun_open = (tun.st_mode & 0o006) == 0o006
    # pasta copies the interface with the default route: a --network=none container has none
    routes = "".join(
        subprocess.run(["ip", *v, "route", "show", "default"], capture_output=True, text=True,
                       check=False).stdout
        for v in ([], ["-6"])
    )  # fmt: skip
    routed = bool(routes.strip()) or not shutil.which("pasta")
    assert net["status"] == ("ok" if tun_open and shutil.which("nft") and routed else "FAIL")
    if not tun_open:
        assert f"/dev/net/tun is {stat.filemode(tun.st_mode)}" in net["detail"]

    _common_checks(checks)
    _container_checks(checks)
    mode, _ = _cgroup_mode()
    service = Path(f"/sys/fs/cgroup/user.slice/user-{pw.pw_uid}.slice/user@{pw.pw_uid}.service")
    if mode != "v2" or not service.is_dir():
        assert checks["cgroups"]["status"] == "warn"  # limits off, builds still run

    assert report["ready"] is True and code == 0, [
        c for c in report["checks"] if c["status"] == "FAIL"
    ]


def test_doctor_without_the_users_subuid_entry(as_user: CLI, tmp_path: Path) -> None:
    assert as_user.user is not None
    user = as_user.user
    real = Path("/etc/subuid")
    before = hashlib.sha256(real.read_bytes()).hexdigest()
    kept = [ln for ln in real.read_text().splitlines() if ln.split(":")[0] != user]
    edited = tmp_path / "subuid"
    edited.write_text("".join(f"{ln}\n" for ln in kept))
    edited.chmod(0o644)
    # The user's doctor sees the edited file as /etc/subuid: a bind mount in a mount namespace
    # of its own (unshare's propagation is private), gone when the command ends.
    wrapped = [
        "unshare", "--mount", "--propagation", "private", "sh", "-c",
        'mount --bind "$0" /etc/subuid && exec "$@"', str(edited), *as_user.argv("doctor"),
    ]  # fmt: skip
    proc = as_user.run("doctor", argv=wrapped, check=False)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    fail = next(ln for ln in lines if ln.startswith("FAIL") and _LINE.match(ln)[2] == "subuid")  # type: ignore[index]
    uid = pwd.getpwnam(user).pw_uid
    assert f"no range for {user} (uid {uid}) in /etc/subuid" in fail
    fix = lines[lines.index(fail) + 1].strip()
    m = re.fullmatch(rf"fix: sudo usermod --add-subuids (\d+)-(\d+) {re.escape(user)}", fix)
    assert m, fix
    first, last = int(m.group(1)), int(m.group(2))
    assert last - first + 1 == 65536
    # The range it proposes is free in both files (it will serve the gids too).
    for path in (edited, Path("/etc/subgid")):
        for line in path.read_text().splitlines():
            f = line.split(":")
            if len(f) == 3 and f[0] != user:
                start, end = int(f[1]), int(f[1]) + int(f[2]) - 1
                assert last < start or first > end, f"{fix} overlaps {line}"
    # subgid is untouched, and the last line says builds cannot run.
    assert any(_LINE.match(ln) and ln.split()[:2] == ["ok", "subgid"] for ln in lines)
    assert lines[-1].startswith(f"builds cannot run (rootless, as {user}")
    assert hashlib.sha256(real.read_bytes()).hexdigest() == before, "the real /etc/subuid changed"


def test_doctor_takes_no_daemon_flags(require_root: None, tmp_path: Path) -> None:
    root = root_cli(tmp_path)
    proc = root.run("doctor", "--addr", "unix:///nonexistent", check=False)
    assert proc.returncode == 1
    assert proc.stderr.splitlines()[0] == "ERROR: unknown flag: --addr"
    assert proc.stdout == ""


@pytest.mark.parametrize("fmt", ["yaml"])
def test_doctor_refuses_an_unknown_format(require_root: None, tmp_path: Path, fmt: str) -> None:
    root = root_cli(tmp_path)
    proc = root.run("doctor", "--format", fmt, check=False)
    assert proc.returncode == 1
    assert "invalid choice: 'yaml'" in proc.stderr and "Traceback" not in proc.stderr
