"""OCI runtime-spec ``config.json`` for one build step (values in, dict out; only
``uname`` is read, for the seccomp profile, and the worker's own capability set,
for a privileged step).

The defaults are Docker's and containerd's (which BuildKit inherits): the same
capability set, the same /dev, /proc, /sys mounts, the same masked and read-only
paths, so a RUN step behaves as it would under ``docker build``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from ociworker.core.mounts import Mount, is_bind
from ociworker.executor.seccomp import default_profile, guard_ptrace, has_notify, resolve
from ociworker.fs.mount import locked_options

OCI_VERSION = "1.0.2"

DEFAULT_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# Docker's default capability set (moby oci/caps/defaults.go).
DEFAULT_CAPABILITIES: tuple[str, ...] = (
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
)

#: every capability of Linux 5.9+ (CAP_LAST_CAP = CAP_CHECKPOINT_RESTORE): what
#: RUN --security=insecure gets, as ``docker run --privileged``
ALL_CAPABILITIES: tuple[str, ...] = (
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_MKNOD",
    "CAP_LEASE",
    "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP",
    "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN",
    "CAP_SYSLOG",
    "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ",
    "CAP_PERFMON",
    "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
)


def held_capabilities() -> tuple[str, ...]:
    """The capabilities of ``ALL_CAPABILITIES`` in this process's bounding set:
    "all" for a privileged step, as dockerd does (a worker that runs in a
    container may lack some, and the runtime cannot grant what it lacks)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            line = next(ln for ln in f if ln.startswith("CapBnd:"))
    except (OSError, StopIteration):
        return ALL_CAPABILITIES
    mask = int(line.split()[1], 16)
    return tuple(c for bit, c in enumerate(ALL_CAPABILITIES) if mask >> bit & 1)


MASKED_PATHS: tuple[str, ...] = (
    "/proc/asound",
    "/proc/acpi",
    "/proc/interrupts",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
)

READONLY_PATHS: tuple[str, ...] = (
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
)

NOFILE_LIMIT = 1048576


def hosts_content(hostname: str, extra_hosts: tuple[tuple[str, str], ...] = ()) -> str:
    """The container's /etc/hosts: localhost, the hostname on loopback, then each
    ``--add-host`` as ``IP<TAB>NAME`` (as BuildKit writes them)."""
    names = "localhost" if hostname in ("", "localhost") else f"localhost {hostname}"
    out = f"127.0.0.1\t{names}\n::1\tlocalhost ip6-localhost ip6-loopback\n"
    return out + "".join(f"{ip}\t{name}\n" for name, ip in extra_hosts)


#: BuildKit's fallback when filtering leaves no nameserver (moby resolvconf's defaults)
DEFAULT_NAMESERVERS: tuple[str, ...] = ("8.8.8.8", "8.8.4.4")


def _is_localhost(addr: str) -> bool:
    return addr.startswith("127.") or addr in ("::1", "0:0:0:0:0:0:0:1")


def resolv_conf_content(host: str, network: str, nameservers: tuple[str, ...] = ()) -> str:
    """The step's /etc/resolv.conf from the host's, as BuildKit makes it.

    ``host`` network: the host's file as is (its localhost resolver is reachable).
    Otherwise a localhost nameserver would be the step's own loopback, so those
    lines go (resolvconf.FilterResolvDNS); if none is left, Google's public
    resolvers are used. ``nameservers`` (the worker's ``dns`` setting) replace
    the host's nameservers in every mode, keeping its search and options lines.
    """
    if network == "host" and not nameservers:
        return host
    lines = []
    kept = 0
    for line in host.splitlines():
        words = line.split()
        if words[:1] == ["nameserver"]:
            if nameservers or len(words) < 2 or _is_localhost(words[1]):
                continue
            kept += 1
        lines.append(line)
    added = nameservers or (() if kept else DEFAULT_NAMESERVERS)
    lines.extend(f"nameserver {ns}" for ns in added)
    return "\n".join(lines) + "\n"


def _m(destination: str, type_: str, source: str, options: tuple[str, ...]) -> dict[str, Any]:
    return {"destination": destination, "type": type_, "source": source, "options": list(options)}


SYSTEM_MOUNTS: tuple[dict[str, Any], ...] = (
    _m("/proc", "proc", "proc", ("nosuid", "noexec", "nodev")),
    _m("/dev", "tmpfs", "tmpfs", ("nosuid", "strictatime", "mode=755", "size=65536k")),
    _m(
        "/dev/pts",
        "devpts",
        "devpts",
        ("nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"),
    ),
    _m("/dev/shm", "tmpfs", "shm", ("nosuid", "noexec", "nodev", "mode=1777", "size=65536k")),
    _m("/dev/mqueue", "mqueue", "mqueue", ("nosuid", "noexec", "nodev")),
    _m("/sys", "sysfs", "sysfs", ("nosuid", "noexec", "nodev", "ro")),
    _m("/sys/fs/cgroup", "cgroup", "cgroup", ("nosuid", "noexec", "nodev", "relatime", "ro")),
)


