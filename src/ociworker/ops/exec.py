"""The handler of ``ExecOp``: a command run by the ``Executor`` on a new
snapshot of input 0, with the step's ``RUN --mount``s (bind, cache, tmpfs,
secret, ssh) set up around it."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import posixpath
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from pathlib import Path

from ociworker.core.entitlements import NETWORK_HOST, SECURITY_INSECURE, require_entitlement
from ociworker.core.graph import Copy, ExecMount, ExecOp, OpSpec, Vertex
from ociworker.core.mounts import Mount
from ociworker.core.progress import VertexLog, VertexStatus
from ociworker.errors import ConfigError, ExecError, NotFoundError, UserError
from ociworker.executor.base import (
    Executor,
    NetworkMode,
    Preparing,
    ProcessSpec,
    RunReport,
    StepLimits,
)
from ociworker.fs import walk
from ociworker.fs.paths import secure_join
from ociworker.ops import fileactions as fileops
from ociworker.ops.context import (
    LocalContext,
    local_context,
    root_parent,
    step_input,
)
from ociworker.ops.parts import StepDeps, StepHandler
from ociworker.ops.runmount.cache import CacheMounts, CacheSpec, copy_seed
from ociworker.ops.runmount.secret import SecretFile, secret_files
from ociworker.ops.runmount.ssh import AgentSocket, agent_sockets
from ociworker.snapshot import access
from ociworker.solver.scheduler import Job, Result

#: host paths of a step's secret files, that exist only inside the ``with``
#: (``runmount.secret.secret_files``: on a tmpfs of the step's own)
SecretFiles = Callable[[Path, Sequence[SecretFile]], AbstractAsyncContextManager[list[Path]]]


@dataclass(frozen=True)
class ExecDeps(StepDeps):
    executor: Executor
    cache_mounts: CacheMounts
    secret_files: SecretFiles = secret_files
    step_limits: StepLimits = field(default_factory=StepLimits)
    #: entitlements the worker grants (``WorkerConfig.entitlements``)
    entitlements: tuple[str, ...] = ()


def _network_mode(name: str) -> NetworkMode:
    # The controller has checked the entitlement for host before anything ran.
    if name in ("default", "none", "host"):
        return name  # type: ignore[return-value]
    raise UserError(f"unknown network mode {name!r}: use default, none or host")


class ExecHandler(StepHandler[ExecDeps]):
    deps_type = ExecDeps

    @staticmethod
    def selected(op: OpSpec, index: int) -> list[Copy]:
        """What the step's binds take from input ``index``: as a COPY of that
        subtree would (a bind of the context selects its subtree)."""
        assert isinstance(op, ExecOp)
        return [
            Copy(index, m.selector, "/", allow_wildcard=False)
            for m in op.mounts
            if m.type == "bind" and m.input == index
        ]

    async def cache_key(self, vertex: Vertex, input_keys: Sequence[str], job: Job) -> str:
        # Every vertex's key is computed before any lookup, so a step refused
        # here is refused even when its result is in the cache (as BuildKit
        # validates entitlements on the whole definition before solving).
        check_entitlements(vertex, self.deps.entitlements, job.entitlements)
        return await super().cache_key(vertex, input_keys, job)

    def will_run(self, vertex: Vertex, job: Job) -> None:
        assert isinstance(vertex.op, ExecOp)
        if isinstance(self.deps.executor, Preparing):
            with contextlib.suppress(UserError):  # a bad mode is run()'s to report
                self.deps.executor.prepare(_network_mode(vertex.op.network))

    async def run(self, vertex: Vertex, inputs: Sequence[Result], job: Job) -> Result:
        op = vertex.op
        assert isinstance(op, ExecOp)
        check_entitlements(vertex, self.deps.entitlements, job.entitlements)

        def out(stream: str, data: bytes) -> None:
            job.events(VertexLog(vertex.digest, 1 if stream == "stdout" else 2, data, time.time()))

        reports: list[RunReport] = []

        async def run_in(rootfs: Sequence[Mount]) -> None:
            async with contextlib.AsyncExitStack() as stack:
                mounts, env, secret_env = await self._mounts(stack, op, inputs, job)
                process = ProcessSpec(
                    args=op.args,
                    env=(*op.env, *env),
                    cwd=op.cwd or "/",
                    user=op.user,
                    hostname=op.hostname or "buildkitsandbox",
                    network=_network_mode(op.network),
                    security="insecure" if op.security == "insecure" else "sandbox",
                    extra_hosts=op.extra_hosts,
                    secret_env=secret_env,
                    limits=dataclasses.replace(
                        self.deps.step_limits,
                        ulimits=op.ulimits,
                        shm_size=op.shm_size or None,
                    ),
                    report=reports.append,
                )
                code = await self.deps.executor.run(rootfs, process, mounts, out)
            hit = ""
            if reports:
                # Its own status, before the scheduler's ``completed`` one: the
                # printers keep the figures and show them with the step's end.
                job.events(VertexStatus(vertex.digest, vertex.name, usage=reports[-1].usage))
                hit = reports[-1].limit_hit
            if code != 0:
                # The command line is the Dockerfile's text, never a secret's value.
                raise ExecError(vertex.name or "RUN", " ".join(op.args), code, killed_by=hit)

        parent = root_parent(inputs)
        return Result("snapshot", await access.new_snapshot(self.deps.snapshots, parent, run_in))

    def _view(self, r: Result) -> AbstractAsyncContextManager[Path]:
        d = self.deps
        return access.view(
            d.snapshots, d.mounter, r.ref if r.kind == "snapshot" else None, d.scratch
        )

    async def _mounts(
        self,
        stack: contextlib.AsyncExitStack,
        op: ExecOp,
        inputs: Sequence[Result],
        job: Job,
    ) -> tuple[list[Mount], list[str], tuple[str, ...]]:
        """The step's extra mounts, the env entries they add, and the secret env."""
        slots: list[tuple[ExecMount, Mount | int | None]] = []
        files: list[SecretFile] = []
        sockets: list[AgentSocket] = []
        env: list[str] = []
        secret_env: list[str] = []
        for m in op.mounts:
            opts = dict(m.options)
            if m.type == "bind":
                slots.append((m, await self._bind_input(stack, m, inputs, job)))
            elif m.type == "cache":
                slots.append((m, await self._cache(stack, m, inputs, job)))
            elif m.type == "tmpfs":
                tmpfs_opts = ["nosuid", "nodev"]
                if opts.get("size"):
                    tmpfs_opts.append(f"size={opts['size']}")
                slots.append((m, Mount("tmpfs", "tmpfs", tuple(tmpfs_opts), m.target)))
            elif m.type == "secret":
                sid = opts.get("id", "")
                value = await job.secrets.get_secret(sid)
                if value is None:
                    if opts.get("required") == "true":
                        raise NotFoundError(
                            f"secret {sid!r} not found: the step requires it "
                            f"(pass --secret id={sid},src=FILE or id={sid},env=VAR)"
                        )
                    continue  # as BuildKit: an absent optional secret is just absent
                if opts.get("env"):
                    try:
                        secret_env.append(f"{opts['env']}={value.decode()}")
                    except UnicodeDecodeError:
                        raise UserError(
                            f"secret {sid!r} is not UTF-8 text, it cannot be put in "
                            f"env {opts['env']}"
                        ) from None
                if m.target:
                    slots.append((m, len(files)))
                    files.append(SecretFile(value, *_mode_uid_gid(opts, 0o400)))
            elif m.type == "ssh":
                aid = opts.get("id", "default")
                if not job.ssh.has_agent(aid):
                    if opts.get("required") == "true":
                        raise NotFoundError(
                            f"no SSH key {aid!r} forwarded from the client "
                            f"(pass --ssh {aid}=SOCKET|KEYFILE, or --ssh default)"
                        )
                    continue
                if not sockets:
                    env.append(f"SSH_AUTH_SOCK={m.target}")
                slots.append((m, -1 - len(sockets)))
                sockets.append(AgentSocket(aid, *_mode_uid_gid(opts, 0o600)))
            else:
                raise UserError(f"mount type {m.type!r} is not supported")
        scratch = self.deps.scratch
        secret_paths = await stack.enter_async_context(self.deps.secret_files(scratch, files))
        socket_paths = await stack.enter_async_context(agent_sockets(scratch, job.ssh, sockets))
        mounts: list[Mount] = []
        for m, slot in slots:
            if isinstance(slot, Mount):
                mounts.append(slot)
            elif isinstance(slot, int) and slot >= 0:
                src = str(secret_paths[slot])
                mounts.append(Mount("bind", src, ("bind", "ro", "nosuid", "nodev"), m.target))
            elif isinstance(slot, int):
                src = str(socket_paths[-1 - slot])
                mounts.append(Mount("bind", src, ("bind", "nosuid", "nodev"), m.target))
        # Parents before children, whatever order the Dockerfile gave them in.
        mounts.sort(key=lambda mt: len([p for p in mt.target.split("/") if p]))
        return mounts, env, tuple(secret_env)

    async def _cache(
        self, stack: contextlib.AsyncExitStack, m: ExecMount, inputs: Sequence[Result], job: Job
    ) -> Mount:
        spec = CacheSpec.from_options(dict(m.options), m.target)

        async def seed(dest: Path) -> None:
            # A new cache starts as from=STAGE's (or image's) source= dir.
            async with contextlib.AsyncExitStack() as s:
                root = await self._input_root(s, m, inputs, job)
                src = secure_join(root, m.selector)
                if not src.is_dir():
                    return
                dst = secure_join(dest, m.selector)
                dst.parent.mkdir(parents=True, exist_ok=True)
                await copy_seed(src, dst)

        path = await stack.enter_async_context(
            self.deps.cache_mounts.acquire(
                spec, m.selector, seed if m.input >= 0 else None, pin_in=self.deps.scratch
            )
        )
        return Mount("bind", str(path), ("rbind", "ro" if m.readonly else "rw"), m.target)

    async def _input_root(
        self, stack: contextlib.AsyncExitStack, m: ExecMount, inputs: Sequence[Result], job: Job
    ) -> Path:
        r = _mount_input(m, inputs)
        if r.kind == "dir":
            return local_context(job, r.ref).root
        return await stack.enter_async_context(self._view(r))

    async def _bind_input(
        self, stack: contextlib.AsyncExitStack, m: ExecMount, inputs: Sequence[Result], job: Job
    ) -> Mount:
        """A bind mount of (a path in) one of the step's inputs.

        A snapshot input is a read-only view, or with ``rw`` a throwaway active
        snapshot whose writes are discarded after the step. A local context is
        bound as it is, read-only, unless .dockerignore rules hide part of it or
        the mount is ``rw``: then the selected files are copied to a scratch dir
        for the step, so the step sees exactly what its cache key covers.
        """
        r = _mount_input(m, inputs)
        rw = "ro" if m.readonly else "rw"
        d = self.deps
        if r.kind == "dir":
            ctx = local_context(job, r.ref)
            has_rules = bool(getattr(ctx.ignore, "patterns", ()))
            if m.readonly and not has_rules:
                src = secure_join(ctx.root, m.selector)
                if not os.path.exists(src):
                    raise NotFoundError(
                        f"RUN --mount source {m.selector!r} not found in build context"
                    )
                return Mount("bind", str(src), ("rbind", "ro"), m.target)
            scratch = Path(await asyncio.to_thread(tempfile.mkdtemp, dir=d.scratch, prefix="bind-"))
            stack.push_async_callback(asyncio.to_thread, shutil.rmtree, scratch, True)
            src_path = await asyncio.to_thread(_copy_context, ctx, m.selector, scratch)
            return Mount("bind", str(src_path), ("rbind", rw), m.target)
        if r.kind == "snapshot" and not m.readonly:
            key = f"bind-{uuid.uuid4().hex}"
            mounts = await d.snapshots.prepare(key, r.ref)
            stack.push_async_callback(d.snapshots.remove, key)
            root = await stack.enter_async_context(d.mounter.mounted(mounts))
        else:
            root = await stack.enter_async_context(self._view(r))
        source = secure_join(root, m.selector)
        if not os.path.lexists(source):
            raise NotFoundError(f"RUN --mount source {m.selector!r} not found")
        return Mount("bind", str(source), ("rbind", rw), m.target)


