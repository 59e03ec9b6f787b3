"""``ociworker doctor``: can builds run on this host, as this user, and if not, what fixes it.

Pure: the CLI shell (``cli.doctor``) gathers the facts (file contents, sysctls, tool
versions, the outcome of a real mount in a throwaway namespace) into a ``Facts`` value;
``diagnose`` turns them into checks, each ``ok``, ``warn`` or ``FAIL`` with the commands that
fix it. A FAIL means a default ``ociworker build`` cannot run; a warning means it runs, slower
or with less (a slower snapshotter, no cgroup limits, one runtime of two).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from enum import Enum

from ociworker.core.cgroupdelegation import DELEGATE_FIX, SCOPE_FIX, WANTED
from ociworker.core.idmap import SUBID_MIN, parse_subid, ranges_of, subid_fix

OK, WARN, FAIL = "ok", "warn", "FAIL"

#: The floor BuildKit's rootless docs give: runc >= v1.0.0-rc91 (with crun as the way out for
#: hosts without it). BuildKit names no minimum for crun, so neither do we: its version is
#: reported, and the one crun problem we know of (hybrid cgroups) is its own check.
RUNC_MIN = (1, 0, 0, 91)


class Mode(Enum):
    ROOT = "root"
    ROOTLESS = "rootless"


@dataclass(frozen=True)
class Check:
    name: str
    status: str  # OK | WARN | FAIL
    detail: str
    fixes: tuple[str, ...] = ()


@dataclass(frozen=True)
class Tool:
    """An executable as found on PATH: its mode bits, owner and whether it has file caps."""

    path: str
    mode: int = 0o755
    owner: int = 0
    has_caps: bool = False


@dataclass(frozen=True)
class Probe:
    """The outcome of really trying something (a namespace, a mount)."""

    ok: bool
    detail: str = ""


@dataclass(frozen=True)
class Runtime:
    name: str
    path: str | None
    version_output: str = ""


@dataclass(frozen=True)
class Facts:
    uid: int
    user: str
    #: file text, or None when the file does not exist
    subuid: str | None = None
    subgid: str | None = None
    newuidmap: Tool | None = None
    newgidmap: Tool | None = None
    #: sysctl name -> value; a name the kernel does not have is absent
    sysctls: dict[str, str] = field(default_factory=dict)
    #: ``unshare`` as this user into a user + mount namespace (rootless only)
    userns: Probe | None = None
    #: a user namespace mapped through newuidmap/newgidmap from the subid files (``unshare
    #: --map-auto``); its detail is the namespace's uid_map, ``--``, its gid_map. None: not tried
    idmap: Probe | None = None
    #: kernel overlay mounted (and a whiteout made) in a throwaway (user) namespace
    overlay: Probe = Probe(False, "not tried")
    fuse_overlayfs: str | None = None
    #: /dev/fuse exists and this user can open it read-write
    dev_fuse: Probe = Probe(False, "not tried")
    #: filesystem type mounted on /sys/fs/cgroup (cgroup2: pure v2; tmpfs: v1 or hybrid)
    cgroup_fs: str = "cgroup2"
    #: /sys/fs/cgroup/unified/cgroup.controllers on a hybrid host, None if not mounted
    unified_controllers: str | None = None
    #: cgroup.controllers of the user's systemd service cgroup (rootless on v2), None if absent
    delegated: str | None = None
    delegated_writable: bool = False
    runtimes: tuple[Runtime, ...] = ()
    pasta: str | None = None
    slirp4netns: str | None = None
    #: /dev/net/tun exists and this user can open it read-write (pasta and slirp4netns need it)
    dev_tun: Probe = Probe(True)
    nft: str | None = "/usr/sbin/nft"
    # --- the container case: what a privileged CI container has or lacks --------------
    #: /.dockerenv exists (Docker Engine puts it in every container)
    dockerenv: bool = False
    #: /run/.containerenv exists (podman, buildah)
    containerenv: bool = False
    #: /proc/1/cgroup: the cgroup paths of this namespace's init, None if unreadable
    init_cgroup: str | None = None
    #: /proc/self/mountinfo; "" when unknown (then the checks that need it are left out)
    mountinfo: str = ""
    #: /proc/self/status: capability sets and the seccomp mode; None if unreadable
    proc_status: str | None = None
    #: /sys/fs/cgroup is mounted read-write (statvfs: no ST_RDONLY)
    cgroup_writable: bool = True
    #: the state dir as configured, and the path whose mount holds it (its nearest existing
    #: ancestor, symlinks resolved): the filesystem snapshots' upper dirs are made on
    state_dir: str = "/var/lib/ociworker"
    state_path: str = "/var/lib/ociworker"
    #: /proc/net/route and /proc/net/ipv6_route hold a default route; None: unknown
    default_route: bool | None = None

    @property
    def mode(self) -> Mode:
        return Mode.ROOT if self.uid == 0 else Mode.ROOTLESS


@dataclass(frozen=True)
class Report:
    mode: Mode
    user: str
    uid: int
    checks: tuple[Check, ...]

    @property
    def ready(self) -> bool:
        """Builds can run: no check failed (warnings allowed)."""
        return all(c.status != FAIL for c in self.checks)

    @property
    def exit_code(self) -> int:
        return 0 if self.ready else 1

    def render(self) -> str:
        width = max((len(c.name) for c in self.checks), default=0)
        lines: list[str] = []
        for c in self.checks:
            lines.append(f"{c.status:<4}  {c.name:<{width}}  {c.detail}")
            lines.extend(f"      fix: {fix}" for fix in c.fixes)
        who = (
            f"rootless, as {self.user} (uid {self.uid})"
            if self.mode is Mode.ROOTLESS
            else "as root"
        )
        if self.ready:
            warns = sum(c.status == WARN for c in self.checks)
            lines.append(f"builds can run ({who}; {warns} warning{'s' * (warns != 1)})")
        else:
            lines.append(f"builds cannot run ({who}): run the fix lines above")
        return "\n".join(lines) + "\n"

    def to_json(self) -> str:
        return json.dumps(
            {
                "mode": self.mode.value,
                "user": self.user,
                "uid": self.uid,
                "ready": self.ready,
                "checks": [
                    {"name": c.name, "status": c.status, "detail": c.detail, "fix": list(c.fixes)}
                    for c in self.checks
                ],
            },
            indent=2,
        )


# --- subordinate ids --------------------------------------------------------------


def check_subid(kind: str, facts: Facts) -> Check:
    """``kind`` is "uid" or "gid"."""
    path = f"/etc/sub{kind}"
    text = facts.subuid if kind == "uid" else facts.subgid
    fix = "sudo " + subid_fix(kind, facts.user, facts.uid, facts.subuid, facts.subgid)
    if text is None:
        return Check(f"sub{kind}", FAIL, f"{path} does not exist: no ids to map", (fix,))
    mine = ranges_of(parse_subid(text), facts.user, facts.uid)
    if not mine:
        return Check(
            f"sub{kind}",
            FAIL,
            f"no range for {facts.user} (uid {facts.uid}) in {path}: "
            "image files owned by other ids cannot be unpacked",
            (fix,),
        )
    # newuidmap is given one range: the worker (and ``unshare --map-auto``) map the user's
    # first one, so that one must hold every id an image uses.
    head, more = mine[0], len(mine) - 1
    where = f"{head.start}-{head.end - 1}"
    if head.count < SUBID_MIN:
        return Check(
            f"sub{kind}",
            FAIL,
            f"the first range of {facts.user} in {path} ({where}) holds {head.count} ids; "
            f"the worker maps the first range, which must hold {SUBID_MIN}",
            (fix,),
        )
    also = f"; {more} more range{'s' * (more != 1)} unused" if more else ""
    return Check(
        f"sub{kind}", OK, f"{facts.user} has {head.count} subordinate {kind}s ({where}){also}"
    )


def check_idtool(name: str, tool: Tool | None) -> Check:
    if tool is None:
        return Check(name, FAIL, f"{name} is not installed", ("sudo apt-get install uidmap",))
    setuid_root = bool(tool.mode & 0o4000) and tool.owner == 0
    if setuid_root:
        return Check(name, OK, f"{tool.path} (setuid root)")
    if tool.has_caps:
        return Check(name, OK, f"{tool.path} (file capabilities)")
    cap = "cap_setuid" if name == "newuidmap" else "cap_setgid"
    return Check(
        name,
        FAIL,
        f"{tool.path} is neither setuid root nor has {cap}: it cannot write the id map",
        (f"sudo setcap {cap}+ep {tool.path}",),
    )


def mapped_ids(id_map: str) -> int:
    """How many ids a /proc/PID/uid_map (or gid_map) maps."""
    total = 0
    for line in id_map.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[2].isdigit():
            total += int(parts[2])
    return total


def check_idmap(facts: Facts) -> Check | None:
    """The whole chain a rootless build starts with, really tried: newuidmap and newgidmap
    mapping this user's subordinate ranges into a new user namespace."""
    if facts.idmap is None:
        return None
    if not facts.idmap.ok:
        return Check(
            "idmap", FAIL, f"newuidmap/newgidmap cannot map the ranges: {facts.idmap.detail}"
        )
    uid_map, _, gid_map = facts.idmap.detail.partition("--")
    uids, gids = mapped_ids(uid_map), mapped_ids(gid_map)
    if min(uids, gids) < SUBID_MIN:
        return Check(
            "idmap",
            FAIL,
            f"a user namespace maps only {uids} uids and {gids} gids (want {SUBID_MIN}): "
            "the first subordinate range must hold them all",
        )
    return Check("idmap", OK, f"a user namespace maps {uids} uids and {gids} gids")


