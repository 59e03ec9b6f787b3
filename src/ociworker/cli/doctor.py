"""``ociworker doctor``: gathers what the host and the user have (the IO half of
``core.doctor``) and prints the report. Nothing here decides: it reads files, asks tools
their version and tries the mounts a build would make, each in a namespace that dies with
the probe, so a probe leaves no mount behind.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pwd
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

from ociworker.core.doctor import Facts, Probe, Runtime, Tool, diagnose

# Where a tool may be when PATH is a user's short one (runuser, cron, systemd units).
_FALLBACK_DIRS = ("/usr/local/bin", "/usr/bin", "/bin", "/usr/sbin", "/sbin")
_SYSCTLS = (
    "kernel.unprivileged_userns_clone",
    "user.max_user_namespaces",
    "kernel.apparmor_restrict_unprivileged_userns",
)
_PROBE_TIMEOUT = 30


def cmd_doctor(args: argparse.Namespace) -> int:
    report = diagnose(gather())
    print(report.to_json() if args.format == "json" else report.render(), end="")
    if args.format == "json":
        print()
    return report.exit_code


def gather() -> Facts:
    uid = os.geteuid()
    rootless = uid != 0
    try:
        user = pwd.getpwuid(uid).pw_name
    except KeyError:  # a uid with no passwd entry (containers): subid files may name it
        user = str(uid)
    return Facts(
        uid=uid,
        user=user,
        subuid=_read("/etc/subuid"),
        subgid=_read("/etc/subgid"),
        newuidmap=_tool("newuidmap"),
        newgidmap=_tool("newgidmap"),
        sysctls=_sysctls(),
        userns=_probe(["unshare", "--user", "--map-root-user", "--mount", "true"])
        if rootless
        else None,
        idmap=_idmap_probe() if rootless else None,
        overlay=_overlay_probe(rootless),
        fuse_overlayfs=_which("fuse-overlayfs"),
        dev_fuse=_device("/dev/fuse"),
        cgroup_fs=_fstype("/sys/fs/cgroup"),
        unified_controllers=_read("/sys/fs/cgroup/unified/cgroup.controllers"),
        delegated=_read(f"{_user_service(uid)}/cgroup.controllers") if rootless else None,
        delegated_writable=rootless and os.access(_user_service(uid), os.W_OK),
        runtimes=tuple(_runtime(n) for n in ("runc", "crun")),
        pasta=_which("pasta"),
        slirp4netns=_which("slirp4netns"),
        dev_tun=_device("/dev/net/tun"),
        nft=_which("nft"),
        dockerenv=os.path.exists("/.dockerenv"),
        containerenv=os.path.exists("/run/.containerenv"),
        init_cgroup=_read("/proc/1/cgroup"),
        mountinfo=_read("/proc/self/mountinfo") or "",
        proc_status=_read("/proc/self/status"),
        cgroup_writable=_writable_mount("/sys/fs/cgroup"),
        state_dir=_state_dir(rootless),
        state_path=_existing(_state_dir(rootless)),
        default_route=_default_route(),
    )


def _default_route() -> bool | None:
    """A default route in this network namespace (IPv4 or IPv6); None if unknown."""
    v4, v6 = _read("/proc/net/route"), _read("/proc/net/ipv6_route")
    if v4 is None and v6 is None:
        return None
    # /proc/net/route: Iface Destination Gateway ...; ipv6_route: dest prefix-len ... dev.
    if any(ln.split()[1:2] == ["00000000"] for ln in (v4 or "").splitlines()[1:]):
        return True
    return any(
        ln.split()[:2] == ["0" * 32, "00"] and ln.split()[-1] != "lo"
        for ln in (v6 or "").splitlines()
    )


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None


def _which(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    for d in _FALLBACK_DIRS:
        p = os.path.join(d, name)
        if os.access(p, os.X_OK):
            return p
    return None


def _tool(name: str) -> Tool | None:
    path = _which(name)
    if path is None:
        return None
    st = os.stat(path)
    try:
        has_caps = bool(os.getxattr(path, "security.capability"))
    except OSError:
        has_caps = False
    return Tool(path, st.st_mode, st.st_uid, has_caps)


def _sysctls() -> dict[str, str]:
    out: dict[str, str] = {}
    for name in _SYSCTLS:
        text = _read("/proc/sys/" + name.replace(".", "/"))
        if text is not None:
            out[name] = text.strip()
    return out


def _run(argv: Sequence[str], cwd: str | None = None) -> subprocess.CompletedProcess[str] | str:
    """The finished process, or why it could not run."""
    try:
        return subprocess.run(
            list(argv),
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=_PROBE_TIMEOUT,
            stdin=subprocess.DEVNULL,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return str(exc)


def _probe(argv: Sequence[str], cwd: str | None = None) -> Probe:
    proc = _run(argv, cwd)
    if isinstance(proc, str):
        return Probe(False, proc)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
        return Probe(False, last)
    return Probe(True, proc.stdout.strip())


def _idmap_probe() -> Probe | None:
    help_text = _run(["unshare", "--help"])
    if isinstance(help_text, str) or "--map-auto" not in help_text.stdout:
        return None  # util-linux < 2.38 cannot map subordinate ranges itself
    script = "cat /proc/self/uid_map; echo --; cat /proc/self/gid_map"
    return _probe(["unshare", "--user", "--map-auto", "--map-root-user", "sh", "-c", script])


# Mounts the overlay a build would (relative dirs, from the probe's own dir), deletes a lower
# file through it and looks for the whiteout that a layer diff reads: mounting alone is not
# enough (without userxattr, a user namespace mounts but cannot whiteout on older kernels).
_OVERLAY_SCRIPT = """set -e
mount -t overlay overlay -o "lowerdir=lower,upperdir=upper,workdir=work$1" merged
rm merged/f
test -c upper/f || { echo "no whiteout in the upper dir after a delete" >&2; exit 1; }
echo mounted
"""


def _overlay_probe(rootless: bool) -> Probe:
    unshare = ["unshare", "--user", "--map-root-user", "--mount"] if rootless else ["unshare", "-m"]
    # In a user namespace the overlay xattrs must be user.* ones (Linux >= 5.11).
    variants = (",userxattr", "") if rootless else ("",)
    base = tempfile.mkdtemp(prefix="ociworker-doctor-", dir=_probe_parent(rootless))
    try:
        for sub in ("lower", "upper", "work", "merged"):
            os.mkdir(os.path.join(base, sub))
        failures: list[str] = []
        for opts in variants:
            _reset(base)
            probe = _probe([*unshare, "sh", "-c", _OVERLAY_SCRIPT, "sh", opts], cwd=base)
            if probe.ok:
                return Probe(True, f"options {opts.lstrip(',') or 'default'}")
            failures.append(probe.detail)
        return Probe(False, "; ".join(dict.fromkeys(failures)))
    finally:
        _remove(base)


def _reset(base: str) -> None:
    for sub in ("upper", "work"):
        _remove(os.path.join(base, sub))
        os.mkdir(os.path.join(base, sub))
    Path(base, "lower", "f").write_text("lower\n")


def _remove(path: str) -> None:
    # overlayfs leaves work/work mode 000: make each dir ours to empty before removing it.
    for root, dirs, _ in os.walk(path):
        for d in dirs:
            with contextlib.suppress(OSError):
                os.chmod(os.path.join(root, d), 0o700)
    shutil.rmtree(path, ignore_errors=True)


def _writable_mount(path: str) -> bool:
    """The filesystem at ``path`` is mounted read-write (whether this user may write
    there is another matter: a user never may, and still runs builds)."""
    try:
        return not os.statvfs(path).f_flag & os.ST_RDONLY
    except OSError:
        return False


def _state_dir(rootless: bool) -> str:
    if rootless:
        data = os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share")
        return os.path.join(data, "ociworker")
    return os.environ.get("OCIWORKER_ROOT") or "/var/lib/ociworker"


def _existing(path: str) -> str:
    """``path``'s nearest existing ancestor, symlinks resolved: the mount the state dir
    will be made on."""
    p = os.path.abspath(path)
    while not os.path.exists(p) and p != "/":
        p = os.path.dirname(p)
    return os.path.realpath(p)


def _probe_parent(rootless: bool) -> str | None:
    """The state dir's parent when it exists, so the probe tries the filesystem builds
    will use; else the temp dir."""
    root = _state_dir(rootless)
    candidates = [root, os.path.dirname(root)]
    for c in candidates:
        if os.path.isdir(c) and os.access(c, os.W_OK | os.X_OK):
            return c
    return None


def _device(path: str) -> Probe:
    """Whether this user can open the device ``path`` read-write (inside a user namespace
    only the file's mode counts, so this is what a rootless worker gets too)."""
    try:
        st = os.stat(path)
    except OSError as exc:
        return Probe(False, f"{path}: {exc.strerror}")
    if not os.access(path, os.R_OK | os.W_OK):
        owner = _user_name(st.st_uid)
        return Probe(False, f"{path} is {stat.filemode(st.st_mode)} {owner}")
    return Probe(True)


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _fstype(mountpoint: str) -> str:
    fstype = ""
    for line in (_read("/proc/self/mounts") or "").splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[1] == mountpoint:
            fstype = parts[2]  # the last mount on a point is the one that shows
    return fstype


def _user_service(uid: int) -> str:
    return f"/sys/fs/cgroup/user.slice/user-{uid}.slice/user@{uid}.service"


def _runtime(name: str) -> Runtime:
    path = _which(name)
    if path is None:
        return Runtime(name, None)
    proc = _run([path, "--version"])
    out = proc if isinstance(proc, str) else proc.stdout + proc.stderr
    return Runtime(name, path, out)
