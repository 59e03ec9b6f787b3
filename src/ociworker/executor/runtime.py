"""The OCI runtime executor: one class for runc and crun (the runtime is a setting).

One ``run`` is: bundle dir -> rootfs mounted -> user resolved in that rootfs ->
config.json -> ``<runtime> run`` with output streamed -> exit code. Everything
acquired is registered with a cleanup stack as soon as it exists, and the stack
runs shielded from a second cancellation, so a cancelled build never leaves a
container, a mount or a pinned namespace behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import json
import os
import resource
import secrets
import shutil
import signal
import stat
import subprocess
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Literal, TypeVar

from ociworker.core.mounts import Mount
from ociworker.core.progress import format_bytes
from ociworker.errors import ConfigError, HostError, RuntimeFailure, UserError
from ociworker.executor.base import (
    NetworkMode,
    OutputSink,
    ProcessSpec,
    RunReport,
    StepLimits,
    check_run,
)
from ociworker.executor.binary import find_runtime
from ociworker.executor.bridge import BridgeNetwork, teardown_instance
from ociworker.executor.cgroups import (
    Hierarchy,
    StepCgroup,
    delegated_hierarchies,
    host_hierarchies,
    remove_leftovers,
)
from ociworker.executor.network import create_loopback_netns, remove_netns
from ociworker.executor.owners import Owner, recover_dead
from ociworker.executor.ptrace_guard import PtraceGuard, remove_socket, socket_path
from ociworker.executor.spec import (
    NOFILE_LIMIT,
    SpecLimits,
    SpecOptions,
    hosts_content,
    make_spec,
    resolv_conf_content,
)
from ociworker.fs.mount import mount_all, mountpoints_under, unmount
from ociworker.fs.oserror import os_error_text
from ociworker.fs.paths import DIR_PATH, clean, open_dir_beneath, secure_join
from ociworker.fs.userns import CGROUP_BASE, CGROUP_WARNING, in_user_namespace
from ociworker.fs.users import resolve_user
from ociworker.log import get_logger

Flavour = Literal["runc", "crun"]

_log = get_logger("ociworker.executor")

T = TypeVar("T")

#: how long a killed container may take to die before its runtime process is killed too
_KILL_GRACE = 0.5
_CTL_TIMEOUT = 10.0
#: how long a killed container's processes may take to leave their cgroup
_CGROUP_EMPTY_WAIT = 10.0
_CHUNK = 65536
_CAP_SYS_RESOURCE = 24

_HUGETLB_FIX = (
    "mkdir -p /sys/fs/cgroup/hugetlb && mount -t cgroup -o hugetlb cgroup /sys/fs/cgroup/hugetlb"
)


# --- mount stubs ----------------------------------------------------------


class _Stubs:
    """Mount points the runtime is about to create in the rootfs, removed afterwards.

    runc/crun create a missing mount destination (a dir, or an empty file for a
    file bind) inside the rootfs; left there they would end up in the step's
    layer. Like BuildKit, remember what did not exist before the run and remove
    it after, if still empty, restoring the parent's timestamps.

    The step may have replaced a stub's parent by a symlink to a host path
    (CVE-2024-23652: BuildKit then deleted host files). So removal walks from a
    descriptor of the rootfs one component at a time with ``O_NOFOLLOW`` and
    removes relative to the parent's descriptor: where a component is no longer
    a plain directory, the stub is not ours any more and is left alone.
    """

    def __init__(self, root: Path, destinations: Sequence[str]) -> None:
        self._root = root
        #: stubs as components relative to the rootfs (symlinks resolved before the run)
        self._created: set[tuple[str, ...]] = set()
        #: first missing component of a destination -> its parent's (atime, mtime)
        self._tops: dict[tuple[str, ...], tuple[int, int]] = {}
        for dest in destinations:
            parts = [p for p in clean(dest).split("/") if p]
            missing = False
            for i in range(len(parts)):
                path = secure_join(root, "/".join(parts[: i + 1]), follow_last=False)
                if not missing and os.path.lexists(path):
                    continue
                rel = path.relative_to(root).parts
                if not rel:
                    break
                if not missing:
                    missing = True
                    try:
                        st = os.lstat(path.parent)
                    except OSError:
                        break
                    self._tops.setdefault(rel, (st.st_atime_ns, st.st_mtime_ns))
                self._created.add(rel)

    def remove(self) -> None:
        if not self._created:
            return
        root_fd = os.open(self._root, DIR_PATH)
        try:
            for rel in sorted(self._created, key=len, reverse=True):
                pfd = open_dir_beneath(root_fd, rel[:-1])
                if pfd is not None:
                    try:
                        _remove_if_empty(pfd, rel[-1])
                    finally:
                        os.close(pfd)
            for top, times in self._tops.items():
                pfd = open_dir_beneath(root_fd, top[:-1])
                if pfd is None:
                    continue
                try:
                    if not _exists_at(pfd, top[-1]):
                        # utimensat has no O_PATH form; the magic link names the
                        # very directory we walked to, never a path to re-resolve
                        with contextlib.suppress(OSError):
                            os.utime(f"/proc/self/fd/{pfd}", ns=times)
                finally:
                    os.close(pfd)
        finally:
            os.close(root_fd)


def _exists_at(dfd: int, name: str) -> bool:
    try:
        os.stat(name, dir_fd=dfd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


def _remove_if_empty(dfd: int, name: str) -> bool:
    try:
        st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
    except FileNotFoundError:
        return True
    try:
        if stat.S_ISDIR(st.st_mode):
            os.rmdir(name, dir_fd=dfd)
        elif stat.S_ISREG(st.st_mode) and st.st_size == 0:
            os.unlink(name, dir_fd=dfd)
        else:
            return False
    except OSError:
        return False
    return True


# --- helpers -------------------------------------------------------------------


async def _finish(aw: Awaitable[T]) -> T:
    """Await ``aw`` to its end even when cancelled, then re-raise the cancellation.

    For steps that change the host (a mount) and cannot be interrupted half-way:
    the cleanup that follows must see the change made, not in flight.
    """
    task = asyncio.ensure_future(aw)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        with contextlib.suppress(BaseException):
            await task
        raise


class _CleanupStack:
    def __init__(self) -> None:
        self._items: list[Callable[[], Awaitable[None]]] = []

    def push(self, fn: Callable[[], Awaitable[None]]) -> None:
        self._items.append(fn)

    def push_sync(self, fn: Callable[[], None]) -> None:
        async def call() -> None:
            await asyncio.to_thread(fn)

        self._items.append(call)

    async def _run(self) -> None:
        errors: list[BaseException] = []
        while self._items:
            fn = self._items.pop()
            try:
                await fn()
            except Exception as exc:
                errors.append(exc)
        if errors:
            raise HostError(f"cleanup after run failed: {errors[0]}") from errors[0]

    async def aclose(self, *, quiet: bool = False) -> None:
        """Run every cleanup, newest first; ``quiet`` when another error is in flight.

        Shielded: a second cancel while we clean up must not leave a half-torn
        down container; the task keeps going and the caller sees the cancel.
        """
        task = asyncio.ensure_future(self._run())
        if quiet:
            try:
                await asyncio.shield(task)
            except Exception as exc:
                _log.warning("executor cleanup failed", error=str(exc))
        else:
            await asyncio.shield(task)


def _detect_flavour(binary: str) -> Flavour:
    name = os.path.basename(binary)
    if "crun" in name:
        return "crun"
    if "runc" in name:
        return "runc"
    # An oddly named binary: ask it.
    try:
        res = subprocess.run(
            [binary, "--version"], capture_output=True, text=True, timeout=10, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise HostError(f"{binary} --version did not answer within 10s") from exc
    except OSError as exc:
        raise HostError(f"cannot run {binary} --version: {os_error_text(exc)}") from exc
    first = res.stdout.strip().lower()
    if first.startswith("crun"):
        return "crun"
    if first.startswith("runc"):
        return "runc"
    raise ConfigError(f"{binary} is neither runc nor crun (--version said {first[:60]!r})")


def _runtime_errors(log: Path) -> list[str]:
    """Error messages the runtime wrote to its JSON log (not the container's output)."""
    try:
        text = log.read_text(errors="replace")
    except FileNotFoundError:
        return []
    out = []
    for line in text.splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and entry.get("level") in ("error", "fatal"):
            out.append(str(entry.get("msg", "")).strip())
    return [m for m in out if m]


def _is_exec_failure(msg: str) -> bool:
    low = msg.lower()
    return "exec" in low and (
        "not found" in low or "no such file" in low or "permission denied" in low
    )


def _kill_containers(runtime_dir: Path, prefix: str) -> int:
    """Kill and delete the containers named ``prefix...`` that the runtimes still
    know under ``runtime_dir`` (one ``--root`` per runtime, named after it)."""
    n = 0
    if not runtime_dir.is_dir():
        return 0
    for state in runtime_dir.iterdir():
        binary = shutil.which(state.name)
        if binary is None or not state.is_dir():
            continue
        got = subprocess.run(
            [binary, f"--root={state}", "list", "-q"], capture_output=True, text=True, timeout=30
        )
        for cid in got.stdout.split():
            if not cid.startswith(prefix):
                continue  # another worker's, maybe alive
            subprocess.run(
                [binary, f"--root={state}", "kill", cid, "KILL"], capture_output=True, timeout=30
            )
            subprocess.run(
                [binary, f"--root={state}", "delete", "--force", cid],
                capture_output=True,
                timeout=30,
            )
            n += 1
    return n


def container_prefix(owner: str) -> str:
    """Container ids, bundles and ``none`` namespaces of owner ``owner`` start with this."""
    return f"ociw-{owner}-"


def recover_owner(state_dir: Path, owner: str) -> dict[str, int]:
    """Remove what the runs of the dead owner ``owner`` (``executor.owners``)
    left under an executor's ``state_dir``, and nothing of anyone else's:
    containers killed and deleted (runc and crun alike, including those whose
    state is on a secret step's own tmpfs), then rootfs, tmpfs and namespace
    mounts released, bundles removed, its network (bridge, veths, nft tables)
    and its step cgroups removed. Idempotent. Counts of containers and mounts."""
    state_dir = Path(state_dir).absolute()
    prefix = container_prefix(owner)
    bundles = sorted((state_dir / "bundles").glob(prefix + "*"))
    containers = _kill_containers(state_dir / "runtime", prefix)
    for bundle in bundles:
        containers += _kill_containers(bundle / "runtime", prefix)
    mounts = 0
    for bundle in bundles:
        mounts += len(mountpoints_under(bundle))
        unmount(bundle)
        _remove_bundle(bundle)
    # Its bridge, veths and nft tables; then the pinned ``none`` namespaces.
    teardown_instance(owner)
    for ns in sorted((state_dir / "netns").glob(prefix + "*")):
        remove_netns(ns)
    # Its ptrace supervisor's socket (nothing listens on it any more).
    remove_socket(socket_path(state_dir, owner))
    # The runtimes removed their containers' cgroups on delete; ours around them
    # (named after the state dir and the owner) remain, busy for a moment while
    # the last processes of the containers killed just now exit and are reaped.
    remove_leftovers(
        _cgroup_prefix(state_dir) + owner + "-",
        _step_hierarchies(in_user_namespace())[1],
        wait=_CGROUP_EMPTY_WAIT,
    )
    return {"containers": containers, "mounts": mounts}


async def recover_state_dir(state_dir: Path) -> dict[str, int]:
    """Start-up recovery of an executor's ``state_dir``: ``recover_owner`` for
    every dead owner, live ones left alone. Counts of containers and mounts."""
    state_dir = Path(state_dir).absolute()
    found = {"containers": 0, "mounts": 0}

    def cleanup(owner: str) -> None:
        for k, v in recover_owner(state_dir, owner).items():
            found[k] += v

    await asyncio.to_thread(recover_dead, state_dir / "owners", cleanup)
    return found


def _step_hierarchies(rootless: bool) -> tuple[str, tuple[Hierarchy, ...]]:
    """(cgroup path, hierarchies) step cgroups are made in: the hierarchies' roots for
    root; a rootless worker's delegated cgroup, else the roots (whose cgroups it may not
    make: the step then runs without, with a warning)."""
    hierarchies = host_hierarchies()
    base = os.environ.get(CGROUP_BASE, "") if rootless else ""
    if base:
        return base, delegated_hierarchies(base, hierarchies)
    return "", hierarchies


def _cgroup_prefix(state_dir: Path) -> str:
    """Names of the step cgroups of the executor of ``state_dir`` start with this."""
    return "ociw-" + hashlib.sha256(str(state_dir).encode()).hexdigest()[:8] + "-"


class OCIRuntimeExecutor:
    """``Executor`` on runc or crun; ``runtime`` is a name in PATH or a path."""

    def __init__(
        self,
        state_dir: Path,
        runtime: str = "runc",
        *,
        subnet: str = "",
        dns: tuple[str, ...] = (),
        owner: str | None = None,
    ) -> None:
        self._binary = find_runtime(runtime)
        self._flavour: Flavour = _detect_flavour(self._binary)
        self._state_dir = Path(state_dir).absolute()
        self._runtime_root = self._state_dir / "runtime" / self._flavour
        self._dns = dns
        #: ``owner``: the id (``executor.owners``) of the worker process this
        #: executor runs in, put into every name below; without one (an executor
        #: used on its own) it claims its own, released by ``aclose``.
        self._claim: Owner | None = None
        if owner is None:
            self._claim = Owner.claim(self._state_dir / "owners")
            owner = self._claim.ident
        self.owner = owner
        #: the ``default`` network, made on the first step that uses it
        self._bridge = BridgeNetwork(subnet, ident=self.owner)
        #: root of a user namespace (a rootless worker): cgroups only where delegated
        self._rootless = in_user_namespace()
        #: where step cgroups go: the hierarchies' roots, or a rootless worker's
        #: delegated cgroup (``rootless.cgroups``)
        self._cgroup_base, self._hierarchies = _step_hierarchies(self._rootless)
        self._warned_cgroups = False
        self._cgroup_prefix = _cgroup_prefix(self._state_dir) + self.owner + "-"
        #: answers sandboxed steps' attaching ptrace calls; started by the first one
        self._guard = PtraceGuard(socket_path(self._state_dir, self.owner))

    async def aclose(self) -> None:
        """Remove the default network (bridge, pooled namespaces, nft tables),
        stop the ptrace supervisor (its socket removed), give up the owner id."""
        try:
            await self._bridge.aclose()
        finally:
            await asyncio.to_thread(self._guard.close)
            if self._claim is not None:
                self._claim.release()

    def prepare(self, network: NetworkMode) -> None:
        if network == "default":
            self._bridge.warm()

    async def _ptrace_listener(self) -> str:
        """The supervisor's socket, started on first use. Without it a step
        would run with ptrace left to a Yama this host may not have: refused."""
        if not self._guard.running:
            try:
                self._state_dir.mkdir(parents=True, exist_ok=True)
                await asyncio.to_thread(self._guard.start)
            except OSError as exc:
                raise HostError(
                    f"cannot start the ptrace supervisor at {self._guard.path}: "
                    f"{os_error_text(exc)}"
                ) from exc
        return str(self._guard.path)

    @property
    def flavour(self) -> Flavour:
        return self._flavour

    @property
    def binary(self) -> str:
        return self._binary

    @property
    def runtime_root(self) -> Path:
        """The runtime's ``--root`` (its container state lives there)."""
        return self._runtime_root

    async def recover(self) -> dict[str, int]:
        """Start-up recovery of this executor's state dir (``recover_state_dir``)."""
        return await recover_state_dir(self._state_dir)

    def _cmd(self, *args: str, log: Path | None = None, root: Path | None = None) -> list[str]:
        cmd = [self._binary, f"--root={root or self._runtime_root}"]
        if log is not None:
            cmd += [f"--log={log}", "--log-format=json"]
        return [*cmd, *args]

    async def _ctl(self, *args: str, root: Path | None = None) -> tuple[int, str]:
        proc = await asyncio.create_subprocess_exec(
            *self._cmd(*args, root=root),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            _, err = await asyncio.wait_for(proc.communicate(), _CTL_TIMEOUT)
        except TimeoutError:
            # A wedged `kill`/`delete` must not hang the cleanup that called it.
            proc.kill()
            await proc.wait()
            return -1, f"{self._flavour} {args[0]} timed out"
        return proc.returncode or 0, err.decode(errors="replace").strip()

    async def run(
        self,
        rootfs: Sequence[Mount],
        process: ProcessSpec,
        mounts: Sequence[Mount],
        output: OutputSink,
    ) -> int:
        check_run(rootfs, process, mounts)

        cid = container_prefix(self.owner) + secrets.token_hex(6)
        bundle = self._state_dir / "bundles" / cid
        root_dir = bundle / "rootfs"
        runtime_root = self._runtime_root
        stack = _CleanupStack()
        try:
            bundle.mkdir(parents=True, mode=0o700 if process.secret_env else 0o777)
            stack.push_sync(lambda: _remove_bundle(bundle))
            if process.secret_env:
                # config.json will hold the secret, and runc/crun copy the spec into
                # their state dir: both live on a tmpfs of this run alone.
                stack.push_sync(lambda: unmount(bundle))
                await _finish(asyncio.to_thread(_mount_private_tmpfs, bundle))
                runtime_root = bundle / "runtime" / self._flavour
            root_dir.mkdir()
            runtime_root.mkdir(parents=True, exist_ok=True)

            # Registered first: a cancel that lands once the mount is made must
            # still find its unmount on the stack (unmount is a no-op otherwise).
            stack.push_sync(lambda: unmount(root_dir))
            await _finish(asyncio.to_thread(mount_all, rootfs, root_dir))

            user = await _finish(asyncio.to_thread(resolve_user, root_dir, process.user))
            cwd = clean(process.cwd or "/")
            resolv, hosts = bundle / "resolv.conf", bundle / "hosts"
            await _finish(asyncio.to_thread(_write_etc_files, resolv, hosts, process, self._dns))

            netns = ""
            if process.network == "none":
                netns_path = self._state_dir / "netns" / cid
                stack.push_sync(lambda: remove_netns(netns_path))
                await create_loopback_netns(netns_path)
                netns = str(netns_path)
            elif process.network == "default":
                acquired = asyncio.ensure_future(self._bridge.acquire())

                async def release() -> None:
                    # _finish lets a cancelled acquire end: a slot it made is ours
                    if acquired.done() and not acquired.cancelled() and not acquired.exception():
                        # A sandboxed step (no CAP_NET_ADMIN) cannot have changed its
                        # namespace, so the next step may reuse it; a privileged one
                        # could have (routes, addresses, rules): never handed on.
                        reuse = process.security != "insecure"
                        await self._bridge.release(acquired.result(), reuse=reuse)

                stack.push(release)
                netns = str((await _finish(acquired)).path)

            # A target that is, or passes through, a symlink is resolved in the
            # rootfs here, so the runtime gets a path that cannot leave it and the
            # stubs below are the entries the runtime will really create.
            resolved = await asyncio.to_thread(_resolve_targets, root_dir, mounts)
            cgroup = await self._step_cgroup(cid, stack)
            own_pids = False
            if cgroup is not None and process.limits.pids is not None:
                own_pids = await asyncio.to_thread(cgroup.limit_pids, process.limits.pids)
            privileged = process.security == "insecure"
            listener = "" if privileged else await self._ptrace_listener()
            spec = make_spec(
                SpecOptions(
                    args=tuple(process.args),
                    env=(*process.env, *process.secret_env),
                    cwd=cwd,
                    uid=user.uid,
                    gid=user.gid,
                    additional_gids=user.additional_gids,
                    nofile=_nofile_limit(),
                    home=user.home,
                    hostname=process.hostname,
                    privileged=privileged,
                    mounts=resolved,
                    isolated_network=process.network != "host",
                    netns_path=netns,
                    resolv_conf=str(resolv),
                    hosts=str(hosts),
                    limits=_spec_limits(process.limits, cgroup, own_pids, self._rootless),
                    seccomp_listener=listener,
                    rootless=self._rootless,
                )
            )
            stubs = await asyncio.to_thread(
                _Stubs, root_dir, [m["destination"] for m in spec["mounts"]]
            )
            stack.push_sync(stubs.remove)
            # The working dir is kept, not a stub: a RUN in a fresh WORKDIR
            # creates it in the layer, as in docker build.
            await _finish(asyncio.to_thread(_ensure_dir, root_dir, cwd))
            (bundle / "config.json").write_text(json.dumps(spec, indent=1))

            code = await self._run_container(
                cid, bundle, output, stack, runtime_root, _Accounting(cgroup, process)
            )
        except BaseException:
            # The error in flight (or the cancellation) is what the caller must see.
            await stack.aclose(quiet=True)
            raise
        await stack.aclose()
        return code

    async def _step_cgroup(self, cid: str, stack: _CleanupStack) -> StepCgroup | None:
        """The step's own cgroup (``executor.cgroups``), None where we cannot make
        one (no cgroupfs, a read-only one): the step then runs unaccounted."""
        if not self._hierarchies:
            if self._rootless:
                self._warn_cgroups(OSError(errno.ENOENT, "no cgroup v2 hierarchy found"))
            return None
        name = self._cgroup_prefix + cid.removeprefix(container_prefix(self.owner))
        cgroup = StepCgroup(name, self._hierarchies, self._cgroup_base)
        stack.push_sync(cgroup.remove)
        try:
            await asyncio.to_thread(cgroup.create)
        except OSError as exc:
            if not self._rootless:
                _log.warning("no cgroup for step accounting", error=os_error_text(exc))
            else:
                self._warn_cgroups(exc)
            return None
        return cgroup

    def _warn_cgroups(self, exc: OSError) -> None:
        # Not a failure (BuildKit's rootless worker runs so too): the steps run,
        # only unlimited and unaccounted. Once per worker.
        if self._warned_cgroups:
            return
        self._warned_cgroups = True
        if os.environ.get(CGROUP_WARNING):
            # The build already said why, as a progress warning (controller): a
            # log line here would land in -q and rawjson output.
            _log.debug("no step cgroup", error=os_error_text(exc))
            return
        _log.warning(
            "rootless: the step cgroup cannot be made, so RUN steps run without "
            "memory/pids/cpu limits or accounting",
            error=os_error_text(exc),
        )

    async def _run_container(
        self,
        cid: str,
        bundle: Path,
        output: OutputSink,
        stack: _CleanupStack,
        root: Path,
        acct: _Accounting,
    ) -> int:
        log = bundle / "runtime.log"
        pid_file = bundle / "init.pid"

        exited: list[int] = []  # the runtime's own exit status, once it has one

        async def delete() -> None:
            # runc and crun remove a container they ran in the foreground when it
            # exits: a runtime that exited on its own and left no state needs no
            # `delete` (a process of its own: one spawn fewer per step).
            if exited and exited[0] >= 0 and not (root / cid).exists():
                return
            # Also reaps a container left "created" by a runtime killed mid-start.
            await self._ctl("delete", "--force", cid, root=root)

        stack.push(delete)
        proc = await asyncio.create_subprocess_exec(
            *self._cmd(
                "run", f"--bundle={bundle}", f"--pid-file={pid_file}", cid, log=log, root=root
            ),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        assert proc.stdout is not None and proc.stderr is not None
        pumps = [
            asyncio.ensure_future(_pump(proc.stdout, "stdout", output)),
            asyncio.ensure_future(_pump(proc.stderr, "stderr", output)),
        ]

        async def stop() -> None:
            await self._stop(cid, proc, pid_file, pumps, root)

        stack.push(stop)
        watch = asyncio.ensure_future(acct.watch(lambda: self._ctl("kill", cid, "KILL", root=root)))
        try:
            await asyncio.gather(*pumps)
            rc = await proc.wait()
            exited.append(rc)
        finally:
            watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watch
        # runc and crun exit with the container's status (128+n for a signal);
        # a negative rc means the runtime itself died of signal -rc.
        code = 128 - rc if rc < 0 else rc
        await asyncio.to_thread(acct.report, code)
        if code != 0:
            self._raise_runtime_error(_runtime_errors(log))
        return code

    async def _stop(
        self,
        cid: str,
        proc: asyncio.subprocess.Process,
        pid_file: Path,
        pumps: Sequence[asyncio.Future[None]],
        root: Path,
    ) -> None:
        """Kill the container and reap its runtime; bounded to about a second."""
        if proc.returncode is None:
            # `kill` before the runtime has created the container finds nothing,
            # and killing the runtime mid-create orphans the init it is making:
            # wait (briefly) until the pid file says the container exists.
            await _wait_for(lambda: pid_file.exists() or proc.returncode is not None, _KILL_GRACE)
            await self._ctl("kill", cid, "KILL", root=root)
        if not await _exited(proc, _KILL_GRACE):
            # Wedged: kill the runtime; the `delete --force` that runs next
            # reaps whatever it had made.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await self._ctl("delete", "--force", cid, root=root)
            await _exited(proc, _KILL_GRACE)
        # The pipes close once every process in the container is gone.
        _, pending = await asyncio.wait(pumps, timeout=_KILL_GRACE)
        for p in pending:
            p.cancel()
        if pending:
            await asyncio.wait(pending)
        for p in pumps:
            if not p.cancelled():
                with contextlib.suppress(BaseException):
                    p.result()

    def _raise_runtime_error(self, errors: list[str]) -> None:
        if not errors:
            return
        msg = errors[-1]
        if "hugetlb" in msg or (self._flavour == "crun" and _hugetlb_on_hybrid_v2()):
            raise HostError(
                f"{self._flavour} cannot set up cgroups on this hybrid cgroup host "
                f"(hugetlb sits on the cgroup v2 hierarchy): {msg}; fix: {_HUGETLB_FIX}"
            )
        if _is_exec_failure(msg):
            raise UserError(f"{self._flavour}: {msg}")
        raise RuntimeFailure(f"{self._flavour} run failed: {msg}")


#: how often a running step's cgroup is sampled
_SAMPLE_EVERY = 0.2


def _spec_limits(
    limits: StepLimits, cgroup: StepCgroup | None, own_pids: bool, rootless: bool = False
) -> SpecLimits:
    """``own_pids``: the pids limit is on our cgroup already (``limit_pids``).
    ``rootless`` without a cgroup: no cgroup limits at all, which a rootless
    runtime could only fail to set ("container could not join or create cgroup")."""
    uncgrouped = rootless and cgroup is None
    # A rootless worker's delegated cgroup may lack a controller (the warning said
    # which): the runtime could only fail to set that limit.
    handed = cgroup.handed_down if rootless and cgroup is not None else None

    def has(controller: str) -> bool:
        return not uncgrouped and (handed is None or controller in handed)

    return SpecLimits(
        cgroups_path=cgroup.runtime_path if cgroup is not None else "",
        memory=limits.memory if has("memory") else None,
        pids=None if own_pids or not has("pids") else limits.pids,
        cpus=limits.cpus if has("cpu") else None,
        shm_size=limits.shm_size,
        rlimits=tuple((u.rlimit, u.soft, u.hard) for u in limits.ulimits),
    )


class _Accounting:
    """Watches a running step's cgroup and reports its figures when it ends."""

    def __init__(self, cgroup: StepCgroup | None, process: ProcessSpec) -> None:
        self.cgroup = cgroup
        self.limits = process.limits
        self.sink = process.report
        self.pids_killed = False

    async def watch(self, kill: Callable[[], Awaitable[object]]) -> None:
        if self.cgroup is None:
            return
        while True:
            await asyncio.sleep(_SAMPLE_EVERY)
            sample = await asyncio.to_thread(self.cgroup.sample)
            # A fork the pids limit refused ends the step, as the OOM killer ends
            # one past its memory: a fork bomb may never end by itself (or fizzle
            # out and leave a step that "succeeded"), and a build whose forks
            # fail is broken either way; the error then names the limit.
            if self.limits.pids is not None and sample.pids_refused:
                self.pids_killed = True
                await kill()
                # Sent again each second until the runtime reports the end: a
                # kill that raced the runtime's own bookkeeping must not leave
                # the bomb running.
                await asyncio.sleep(1.0)

    def report(self, code: int) -> None:
        if self.cgroup is None or self.sink is None:
            return
        usage = self.cgroup.usage()
        hit = ""
        memory = self.limits.memory
        # The last sample may have come before the refused fork: the shell of a
        # fork bomb can give up (exit 2) between two samples.
        if self.pids_killed or (self.limits.pids is not None and self.cgroup.sample().pids_refused):
            hit = f"pids limit {self.limits.pids}"
        elif code == 128 + signal.SIGKILL and memory is not None:
            # The kernel's OOM killer sends SIGKILL. v2 counts the kills in our
            # cgroup's subtree; v1 counts them in the runtime's, gone by now, but
            # our high-water mark shows the step's memory reached its limit.
            kills = self.cgroup.oom_kills()
            near = memory - min(1 << 20, memory // 10)
            if kills or (usage.peak_memory is not None and usage.peak_memory >= near):
                hit = f"memory limit {format_bytes(memory)}"
        self.sink(RunReport(usage, hit))


def _hugetlb_on_hybrid_v2() -> bool:
    """True on a hybrid host whose v2 hierarchy holds hugetlb, which crun 1.8 rejects."""
    try:
        controllers = Path("/sys/fs/cgroup/unified/cgroup.controllers").read_text()
    except OSError:
        return False
    return "hugetlb" in controllers.split()


async def _wait_for(cond: Callable[[], bool], timeout: float) -> bool:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not cond():
        if loop.time() >= deadline:
            return False
        await asyncio.sleep(0.01)
    return True


async def _exited(proc: asyncio.subprocess.Process, timeout: float) -> bool:
    # Not proc.wait(): on 3.11 it also waits for the pipes to close, which a
    # surviving container process can hold open for as long as it lives.
    return await _wait_for(lambda: proc.returncode is not None, timeout)


async def _pump(stream: asyncio.StreamReader, name: str, output: OutputSink) -> None:
    while chunk := await stream.read(_CHUNK):
        output(name, chunk)


def _nofile_limit() -> int:
    """Docker's RLIMIT_NOFILE, capped at our own hard limit when we may not raise it.

    Without CAP_SYS_RESOURCE (some sandboxes drop it even for root) the
    runtime's setrlimit above our hard limit fails with EPERM and no step runs.
    """
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # CAP_SYS_RESOURCE of a user namespace's root raises no rlimit: the kernel
    # asks for it in the host's namespace.
    may_raise = _has_cap(_CAP_SYS_RESOURCE) and not in_user_namespace()
    if hard == resource.RLIM_INFINITY or hard >= NOFILE_LIMIT or may_raise:
        return NOFILE_LIMIT
    return hard


def _has_cap(bit: int) -> bool:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> bit & 1)
    return False


def _host_resolv_conf(network: str) -> str:
    try:
        text = Path("/etc/resolv.conf").read_text(errors="replace")
    except OSError:
        return ""
    if network != "host":
        # systemd-resolved's stub (127.0.0.53) is the host's loopback; its
        # upstream servers are in this file (BuildKit reads it too).
        words = [ln.split() for ln in text.splitlines()]
        servers = [w[1] for w in words if len(w) > 1 and w[0] == "nameserver"]
        if servers == ["127.0.0.53"]:
            with contextlib.suppress(OSError):
                return Path("/run/systemd/resolve/resolv.conf").read_text(errors="replace")
    return text


def _write_etc_files(resolv: Path, hosts: Path, process: ProcessSpec, dns: tuple[str, ...]) -> None:
    resolv.write_text(resolv_conf_content(_host_resolv_conf(process.network), process.network, dns))
    hosts.write_text(hosts_content(process.hostname, process.extra_hosts))


def _ensure_dir(root: Path, path: str) -> None:
    target = secure_join(root, path)
    if not target.is_dir():
        target.mkdir(mode=0o755, parents=True, exist_ok=True)


def _mount_private_tmpfs(path: Path) -> None:
    opts = ("nosuid", "nodev", "mode=0700", "size=16m")
    mount_all([Mount("tmpfs", "tmpfs", opts)], path)


def _resolve_targets(root: Path, mounts: Sequence[Mount]) -> tuple[Mount, ...]:
    out = []
    for m in mounts:
        real = secure_join(root, m.target)
        target = "/" + str(real.relative_to(root)) if real != root else "/"
        out.append(Mount(m.type, m.source, m.options, clean(target)))
    return tuple(out)


def _remove_bundle(bundle: Path) -> None:
    # Never rmtree: if unmounting failed, rootfs/ is still the caller's snapshot.
    for name in ("config.json", "resolv.conf", "hosts", "runtime.log", "init.pid"):
        with contextlib.suppress(FileNotFoundError):
            (bundle / name).unlink()
    with contextlib.suppress(FileNotFoundError):
        (bundle / "rootfs").rmdir()
    with contextlib.suppress(FileNotFoundError):
        bundle.rmdir()