@dataclass(frozen=True)
class SpecLimits:
    """``linux.cgroupsPath`` ("" = the runtime's default) and the limits the
    runtime applies to that cgroup (None = none); /dev/shm's size in bytes
    (None: Docker's 64MiB); ``("RLIMIT_NPROC", soft, hard)``... process rlimits
    (a RLIMIT_NOFILE here replaces ``SpecOptions.nofile``)."""

    cgroups_path: str = ""
    memory: int | None = None
    pids: int | None = None
    cpus: float | None = None
    shm_size: int | None = None
    rlimits: tuple[tuple[str, int, int], ...] = ()


@dataclass(frozen=True)
class SpecOptions:
    args: tuple[str, ...]
    env: tuple[str, ...] = ()
    cwd: str = "/"
    uid: int = 0
    gid: int = 0
    additional_gids: tuple[int, ...] = ()
    home: str = "/"
    hostname: str = "buildkitsandbox"
    #: extra mounts, each with its ``target`` inside the container
    mounts: tuple[Mount, ...] = ()
    #: False: the host's network namespace; True: a new one (at ``netns_path`` if set)
    isolated_network: bool = True
    netns_path: str = ""
    #: host files bind-mounted read-only at /etc/resolv.conf and /etc/hosts ("" = none)
    resolv_conf: str = ""
    hosts: str = ""
    root_path: str = "rootfs"
    nofile: int = NOFILE_LIMIT
    limits: SpecLimits = SpecLimits()
    #: RUN --security=insecure: every capability, no seccomp filter, no masked or
    #: read-only paths, every device, writable /sys (``docker run --privileged``)
    privileged: bool = False
    #: ``uname -m`` and ``uname -r`` the seccomp profile is resolved for
    machine: str = ""
    kernel_release: str = ""
    #: the unix socket of the ptrace supervisor (``executor.ptrace_guard``):
    #: attaching ptrace calls are sent there; "" = allowed as Docker's profile
    #: allows them (left to the host's Yama)
    seccomp_listener: str = ""
    #: the runtime runs as root of a user namespace (a rootless worker)
    rootless: bool = False


def process_env(env: tuple[str, ...], home: str) -> list[str]:
    """``env`` plus a default PATH and HOME when the caller set none."""
    out = list(env)
    keys = {e.partition("=")[0] for e in env}
    if "PATH" not in keys:
        out.append(DEFAULT_PATH)
    if "HOME" not in keys:
        out.append(f"HOME={home or '/'}")
    return out


def user_mount(m: Mount) -> dict[str, Any]:
    """An OCI mount entry for a caller's Mount (which must have a ``target``)."""
    if not m.target.startswith("/"):
        raise ValueError(f"mount target must be an absolute path, got {m.target!r}")
    options = list(m.options)
    if is_bind(m):
        # The runtime only bind-mounts when the options say so; "rbind" keeps
        # submounts of the source visible, which is what a bind of a tree means.
        if "bind" not in options and "rbind" not in options:
            options.insert(0, "rbind" if m.type == "rbind" else "bind")
        if "ro" in options:
            # The runtime's read-only remount must repeat the source mount's locked flags
            # (runc 1.1 does not): see fs.mount.locked_options.
            options += [o for o in locked_options(m.source) if o not in options]
        return {"destination": m.target, "type": "bind", "source": m.source, "options": options}
    return {"destination": m.target, "type": m.type, "source": m.source, "options": options}


#: CPU bandwidth period (Docker's --cpus uses the CFS default, 100ms)
CPU_PERIOD = 100_000


def limit_resources(lim: SpecLimits) -> dict[str, Any]:
    """The step's limits in ``linux.resources`` (only those set)."""
    res: dict[str, Any] = {}
    if lim.memory is not None:
        res["memory"] = {"limit": lim.memory}
    if lim.pids is not None:
        res["pids"] = {"limit": lim.pids}
    if lim.cpus is not None:
        res["cpu"] = {"quota": max(1000, round(lim.cpus * CPU_PERIOD)), "period": CPU_PERIOD}
    return res


