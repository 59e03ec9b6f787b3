"""Rootless: an ordinary user's worker re-executes itself in a user namespace.

Why one re-exec rather than rootless variants of every part: inside a user +
mount + network + pid namespace where uid 0 is the user and 1..65536 the
user's subordinate range, the worker is "root" of everything it touches, so
the same code mounts overlayfs, chowns image files, runs runc/crun and builds
the sandbox network as it does for root (rootlesskit's design, which BuildKit
and podman use). The processes:

- the user's process (outside) forks a child, maps its ids with
  ``newuidmap``/``newgidmap`` (setuid helpers from Debian's ``uidmap``: only
  they may map subordinate ids), attaches ``pasta`` (or ``slirp4netns``) to its
  network namespace for outbound traffic, and waits for it, relaying signals;
- the child (in the namespaces) forks the pid namespace's init, which mounts a
  /proc of its own, reaps orphans, and runs the worker (``ociworker`` again,
  with the same arguments) as its child.

Every process has the parent-death signal SIGKILL, and the pid namespace dies
with its init: however the user's process dies (SIGKILL too), the worker, its
runtimes and containers go with it, and the mount namespace (every overlay
mount of the build) with them. Nothing is left for the next build but what the
state dir's owner locks already recover.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from ociworker.core.idmap import IdMap, require_subid
from ociworker.errors import ConfigError, HostError
from ociworker.fs.userns import CGROUP_BASE, CGROUP_WARNING, MARKER
from ociworker.log import get_logger
from ociworker.rootless import cgroups

_log = get_logger("ociworker.rootless")

_CLONE_NEWNS = 0x00020000
_CLONE_NEWPID = 0x20000000
_CLONE_NEWUSER = 0x10000000
_CLONE_NEWNET = 0x40000000
_PR_SET_PDEATHSIG = 1
_MS_REC = 0x4000
_MS_PRIVATE = 1 << 18
_MS_NOSUID, _MS_NODEV, _MS_NOEXEC = 0x2, 0x4, 0x8

#: seconds pasta may take to configure the namespace (it takes milliseconds)
_NET_READY_TIMEOUT = 30.0

#: exit code of a namespace process that failed before the worker ran
_SETUP_FAILED = 125

# The C library the interpreter is linked with, by its already loaded symbols:
# find_library("c") runs ldconfig in a subprocess, milliseconds on every start.
_libc = ctypes.CDLL(None, use_errno=True)
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
_libc.unshare.argtypes = [ctypes.c_int]
_libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_char_p]


#: LISTEN_PID while it passes through the namespaces' processes (not a pid:
#: none of them may take the sockets) until the worker's own pid replaces it
_ACTIVATED = "ociworker-worker"


def needed() -> bool:
    """Whether this process must enter a namespace first: an ordinary user,
    not already inside the one made for it."""
    return os.geteuid() != 0 and os.environ.get(MARKER) != "1"


def id_maps(
    user: pwd.struct_passwd, subuid: str = "/etc/subuid", subgid: str = "/etc/subgid"
) -> tuple[IdMap, IdMap]:
    """The uid and gid maps for ``user`` (ConfigError with the fix if a range is missing)."""
    texts: list[str | None] = []
    for path in (subuid, subgid):
        try:
            texts.append(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            texts.append(None)
        except OSError as exc:
            raise ConfigError(f"rootless: cannot read {path}: {exc.strerror}") from None
    # Both files are read first: the range a fix proposes must be free in both.
    uids, gids = (
        require_subid(kind, user.pw_name, user.pw_uid, texts[0], texts[1], path)
        for kind, path in (("uid", subuid), ("gid", subgid))
    )
    return IdMap(user.pw_uid, uids), IdMap(user.pw_gid, gids)


def _helpers() -> tuple[str, str]:
    found = [shutil.which(n) for n in ("newuidmap", "newgidmap")]
    if None in found:
        raise ConfigError(
            "rootless: newuidmap/newgidmap not found, which map the build's user "
            "namespace; fix (as root): apt-get install uidmap"
        )
    return found[0] or "", found[1] or ""


def network_helper() -> list[str] | None:
    """The command line (without the target) of the helper that gives the
    worker's network namespace outbound traffic: pasta, else slirp4netns."""
    pasta = shutil.which("pasta")
    if pasta:
        # -T auto: the namespace's loopback ports reach the host's, so a
        # registry on the user's 127.0.0.1 works as it does for root;
        # --config-net: the namespace gets the host's addresses and routes;
        # --no-map-gw: the gateway's address is not the host's loopback, which
        # a RUN step could otherwise reach through the sandbox's NAT.
        return [
            pasta,
            "--config-net",
            "--no-map-gw",
            "--quiet",
            "-T",
            "auto",
            "-U",
            "none",
            "-t",
            "none",
            "-u",
            "none",
        ]
    slirp = shutil.which("slirp4netns")
    if slirp:
        return [slirp, "--configure", "--mtu=65520", "--disable-host-loopback"]
    return None


