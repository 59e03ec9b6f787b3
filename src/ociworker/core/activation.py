"""Which inherited sockets ``serve --addr fd://...`` listens on (systemd socket activation).

sd_listen_fds(3) semantics: the fds are 3, 4, ... ``3 + $LISTEN_FDS - 1``, meant for
this process only when ``$LISTEN_PID`` is its pid (a child that inherited the
environment must not take them), named by ``$LISTEN_FDNAMES`` (colon-separated,
systemd's FileDescriptorName=, default "unknown"). The address picks among them
as dockerd and buildkitd do: ``fd://`` all, ``fd://3`` one by number, and, as
systemd names them, ``fd://NAME`` those with that name. Pure: the IO is in
``ociworker.api.activation``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from ociworker.errors import ConfigError

#: sd_listen_fds(3)'s SD_LISTEN_FDS_START
LISTEN_FDS_START = 3

_ENV = ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES")
_NOT_ACTIVATED = (
    "no sockets passed by socket activation (fd:// needs LISTEN_FDS and LISTEN_PID "
    "from systemd, e.g. ociworker.socket, or systemd-socket-activate)"
)


@dataclass(frozen=True)
class ListenFd:
    fd: int
    name: str


def is_fd_addr(addr: str) -> bool:
    return addr.startswith("fd://")


def listen_fds(env: Mapping[str, str], pid: int) -> tuple[ListenFd, ...]:
    """The sockets systemd passed to process ``pid`` (none if they were meant
    for another process)."""
    if "LISTEN_FDS" not in env or "LISTEN_PID" not in env:
        return ()
    try:
        owner = int(env["LISTEN_PID"])
        count = int(env["LISTEN_FDS"])
    except ValueError:
        raise ConfigError(
            f"invalid LISTEN_PID={env['LISTEN_PID']!r} or LISTEN_FDS={env['LISTEN_FDS']!r}"
        ) from None
    if owner != pid or count <= 0:
        return ()
    names = env.get("LISTEN_FDNAMES", "").split(":") if env.get("LISTEN_FDNAMES") else []
    if len(names) != count:
        # systemd always sends one name per fd; anything else is not systemd's
        # (sd_listen_fds_with_names falls back to "unknown" for every fd then)
        names = ["unknown"] * count
    return tuple(ListenFd(LISTEN_FDS_START + i, names[i]) for i in range(count))


def select_fds(addr: str, fds: tuple[ListenFd, ...]) -> tuple[ListenFd, ...]:
    """The fds ``addr`` (``fd://``, ``fd://N`` or ``fd://NAME``) asks for; a
    clear error if there are none or the one asked for was not passed."""
    spec = addr.removeprefix("fd://")
    if not fds:
        raise ConfigError(_NOT_ACTIVATED)
    if spec in ("", "*"):
        return fds
    if spec.isdigit():
        picked = tuple(f for f in fds if f.fd == int(spec))
        if not picked:
            raise ConfigError(
                f"{addr}: fd {spec} was not passed by socket activation "
                f"(passed: {', '.join(str(f.fd) for f in fds)})"
            )
        return picked
    picked = tuple(f for f in fds if f.name == spec)
    if not picked:
        raise ConfigError(
            f"{addr}: no socket named {spec!r} was passed by socket activation "
            f"(names: {', '.join(sorted({f.name for f in fds}))})"
        )
    return picked


def check_fd_addr(addr: str) -> None:
    """``fd://``, ``fd://N`` (N >= 3) or ``fd://NAME`` (systemd's name rules: no ':')."""
    spec = addr.removeprefix("fd://")
    if spec.isdigit() and int(spec) < LISTEN_FDS_START:
        raise ConfigError(f"invalid address {addr!r}: socket activation passes fds from 3 on")
    if ":" in spec or "/" in spec:
        raise ConfigError(f"invalid address {addr!r}: use fd://, fd://N or fd://NAME")


def activation_env() -> tuple[str, ...]:
    """The variables to unset once read, so a child (runc, a step) never sees them."""
    return _ENV