def rlimits(opts: SpecOptions) -> list[dict[str, Any]]:
    """``process.rlimits``: Docker's RLIMIT_NOFILE, then the build's ``--ulimit``s."""
    out: dict[str, dict[str, Any]] = {
        "RLIMIT_NOFILE": {"type": "RLIMIT_NOFILE", "hard": opts.nofile, "soft": opts.nofile}
    }
    for type_, soft, hard in opts.limits.rlimits:
        out[type_] = {"type": type_, "hard": hard, "soft": soft}
    return list(out.values())


def make_spec(opts: SpecOptions) -> dict[str, Any]:
    """The ``config.json`` document for ``opts``."""
    caps = list(held_capabilities() if opts.privileged else DEFAULT_CAPABILITIES)
    mounts = [dict(m, options=list(m["options"])) for m in SYSTEM_MOUNTS]
    if opts.limits.shm_size is not None:
        shm = next(m for m in mounts if m["destination"] == "/dev/shm")
        shm["options"] = [o for o in shm["options"] if not o.startswith("size=")]
        shm["options"].append(f"size={max(1, opts.limits.shm_size // 1024)}k")
    if opts.privileged:
        # As BuildKit's insecure mode: sysfs and cgroupfs writable.
        for m in mounts:
            if m["type"] in ("sysfs", "cgroup"):
                m["options"] = [o for o in m["options"] if o != "ro"] + ["rw"]
    if opts.resolv_conf:
        mounts.append(
            _m("/etc/resolv.conf", "bind", opts.resolv_conf, ("rbind", "ro", "nosuid", "nodev"))
        )
    if opts.hosts:
        mounts.append(_m("/etc/hosts", "bind", opts.hosts, ("rbind", "ro", "nosuid", "nodev")))
    mounts.extend(user_mount(m) for m in opts.mounts)

    namespaces: list[dict[str, str]] = [
        {"type": "pid"},
        {"type": "ipc"},
        {"type": "uts"},
        {"type": "mount"},
    ]
    if opts.isolated_network:
        ns: dict[str, str] = {"type": "network"}
        if opts.netns_path:
            ns["path"] = opts.netns_path
        namespaces.append(ns)

    linux: dict[str, Any] = {"namespaces": namespaces}
    annotations: dict[str, str] = {}
    if opts.privileged:
        linux["resources"] = {"devices": [{"allow": True, "access": "rwm"}]}
    else:
        # Deny every device node except the runtime's defaults (null, zero, tty,
        # random...), as containerd's default spec does; hide and freeze the
        # /proc and /sys entries Docker does; filter syscalls with Docker's
        # default seccomp profile, resolved for this step's capabilities.
        linux["resources"] = {"devices": [{"allow": False, "access": "rwm"}]}
        linux["maskedPaths"] = list(MASKED_PATHS)
        linux["readonlyPaths"] = list(READONLY_PATHS)
        uname = os.uname()
        seccomp = resolve(
            default_profile(),
            caps,
            opts.machine or uname.machine,
            opts.kernel_release or uname.release,
        )
        if opts.seccomp_listener:
            seccomp = guard_ptrace(seccomp)
            if has_notify(seccomp):
                # runc (and newer crun) read listenerPath; crun 1.8 only its
                # annotation (a crun that knows both prefers listenerPath).
                seccomp["listenerPath"] = opts.seccomp_listener
                annotations["run.oci.seccomp.receiver"] = opts.seccomp_listener
        linux["seccomp"] = seccomp
    # An insecure step is limited as any other.
    linux["resources"].update(limit_resources(opts.limits))
    if opts.limits.cgroups_path:
        linux["cgroupsPath"] = opts.limits.cgroups_path
    if opts.rootless:
        # Root of a user namespace may write no device cgroup (the runtime
        # bind-mounts the default device nodes instead of making them, so none
        # but those exists), and, without a delegated cgroup, no cgroup at all.
        linux["resources"].pop("devices", None)
        if not linux["resources"]:
            del linux["resources"]
    spec: dict[str, Any] = {
        "ociVersion": OCI_VERSION,
        "process": {
            "terminal": False,
            "user": {
                "uid": opts.uid,
                "gid": opts.gid,
                "additionalGids": list(opts.additional_gids),
            },
            "args": list(opts.args),
            "env": process_env(opts.env, opts.home),
            "cwd": opts.cwd or "/",
            "capabilities": {
                "bounding": list(caps),
                "effective": list(caps),
                "permitted": list(caps),
            },
            "rlimits": rlimits(opts),
            # A setuid binary in an image gains nothing (as BuildKit's sandbox);
            # an insecure step is the operator's explicit choice to allow it.
            "noNewPrivileges": not opts.privileged,
        },
        "root": {"path": opts.root_path, "readonly": False},
        "hostname": opts.hostname,
        "mounts": mounts,
        "linux": linux,
    }
    if annotations:
        spec["annotations"] = annotations
    return spec