def run(argv: Sequence[str]) -> int:
    """Run ``ociworker argv`` as root of a new user namespace; its exit code."""
    user = pwd.getpwuid(os.geteuid())
    uid_map, gid_map = id_maps(user)
    newuidmap, newgidmap = _helpers()
    net = network_helper()
    if net is None:
        raise ConfigError(
            "rootless: neither pasta nor slirp4netns found, which give the build's "
            "network namespace its connection; fix (as root): apt-get install passt"
        )
    env = {k: v for k, v in os.environ.items() if k not in (CGROUP_BASE, CGROUP_WARNING)}
    env[MARKER] = "1"
    if env.get("LISTEN_PID") == str(os.getpid()):
        # Socket activation (a user unit's serve --addr fd://): fds 3... pass
        # through the forks below (not close-on-exec), but LISTEN_PID names
        # this process; the worker in the namespace gets its own pid there.
        env["LISTEN_PID"] = _ACTIVATED
    # Before the fork: the namespaces' processes start in the cgroup this one moves to.
    env.update(cgroups.prepare(user.pw_uid, user.pw_name))
    # Inside, ~ without $HOME would be root's home (uid 0's passwd entry): the
    # user's state dir must not depend on that.
    env.setdefault("HOME", user.pw_dir)
    cmd = [sys.executable, "-m", "ociworker", *argv]
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child execs or exits
        os.close(ready_r)
        os.close(go_w)
        _child(ready_w, go_r, parent, cmd, env)
    os.close(ready_w)
    os.close(go_r)
    helper: subprocess.Popen[bytes] | None = None
    try:
        if os.read(ready_r, 1) != b"1":
            raise HostError(
                "rootless: cannot create a user namespace (are unprivileged user "
                "namespaces allowed? sysctl kernel.unprivileged_userns_clone=1, and on "
                "Ubuntu kernel.apparmor_restrict_unprivileged_userns=0)"
            )
        _map(newuidmap, pid, uid_map, "uid")
        _map(newgidmap, pid, gid_map, "gid")
        helper = _attach_network(net, pid)
        os.write(go_w, b"1")
    except BaseException:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        _stop_network(helper)
        raise
    finally:
        os.close(ready_r)
        os.close(go_w)
    try:
        return _wait_relaying(pid)
    finally:
        _stop_network(helper)


def _map(tool: str, pid: int, m: IdMap, kind: str) -> None:
    done = subprocess.run(
        [tool, str(pid), *m.newidmap_args()], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        why = done.stderr.strip() or f"exit code {done.returncode}"
        raise HostError(f"rootless: {os.path.basename(tool)} failed to map the {kind}s: {why}")


def _attach_network(net: list[str], pid: int) -> subprocess.Popen[bytes]:
    """Start the network helper on the child's namespace; returns when it is up.

    In the foreground and with the parent-death signal: neither helper notices
    a namespace it joined by pid going away, so it must end with this process
    however this one ends (SIGKILL too)."""
    if os.path.basename(net[0]) == "pasta":
        # Its messages go to an unlinked file: a pipe nobody reads after start-up
        # could fill and stall it.
        with tempfile.TemporaryFile() as log:
            proc = subprocess.Popen(
                [*net, "--foreground", str(pid)],
                stdout=subprocess.DEVNULL,
                stderr=log,
                preexec_fn=_die_with_us,
            )
            # pasta says nothing when it is ready: the routes it copies from the
            # host, the default one last, are the sign.
            want_default = _routes("self")[0]
            deadline = time.monotonic() + _NET_READY_TIMEOUT
            while True:
                default, any_route = _routes(str(pid))
                if default or (any_route and not want_default):
                    return proc
                if proc.poll() is not None or time.monotonic() > deadline:
                    proc.kill()
                    proc.wait()
                    log.seek(0)
                    why = log.read().decode(errors="replace").strip()
                    raise HostError(
                        f"rootless: pasta failed to connect the build's network namespace: "
                        f"{why or 'no route after ' + str(_NET_READY_TIMEOUT) + 's'}"
                    )
                time.sleep(0.01)
    ready_r, ready_w = os.pipe()
    proc = subprocess.Popen(
        [*net, f"--ready-fd={ready_w}", str(pid), "tap0"],
        pass_fds=(ready_w,),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=_die_with_us,
    )
    os.close(ready_w)
    try:
        if os.read(ready_r, 1) != b"1":
            proc.kill()
            proc.wait()
            raise HostError("rootless: slirp4netns failed to set up the network namespace")
    finally:
        os.close(ready_r)
    return proc


def _die_with_us() -> None:
    _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0)