# --- user namespaces --------------------------------------------------------------

_CLONE = "kernel.unprivileged_userns_clone"
_MAX_NS = "user.max_user_namespaces"
_APPARMOR = "kernel.apparmor_restrict_unprivileged_userns"


def _sysctl_fixes(name: str, value: str) -> tuple[str, ...]:
    return (
        f"sudo sysctl -w {name}={value}",
        f"echo {name}={value} | sudo tee /etc/sysctl.d/50-ociworker-rootless.conf",
    )


def check_userns(facts: Facts) -> Check:
    s = facts.sysctls
    if s.get(_CLONE) == "0":
        return Check("userns", FAIL, f"{_CLONE} = 0", _sysctl_fixes(_CLONE, "1"))
    if s.get(_MAX_NS) == "0":
        return Check("userns", FAIL, f"{_MAX_NS} = 0", _sysctl_fixes(_MAX_NS, "28633"))
    probe = facts.userns or Probe(False, "not tried")
    if probe.ok:
        extra = (
            " (AppArmor restricts them, but not for this user)" if s.get(_APPARMOR) == "1" else ""
        )
        return Check("userns", OK, f"user namespaces work{extra}")
    if s.get(_APPARMOR) == "1":
        # Ubuntu >= 23.10: unshare succeeds but the namespace has no capabilities.
        return Check(
            "userns",
            FAIL,
            f"AppArmor restricts unprivileged user namespaces ({_APPARMOR} = 1): {probe.detail}",
            _sysctl_fixes(_APPARMOR, "0"),
        )
    return Check("userns", FAIL, f"cannot create a user namespace: {probe.detail}")