def check_entitlements(vertex: Vertex, allowed: Sequence[str], requested: Sequence[str]) -> None:
    """Refuse an exec step that needs an entitlement the worker or the build withholds."""
    op = vertex.op
    assert isinstance(op, ExecOp)
    step = vertex.name or "RUN " + " ".join(op.args)
    if op.network == "host":
        require_entitlement(NETWORK_HOST, allowed, requested, step)
    if op.security == "insecure":
        require_entitlement(SECURITY_INSECURE, allowed, requested, step)
    elif op.security != "sandbox":
        raise UserError(f"step {step}: unknown security mode {op.security!r}")


def _mount_input(m: ExecMount, inputs: Sequence[Result]) -> Result:
    return step_input(
        inputs, m.input, lambda n: f"mount at {m.target} names input {m.input}, the step has {n}"
    )


def _mode_uid_gid(opts: dict[str, str], default_mode: int) -> tuple[int, int, int]:
    try:
        mode = int(opts["mode"], 8) if opts.get("mode") else default_mode
        return mode, int(opts.get("uid") or 0), int(opts.get("gid") or 0)
    except ValueError as exc:
        raise ConfigError(f"invalid mount mode/uid/gid: {exc}") from None


def _copy_context(ctx: LocalContext, selector: str, scratch: Path) -> Path:
    """Copy what ``selector`` names from the context (minus ignored files) into
    ``scratch``; the path to bind."""
    src = walk.Source(ctx.root, ctx.ignore, is_context=True)
    rel = selector.strip("/")
    top = secure_join(ctx.root, rel)
    if rel and not top.is_dir():
        fileops.do_copy(scratch, src, Copy(0, rel, "/", allow_wildcard=False), "/")
        return scratch / posixpath.basename(rel.rstrip("/"))
    fileops.do_copy(scratch, src, Copy(0, rel or "/", "/", allow_wildcard=False), "/")
    return scratch