def _routes(pid: str) -> tuple[bool, bool]:
    """(an IPv4 default route, any IPv4 route) in the network namespace of ``pid``."""
    try:
        with open(f"/proc/{pid}/net/route", encoding="ascii") as f:
            rows = [line.split() for line in list(f)[1:]]
    except OSError:
        return False, False
    return any(r[1:2] == ["00000000"] for r in rows), bool(rows)


def _stop_network(helper: subprocess.Popen[bytes] | None) -> None:
    if helper is not None:
        helper.terminate()
        helper.wait()
        if helper.stderr is not None:
            helper.stderr.close()


def _wait_relaying(pid: int) -> int:
    """Wait for ``pid``, passing on the signals that stop a build (Ctrl-C from a
    terminal reaches every process of the group: the worker sees it once more)."""

    def relay(signum: int, _frame: FrameType | None) -> None:
        with contextlib.suppress(OSError):
            os.kill(pid, signum)

    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, relay)
    while True:
        try:
            _, status = os.waitpid(pid, 0)
        except InterruptedError:  # pragma: no cover - PEP 475 retries
            continue
        code = os.waitstatus_to_exitcode(status)
        # killed by a signal: the shell's 128 + N
        return code if code >= 0 else 128 - code


def _die_with_parent(parent: int) -> None:
    if _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0) != 0 or os.getppid() != parent:
        os._exit(_SETUP_FAILED)  # the parent is already gone


def _child(ready_w: int, go_r: int, parent: int, cmd: list[str], env: dict[str, str]) -> None:
    """In the forked child: enter the namespaces, wait to be mapped, run the
    pid namespace's init. Never returns."""
    code = _SETUP_FAILED
    try:
        # (os.unshare is Python 3.12's)
        if _libc.unshare(_CLONE_NEWUSER | _CLONE_NEWNS | _CLONE_NEWNET | _CLONE_NEWPID) != 0:
            why = os.strerror(ctypes.get_errno())
            print(f"ociworker: rootless: unshare: {why}", file=sys.stderr)
            os._exit(_SETUP_FAILED)
        os.write(ready_w, b"1")
        os.close(ready_w)
        if os.read(go_r, 1) != b"1":
            os._exit(_SETUP_FAILED)
        os.close(go_r)
        os.setresgid(0, 0, 0)
        os.setresuid(0, 0, 0)
        os.setgroups([])
        _die_with_parent(parent)
        me = os.getpid()
        init = os.fork()
        if init == 0:
            _init(me, cmd, env)
        code = _wait_relaying(init)
    except BaseException as exc:
        print(f"ociworker: rootless: {exc}", file=sys.stderr)
    finally:
        os._exit(code)


def _init(parent: int, cmd: list[str], env: dict[str, str]) -> None:
    """Pid 1 of the namespace: a /proc of its own, the worker as its child,
    orphans reaped; exits with the worker's code. Never returns."""
    code = _SETUP_FAILED
    try:
        _die_with_parent(0)  # in a new pid namespace the parent's pid reads as 0
        # Private: nothing mounted here is propagated anywhere, nor back.
        _mount(b"none", b"/", None, _MS_REC | _MS_PRIVATE)
        # The worker and the runtimes read /proc/<pid>: the pids of this namespace.
        _mount(b"proc", b"/proc", b"proc", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC)
        worker = os.fork()
        if worker == 0:
            _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0)
            if env.get("LISTEN_PID") == _ACTIVATED:
                # the sockets systemd passed (serve --addr fd://) are the worker's:
                # say so with its own pid, as systemd does after its fork
                env = {**env, "LISTEN_PID": str(os.getpid())}
            os.execve(cmd[0], cmd, env)
        for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(s, lambda signum, _f: _kill_quiet(worker, signum))
        while True:
            pid, status = os.wait()
            if pid == worker:
                code = os.waitstatus_to_exitcode(status)
                break
    except BaseException as exc:
        print(f"ociworker: rootless: {exc}", file=sys.stderr)
    finally:
        os._exit(code if code >= 0 else 128 - code)


def _kill_quiet(pid: int, signum: int) -> None:
    with contextlib.suppress(OSError):
        os.kill(pid, signum)


def _mount(source: bytes, target: bytes, fstype: bytes | None, flags: int) -> None:
    if _libc.mount(source, target, fstype, flags, None) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {target.decode()}: {os.strerror(err)}")