# --- snapshots ----------------------------------------------------------------------


def check_overlay(facts: Facts) -> Check:
    where = "in a user namespace" if facts.mode is Mode.ROOTLESS else "in a mount namespace"
    if facts.overlay.ok:
        return Check("overlay", OK, f"kernel overlayfs mounts {where} ({facts.overlay.detail})")
    if facts.mode is Mode.ROOT:
        return Check(
            "overlay",
            WARN,
            f"kernel overlayfs does not mount: {facts.overlay.detail}; "
            "builds use the native snapshotter (copies every layer)",
            ("sudo modprobe overlay",),
        )
    return Check(
        "overlay",
        WARN,
        f"kernel overlayfs does not mount {where}: {facts.overlay.detail} (needs Linux >= 5.11)",
    )


#: Whether the rootless worker's ``--snapshotter auto`` falls back to fuse-overlayfs before
#: native: it does (snapshot.open_snapshotter); False makes doctor report fuse-overlayfs
#: without promising it.
WORKER_USES_FUSE_OVERLAYFS = True


def fuse_usable(facts: Facts) -> bool:
    return facts.fuse_overlayfs is not None and facts.dev_fuse.ok


def check_fuse(facts: Facts) -> Check:
    needed = not facts.overlay.ok
    if fuse_usable(facts):
        why = "" if needed else " (not needed: kernel overlayfs works)"
        if needed and not WORKER_USES_FUSE_OVERLAYFS:
            why = " (the worker does not use it yet: builds take the native snapshotter)"
        return Check("fuse-overlayfs", OK, f"{facts.fuse_overlayfs}, /dev/fuse usable{why}")
    problem = (
        "fuse-overlayfs is not installed"
        if facts.fuse_overlayfs is None
        else f"/dev/fuse is not usable: {facts.dev_fuse.detail}"
    )
    fix = (
        "sudo apt-get install fuse-overlayfs"
        if facts.fuse_overlayfs is None
        else "sudo chmod 0666 /dev/fuse"
    )
    if not needed:
        return Check("fuse-overlayfs", OK, f"{problem} (not needed: kernel overlayfs works)")
    return Check("fuse-overlayfs", WARN, problem, (fix,))


