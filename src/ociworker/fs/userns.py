"""Whether this process is a rootless worker, and where such a worker keeps things.

A rootless worker is root of a user namespace it made for itself
(``ociworker.rootless``). Parts that behave differently there ask here:
overlayfs needs ``userxattr`` (``trusted.*`` xattrs are the host root's), the
runtime gets no cgroup paths it may not write, and the state, socket and
config live in the user's XDG directories rather than /var/lib and /run.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

#: set by ``ociworker.rootless`` in the environment of the worker it starts
#: inside the namespace, where euid is 0 but the paths are still the user's
MARKER = "_OCIWORKER_ROOTLESS"
#: set with MARKER where a cgroup is delegated: the cgroup v2 path (in the hierarchy
#: mounted at /sys/fs/cgroup) the worker makes its step cgroups under
CGROUP_BASE = "_OCIWORKER_CGROUP_BASE"
#: set with MARKER when some step limits cannot apply: the warning saying why
CGROUP_WARNING = "_OCIWORKER_CGROUP_WARNING"


@functools.cache
def in_user_namespace() -> bool:
    """Whether this process runs in a user namespace other than the host's
    (whose uid_map is the identity map of all 2**32-1 ids)."""
    try:
        with open("/proc/self/uid_map", encoding="ascii") as f:
            lines = f.read().split("\n")
    except OSError:
        return False
    return [ln.split() for ln in lines if ln.strip()] != [["0", "0", "4294967295"]]


def rootless() -> bool:
    """Whether this worker process belongs to an ordinary user: it runs as one,
    or as root of the namespace ``ociworker.rootless`` made for one."""
    return os.geteuid() != 0 or os.environ.get(MARKER) == "1"


def _xdg(var: str, fallback: str) -> Path:
    value = os.environ.get(var, "")
    # The XDG spec: a relative value is invalid and must be ignored.
    if value and os.path.isabs(value):
        return Path(value)
    return Path(os.path.expanduser(fallback))


def data_home() -> Path:
    return _xdg("XDG_DATA_HOME", "~/.local/share")


def config_home() -> Path:
    return _xdg("XDG_CONFIG_HOME", "~/.config")


def runtime_dir() -> Path:
    """``$XDG_RUNTIME_DIR``, else a per-user directory under /tmp (podman's
    fallback when no login session made one)."""
    value = os.environ.get("XDG_RUNTIME_DIR", "")
    if value and os.path.isabs(value):
        return Path(value)
    return Path(f"/tmp/ociworker-run-{os.getuid() if not rootless() else _outer_uid()}")


def _outer_uid() -> int:
    # Inside the namespace getuid() is 0; the user's own uid is what the
    # namespace maps 0 to (the first line of uid_map).
    try:
        with open("/proc/self/uid_map", encoding="ascii") as f:
            first = f.readline().split()
        if first and first[0] == "0":
            return int(first[1])
    except (OSError, ValueError, IndexError):
        pass
    return os.getuid()


def default_root() -> Path:
    """The state dir when no ``--root`` is given: ``$OCIWORKER_ROOT``, else
    /var/lib/ociworker for root and ``$XDG_DATA_HOME/ociworker`` for a user."""
    env = os.environ.get("OCIWORKER_ROOT", "")
    if env:
        return Path(env)
    if rootless():
        return data_home() / "ociworker"
    return Path("/var/lib/ociworker")


def default_socket() -> Path:
    """The daemon's unix socket: /run/ociworker for root, ``$XDG_RUNTIME_DIR/ociworker``
    for a user."""
    if rootless():
        return runtime_dir() / "ociworker" / "ociworker.sock"
    return Path("/run/ociworker/ociworker.sock")


def default_config() -> Path | None:
    """The daemon's config file read without ``--config``: a user's
    ``$XDG_CONFIG_HOME/ociworker/ociworkerd.toml`` when it exists (root has none)."""
    if not rootless():
        return None
    path = config_home() / "ociworker" / "ociworkerd.toml"
    return path if path.is_file() else None