def auto_snapshotter(facts: Facts) -> str:
    """What ``--snapshotter auto`` would take here."""
    if facts.overlay.ok:
        return "overlayfs"
    if facts.mode is Mode.ROOTLESS and WORKER_USES_FUSE_OVERLAYFS and fuse_usable(facts):
        return "fuse-overlayfs"
    return "native"


def check_snapshotter(facts: Facts) -> Check:
    pick = auto_snapshotter(facts)
    if pick == "native":
        return Check(
            "snapshotter",
            WARN,
            "auto picks native: every step copies its whole filesystem (slow, more disk)",
        )
    return Check("snapshotter", OK, f"auto picks {pick}")


# --- cgroups and runtimes ---------------------------------------------------------


def cgroup_mode(facts: Facts) -> str:
    if facts.cgroup_fs == "cgroup2":
        return "v2"
    return "hybrid" if facts.unified_controllers is not None else "v1"


def check_cgroups(facts: Facts) -> Check:
    mode = cgroup_mode(facts)
    if facts.mode is Mode.ROOT:
        return Check("cgroups", OK, f"cgroup {mode}: step limits apply")
    if mode != "v2":
        return Check(
            "cgroups",
            WARN,
            f"cgroup {mode}: no cgroup is delegated to users, so rootless RUN steps run "
            "without --step-memory/--step-pids/--step-cpus limits (needs cgroup v2: boot "
            "with systemd.unified_cgroup_hierarchy=1)",
        )
    have = set((facts.delegated or "").split())
    missing = [c for c in WANTED if c not in have]
    if facts.delegated is None or not facts.delegated_writable:
        return Check(
            "cgroups",
            WARN,
            f"no cgroup is delegated to {facts.user} (user@{facts.uid}.service missing or not "
            "writable): rootless RUN steps run without limits",
            (DELEGATE_FIX,),
        )
    if missing:
        return Check(
            "cgroups",
            WARN,
            f"user@{facts.uid}.service is delegated without {', '.join(missing)}: "
            "those step limits do not apply",
            (DELEGATE_FIX,),
        )
    # The worker uses the cgroup it starts in (core.cgroupdelegation): a login session's
    # scope is root's, so the check says how to start it in a delegated one.
    return Check(
        "cgroups",
        OK,
        f"cgroup v2, delegated to {facts.user}: {' '.join(sorted(have))} (a build uses it "
        f"when started in a cgroup of its own: {SCOPE_FIX})",
    )


_VERSION = re.compile(r"version\s+v?(\d+)\.(\d+)(?:\.(\d+))?(?:-rc\.?(\d+))?")


def parse_version(output: str) -> tuple[int, int, int, int] | None:
    """``runc --version`` / ``crun --version`` -> (major, minor, patch, rc); a release sorts
    after its release candidates (rc = a large number)."""
    m = _VERSION.search(output)
    if m is None:
        return None
    rc = int(m.group(4)) if m.group(4) else 1 << 30
    return int(m.group(1)), int(m.group(2)), int(m.group(3) or 0), rc


def _version_text(v: tuple[int, int, int, int]) -> str:
    base = f"{v[0]}.{v[1]}.{v[2]}"
    return base if v[3] == 1 << 30 else f"{base}-rc{v[3]}"


def crun_hybrid_controllers(facts: Facts) -> list[str]:
    """Controllers still on the v2 hierarchy of a hybrid host: crun (1.8) refuses to run
    there ("cgroups in hybrid mode not supported, drop all controllers from cgroupv2")."""
    if cgroup_mode(facts) != "hybrid":
        return []
    return (facts.unified_controllers or "").split()


def _runtime_usable(rt: Runtime, facts: Facts) -> bool:
    v = parse_version(rt.version_output)
    if rt.path is None or v is None:
        return False
    if rt.name == "runc":
        return v >= RUNC_MIN
    return not crun_hybrid_controllers(facts)


def check_runtimes(facts: Facts) -> list[Check]:
    usable = [rt.name for rt in facts.runtimes if _runtime_usable(rt, facts)]
    # One working runtime is enough to build; the other only matters for --runtime.
    severity = WARN if usable else FAIL
    out: list[Check] = []
    for rt in facts.runtimes:
        v = parse_version(rt.version_output)
        if rt.path is None:
            out.append(
                Check(rt.name, severity, "not installed", (f"sudo apt-get install {rt.name}",))
            )
        elif v is None:
            first = rt.version_output.strip().splitlines()[:1]
            out.append(
                Check(rt.name, severity, f"{rt.path}: no version in --version output {first}")
            )
        elif rt.name == "runc" and v < RUNC_MIN:
            out.append(
                Check(
                    rt.name,
                    severity,
                    f"{rt.path} is {_version_text(v)}; BuildKit needs >= 1.0.0-rc91",
                    ("sudo apt-get install --only-upgrade runc",),
                )
            )
        else:
            want = " (>= 1.0.0-rc91)" if rt.name == "runc" else ""
            out.append(Check(rt.name, OK, f"{rt.path} version {_version_text(v)}{want}"))
    crun = next((rt for rt in facts.runtimes if rt.name == "crun" and rt.path), None)
    hybrid = crun_hybrid_controllers(facts)
    if crun is not None:
        out.append(_check_crun_cgroups(hybrid, FAIL if not usable else WARN))
    return out


def _check_crun_cgroups(controllers: list[str], severity: str) -> Check:
    if not controllers:
        return Check("crun-cgroups", OK, "no controller on the v2 side of a hybrid host")
    mounts = " && ".join(
        f"sudo mkdir -p /sys/fs/cgroup/{c} && sudo mount -t cgroup -o {c} cgroup /sys/fs/cgroup/{c}"
        for c in controllers
    )
    return Check(
        "crun-cgroups",
        severity,
        f"hybrid cgroups with {', '.join(controllers)} on the v2 hierarchy: crun refuses to run "
        '("drop all controllers from cgroupv2"); moving each to a v1 hierarchy fixes it '
        "(scripts/setup-host does this)",
        (mounts,),
    )


def check_network(facts: Facts) -> Check:
    # --network default is a bridge of the worker's own, fenced by nftables, for root and
    # rootless alike (a rootless worker builds it inside its network namespace).
    if facts.nft is None:
        return Check(
            "network",
            FAIL,
            "nft is not installed: --network default cannot fence its bridge",
            ("sudo apt-get install nftables",),
        )
    if facts.mode is Mode.ROOT:
        return Check("network", OK, f"--network default via a bridge and nftables ({facts.nft})")
    found = [
        f"{n} ({p})" for n, p in (("pasta", facts.pasta), ("slirp4netns", facts.slirp4netns)) if p
    ]
    if not found:
        return Check(
            "network",
            FAIL,
            "neither pasta nor slirp4netns is installed: rootless --network default has no way out",
            ("sudo apt-get install passt",),
        )
    if facts.pasta and facts.default_route is False:
        # pasta copies the addresses and routes of the interface with the default route; a
        # namespace without one (docker run --network=none) leaves it nothing to copy.
        return Check(
            "network",
            FAIL,
            f"pasta ({facts.pasta}) needs an interface with a default route to copy and this "
            "network namespace has none (a --network=none container?): rootless --network "
            'default fails ("No external routable interface")',
            (
                "give the container a network (no --network=none), or a default route: "
                "ip link add uplink type veth peer name uplink-peer && ip link set uplink-peer up"
                " && ip link set uplink up && ip addr add 192.0.2.2/24 dev uplink"
                " && ip route add default via 192.0.2.1",
            ),
        )
    if not facts.dev_tun.ok:
        # Both open /dev/net/tun inside the user's namespace, where only the file's mode
        # counts: root's alone (no udev: containers, minimal VMs), it is closed to them.
        fix = (
            "sudo modprobe tun"
            if "No such file" in facts.dev_tun.detail
            else "sudo chmod 0666 /dev/net/tun"
        )
        return Check(
            "network",
            FAIL,
            f"{', '.join(found)} cannot open /dev/net/tun: {facts.dev_tun.detail}",
            (fix,),
        )
    return Check("network", OK, "--network default via " + ", ".join(found))


# --- in a container ------------------------------------------------------------------

#: capability(7) number of CAP_SYS_ADMIN: mount(2), which every build step needs
CAP_SYS_ADMIN = 21
#: the filesystems an overlay upper dir cannot be on (the kernel refuses it as upperdir)
_STACKED = ("overlay", "fuse.fuse-overlayfs", "aufs")
_CONTAINER_CGROUPS = ("docker", "kubepods", "libpod", "containerd", "lxc", "buildkit")


@dataclass(frozen=True)
class Mount:
    point: str
    fstype: str
    #: the mount's own options (ro/rw are here), then the superblock's
    options: tuple[str, ...]
    #: the dir of the filesystem mounted there ("/": its root; a bind shows its subdir)
    root: str = "/"

    @property
    def read_only(self) -> bool:
        return "ro" in self.options


def _unescape(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash in paths as octal escapes."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def parse_mountinfo(text: str) -> list[Mount]:
    """/proc/PID/mountinfo -> its mounts, in order (a later mount on a point hides earlier)."""
    out: list[Mount] = []
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if not sep or len(fields) < 6 or len(tail) < 1:
            continue
        supers = tuple(tail[2].split(",")) if len(tail) >= 3 else ()
        out.append(
            Mount(
                _unescape(fields[4]),
                tail[0],
                (*fields[5].split(","), *supers),
                _unescape(fields[3]),
            )
        )
    return out


def mount_of(path: str, mounts: list[Mount]) -> Mount | None:
    """The mount ``path`` is on: the deepest mount point above it, the last one mounted
    there (the one that shows)."""
    best: Mount | None = None
    for m in mounts:
        point = m.point.rstrip("/") or "/"
        inside = path == point or path.startswith(point if point == "/" else point + "/")
        if inside and (best is None or len(point) >= len(best.point.rstrip("/") or "/")):
            best = m
    return best


def container_hints(facts: Facts) -> tuple[str, ...]:
    """What says this process runs in a container (empty: nothing does)."""
    hints: list[str] = []
    if facts.dockerenv:
        hints.append("/.dockerenv")
    if facts.containerenv:
        hints.append("/run/.containerenv")
    for line in (facts.init_cgroup or "").splitlines():
        path = line.split(":", 2)[-1]
        found = next((n for n in _CONTAINER_CGROUPS if n in path), None)
        if found:
            hints.append(f"{found} in /proc/1/cgroup")
            break
    root = mount_of("/", parse_mountinfo(facts.mountinfo))
    if root is not None and root.fstype in _STACKED:
        hints.append(f"/ is {root.fstype}")
    return tuple(hints)


def _status_field(status: str | None, name: str) -> str | None:
    for line in (status or "").splitlines():
        key, _, value = line.partition(":")
        if key == name:
            return value.strip()
    return None


def has_capability(status: str | None, cap: int, which: str = "CapBnd") -> bool | None:
    """Whether the capability set ``which`` of /proc/self/status holds ``cap``; None if
    the file says nothing. The bounding set is what the container was given, whatever the
    uid of this process (root's effective set is the same; a user's is empty)."""
    value = _status_field(status, which)
    if value is None:
        return None
    return bool(int(value, 16) >> cap & 1)


def seccomp_mode(status: str | None) -> int | None:
    """0: no seccomp, 1: strict, 2: a filter (Docker's default profile is one)."""
    value = _status_field(status, "Seccomp")
    return int(value) if value is not None and value.isdigit() else None


_PRIVILEGED_FIX = "docker run --privileged ... (podman run --privileged, or a Kubernetes "
_PRIVILEGED_FIX += "securityContext: {privileged: true})"


def check_privileged(facts: Facts) -> Check:
    admin = has_capability(facts.proc_status, CAP_SYS_ADMIN)
    seccomp = seccomp_mode(facts.proc_status)
    if admin is False:
        return Check(
            "privileged",
            FAIL,
            "the container has no CAP_SYS_ADMIN (not in the bounding set): no step can mount "
            "its filesystems",
            (_PRIVILEGED_FIX,),
        )
    if seccomp == 2:
        return Check(
            "privileged",
            WARN,
            "a seccomp filter is on (Seccomp: 2): the runtimes' own syscalls (mount, "
            "unshare, pivot_root, keyctl) may be refused",
            (_PRIVILEGED_FIX + " or --security-opt seccomp=unconfined",),
        )
    caps = "CAP_SYS_ADMIN" if admin else "capabilities unknown"
    filt = {0: "no seccomp filter", 1: "strict seccomp"}.get(seccomp or 0, "")
    return Check("privileged", OK, f"{caps}, {filt}".rstrip(", "))


def check_cgroup_mounts(facts: Facts) -> Check:
    mounts = [
        m
        for m in parse_mountinfo(facts.mountinfo)
        if m.fstype in ("cgroup", "cgroup2")
        and (m.point == "/sys/fs/cgroup" or m.point.startswith("/sys/fs/cgroup/"))
    ]
    # Root's steps get a cgroup each (the runtime makes it); rootless ones run without.
    severity = FAIL if facts.mode is Mode.ROOT else WARN
    if not mounts:
        return Check(
            "cgroup-mounts",
            severity,
            "no cgroup filesystem under /sys/fs/cgroup: the runtimes cannot make a step's cgroup",
            (_PRIVILEGED_FIX,),
        )
    ro = sorted({m.point for m in mounts if m.read_only})
    if ro or not facts.cgroup_writable:
        where = ", ".join(ro) or "/sys/fs/cgroup"
        return Check(
            "cgroup-mounts",
            severity,
            f"cgroups mounted read-only ({where}): the runtimes cannot make a step's cgroup",
            (_PRIVILEGED_FIX + " (it mounts /sys/fs/cgroup read-write)",),
        )
    if all(m.root != "/" for m in mounts):
        # cgroup v1 without a cgroup namespace: each hierarchy is a bind of the container's
        # own cgroup, which the worker does not take as a place for its step cgroups.
        return Check(
            "cgroup-mounts",
            WARN,
            f"the cgroup mounts are binds of this container's own cgroup ({mounts[0].root} on "
            f"{mounts[0].point}; no cgroup namespace): no step cgroup can be made, so RUN "
            "steps run without --step-* limits or accounting",
            ("docker run --cgroupns=private ... (podman run --cgroupns=private)",),
        )
    kinds = sorted({m.fstype for m in mounts})
    n = len({m.point for m in mounts})
    return Check(
        "cgroup-mounts",
        OK,
        f"{n} {'/'.join(kinds)} mount{'s' * (n != 1)} under /sys/fs/cgroup, writable",
    )


def check_dev_fuse(facts: Facts) -> Check:
    if facts.dev_fuse.ok:
        return Check("dev-fuse", OK, "/dev/fuse usable")
    # Only fuse-overlayfs needs it, and only a rootless worker where kernel overlayfs fails.
    needed = facts.mode is Mode.ROOTLESS and not facts.overlay.ok
    return Check(
        "dev-fuse",
        WARN if needed else OK,
        f"{facts.dev_fuse.detail}"
        + ("" if needed else " (not needed: kernel overlayfs snapshots need no fuse)"),
        ("docker run --device /dev/fuse ... (or --privileged)",) if needed else (),
    )


def check_state_fs(facts: Facts) -> Check | None:
    """An overlay's upper dir cannot be on overlayfs: a state dir on the container's own
    root (overlay on overlay) gets no kernel overlay snapshots."""
    if not facts.mountinfo:
        return None
    m = mount_of(facts.state_path, parse_mountinfo(facts.mountinfo))
    if m is None:
        return None
    where = f"{facts.state_dir} is on {m.fstype} ({m.point})"
    if m.fstype in _STACKED:
        name = "ociworker-state"
        return Check(
            "state-fs",
            FAIL,
            f"{where}: an overlay upper dir cannot be on {m.fstype} (overlay on overlay), "
            "so no snapshot can be an overlay",
            (
                f"mount a volume or tmpfs at {facts.state_dir}: "
                f"docker run -v {name}:{facts.state_dir} ... "
                f"(or --tmpfs {facts.state_dir}, "
                f"or RUN --mount=type=tmpfs,target={facts.state_dir})",
            ),
        )
    return Check("state-fs", OK, where)


def container_checks(facts: Facts) -> list[Check]:
    hints = container_hints(facts)
    if not hints:
        return []
    return [
        Check("container", OK, f"in a container ({', '.join(hints)})"),
        check_privileged(facts),
        check_cgroup_mounts(facts),
        check_dev_fuse(facts),
    ]


def diagnose(facts: Facts) -> Report:
    checks: list[Check] = []
    if facts.mode is Mode.ROOTLESS:
        checks += [
            check_subid("uid", facts),
            check_subid("gid", facts),
            check_idtool("newuidmap", facts.newuidmap),
            check_idtool("newgidmap", facts.newgidmap),
            check_userns(facts),
        ]
        # Mapping needs everything above: when one of them failed, that line says what to fix.
        idmap = check_idmap(facts)
        if idmap is not None and all(c.status == OK for c in checks):
            checks.append(idmap)
    state = check_state_fs(facts)
    if state is not None:
        checks.append(state)
    checks.append(check_overlay(facts))
    if facts.mode is Mode.ROOTLESS:
        checks.append(check_fuse(facts))
    checks.append(check_snapshotter(facts))
    checks.append(check_cgroups(facts))
    checks += check_runtimes(facts)
    checks.append(check_network(facts))
    # The container's lines first: what it was not given explains the failures below.
    return Report(facts.mode, facts.user, facts.uid, (*container_checks(facts), *checks))
