"""The worker: the IO shells wired together, and the handlers that run each op.

This is the one place where concrete snapshotters, executors, differs and the
registry client are chosen (the solver only sees Protocols).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import os
import posixpath
import shutil
import stat
import subprocess
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ociworker.cachedb.records import SQLiteCacheIndex
from ociworker.content.store import ContentStore
from ociworker.core.build import DEFAULT_ROOT as DEFAULT_ROOT
from ociworker.core.digest import Digest, check_digest, digest_of
from ociworker.core.graph import (
    Copy,
    ExecMount,
    ExecOp,
    FileOp,
    Mkdir,
    Mkfile,
    Rm,
    SourceOp,
    Vertex,
)
from ociworker.core.mounts import Mount
from ociworker.core.oci import Descriptor, Layer, Platform
from ociworker.core.progress import VertexLog
from ociworker.diff.base import Applier, Comparer, CompressionOpts
from ociworker.errors import ConfigError, ExecError, HostError, NotFoundError, UserError
from ociworker.executor.base import Executor, ProcessSpec
from ociworker.exporter.image import read_image
from ociworker.exporter.imagestore import ImageStore
from ociworker.exporter.layercache import SQLiteLayerCache
from ociworker.fs import walk
from ociworker.fs.mount import HostMounter, mounted
from ociworker.fs.paths import secure_join
from ociworker.ops import fileactions as fileops
from ociworker.ops.runmount.cache import CacheMounts, CacheSpec
from ociworker.ops.runmount.secret import SecretFile, secret_files
from ociworker.ops.runmount.ssh import AgentSocket, agent_sockets
from ociworker.registry.client import RegistryClient
from ociworker.snapshot import access, open_snapshotter
from ociworker.solver.scheduler import SCRATCH, Job, Result, Solver, default_cache_key
from ociworker.sources.image import (
    ImagePuller,
    PulledImage,
    chain_ids,
    layer_snapshot_name,
    unpack,
)


@dataclass(frozen=True)
class WorkerConfig:
    root: Path = DEFAULT_ROOT
    runtime: str = "runc"
    snapshotter: Literal["auto", "overlayfs", "native"] = "auto"
    insecure_registries: tuple[str, ...] = ()
    max_parallelism: int | None = None
    platform: Platform = field(default_factory=lambda: host_platform())


def host_platform() -> Platform:
    return Platform.parse(os.uname().machine)


@dataclass(frozen=True)
class LocalContext:
    """A local source as the session hands it to the worker."""

    root: Path
    ignore: walk.Ignore | None


class Worker:
    def __init__(self, config: WorkerConfig) -> None:
        self.config = config
        root = config.root.absolute()
        root.mkdir(parents=True, exist_ok=True)
        os.chmod(root, 0o711)
        self.root = root
        self.tmp = root / "tmp"
        self.tmp.mkdir(exist_ok=True)
        self.content = ContentStore(root / "content")
        self.snapshots = open_snapshotter(root / "snapshots", config.snapshotter)
        self.registry = RegistryClient(insecure=config.insecure_registries)
        self.puller = ImagePuller(self.registry, self.content)
        self.images = ImageStore(root / "images")
        self.cache = SQLiteCacheIndex(root / "cache.db", validate=self._valid)
        self.layers = SQLiteLayerCache(root / "cache.db")
        self.mounter = HostMounter(self.tmp)
        self.solver = Solver(_Resolver(self), self.cache, config.max_parallelism)
        self._checksums: dict[tuple[str, int, int, int, int], str] = {}
        self.cache_mounts = CacheMounts(root / "cachemounts")

    # The differ (tar, gzip, zstd) is imported only when a layer is pulled or
    # exported: a fully cached build never needs it, and start-up is most of its cost.
    @functools.cached_property
    def executor(self) -> Executor:
        from ociworker.executor.runtime import OCIRuntimeExecutor

        return OCIRuntimeExecutor(self.root / "executor", self.config.runtime)

    @functools.cached_property
    def applier(self) -> Applier:
        from ociworker.diff.apply import LayerApplier

        return LayerApplier(self.content, scratch_dir=self.tmp)

    @functools.cached_property
    def comparer(self) -> Comparer:
        from ociworker.diff.compare import LayerComparer

        return LayerComparer(self.content, scratch_dir=self.tmp)

    async def aclose(self) -> None:
        await self.registry.aclose()
        self.cache.close()
        self.layers.close()

    async def _valid(self, result: Result) -> bool:
        if result.kind == "snapshot":
            return await self.snapshots.stat(result.ref) is not None
        # local sources are re-read every build; their content is in the keys of
        # the steps that use them
        return result.kind == "none"

    def view(self, name: str | None) -> contextlib.AbstractAsyncContextManager[Path]:
        """A read-only mounted view of a committed snapshot (an empty dir for None)."""
        return access.view(self.snapshots, self.mounter, name, self.tmp)

    async def new_snapshot(
        self, parent: str | None, work: Callable[[Sequence[Mount]], Awaitable[None]]
    ) -> Result:
        return Result("snapshot", await access.new_snapshot(self.snapshots, parent, work))

    async def snapshot_chain(self, name: str | None) -> list[str]:
        return await access.snapshot_chain(self.snapshots, name)

    async def layer_of(self, chain: Sequence[str], index: int, opts: CompressionOpts) -> Layer:
        """The layer blob for chain[index] (its diff from chain[index-1]), made once."""
        name = chain[index]
        comp = opts.compression
        layer = self.layers.get_layer(name, comp) or self.layers.get_layer(name, "source")
        if layer is not None and self.content.has(layer.descriptor.digest):
            return layer
        parent = chain[index - 1] if index else None
        upper_key = f"diff-{uuid.uuid4().hex}"
        lower_key = f"diff-{uuid.uuid4().hex}"
        upper = await self.snapshots.view(upper_key, name)
        try:
            lower: Sequence[Mount] = ()
            if parent is not None:
                lower = await self.snapshots.view(lower_key, parent)
            try:
                layer = await self.comparer.compare(lower, upper, opts)
            finally:
                if parent is not None:
                    await self.snapshots.remove(lower_key)
        finally:
            await self.snapshots.remove(upper_key)
        self.layers.put_layer(name, comp, layer)
        return layer

    # -- local context checksums ----------------------------------------------------

    def content_checksum(self, ctx: LocalContext, copies: Sequence[Copy]) -> str:
        """Digest of the files that ``copies`` select from a local context (content,
        names, modes and link targets; not mtimes), reusing per-file hashes while the
        file's inode, size and times are unchanged."""
        src = walk.Source(ctx.root, ctx.ignore, is_context=True)
        h = hashlib.sha256()
        for copy in copies:
            h.update(b"\x00pattern\x00" + copy.src.encode())
            # the whole subtrees that decide what the copy takes (with --parents a
            # ** reaches below what the pattern names literally)
            for rel in fileops.source_roots(src, copy):
                try:
                    entries = list(walk.walk_selected(src, rel, follow=True))
                except NotFoundError:
                    h.update(b"\x00missing\x00" + rel.encode())
                    continue
                for path, st in entries:
                    h.update(f"\x00{path}\x00{stat.S_IMODE(st.st_mode):o}\x00".encode())
                    if stat.S_ISREG(st.st_mode):
                        h.update(self._file_hash(ctx.root, path, st).encode())
                    elif stat.S_ISLNK(st.st_mode):
                        link = os.readlink(secure_join(ctx.root, path, follow_last=False))
                        h.update(b"L" + link.encode())
                    elif stat.S_ISDIR(st.st_mode):
                        h.update(b"D")
        return "sha256:" + h.hexdigest()

    def _file_hash(self, root: Path, rel: str, st: os.stat_result) -> str:
        real = secure_join(root, rel, follow_last=True)
        key = (str(real), st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        cached = self._checksums.get(key)
        if cached is not None:
            return cached
        h = hashlib.sha256()
        with open(real, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        self._checksums[key] = h.hexdigest()
        return h.hexdigest()

    # -- images ------------------------------------------------------------------------

    def image_from_store(self, reference: str, manifest_digest: Digest) -> PulledImage | None:
        """An image whose manifest, config and layers are all in the content store."""
        if not self.content.has(manifest_digest):
            return None
        manifest, config = read_image(self.content, manifest_digest)
        layers_json = manifest.get("layers") or []
        diff_ids = (config.get("rootfs") or {}).get("diff_ids") or []
        if len(layers_json) != len(diff_ids):
            return None
        layers = []
        for lj, did in zip(layers_json, diff_ids, strict=True):
            desc = Descriptor.from_json(lj)
            if not self.content.has(desc.digest):
                return None
            layers.append(Layer(desc, check_digest(did)))
        cfg_desc = Descriptor.from_json(manifest["config"])
        return PulledImage(
            reference=reference,
            manifest=Descriptor(
                str(manifest.get("mediaType", "")),
                manifest_digest,
                self.content.size(manifest_digest),
            ),
            config=config,
            config_digest=cfg_desc.digest,
            layers=tuple(layers),
        )


class _Resolver:
    def __init__(self, worker: Worker) -> None:
        self._source = _SourceHandler(worker)
        self._exec = _ExecHandler(worker)
        self._file = _FileHandler(worker)

    def handler(self, vertex: Vertex) -> _SourceHandler | _ExecHandler | _FileHandler:
        op = vertex.op
        if isinstance(op, SourceOp):
            return self._source
        if isinstance(op, ExecOp):
            return self._exec
        return self._file


class _SourceHandler:
    def __init__(self, worker: Worker) -> None:
        self.w = worker

    async def cache_key(self, vertex: Vertex, input_keys: Sequence[str], job: Job) -> str:
        return default_cache_key(vertex, input_keys)

    async def run(self, vertex: Vertex, inputs: Sequence[Result], job: Job) -> Result:
        op = vertex.op
        assert isinstance(op, SourceOp)
        scheme, _, rest = op.identifier.partition("://")
        if scheme == "local":
            if rest not in job.locals:
                raise NotFoundError(f"no local source named {rest!r} in this session")
            return Result("dir", rest)
        if scheme != "docker-image":
            raise UserError(f"unsupported source {op.identifier!r}")
        name, _, digest = rest.rpartition("@")
        image = self.w.image_from_store(name, check_digest(digest))
        if image is None:
            # The job's own credentials: under the daemon each client lends its own.
            registry = self.w.registry.with_credentials(job.credentials)
            image = await self.w.puller.pull(rest, self.w.config.platform, client=registry)
        top = await unpack(image, self.w.snapshots, self.w.applier, self.w.snapshots)
        # pulled layers are exported as they came, never diffed again
        for layer, chain_id in zip(image.layers, chain_ids(image.diff_ids), strict=True):
            self.w.layers.put_layer(layer_snapshot_name(chain_id), "source", layer)
        return Result("snapshot", top) if top else SCRATCH


def _root_parent(inputs: Sequence[Result]) -> str | None:
    if not inputs or inputs[0].kind == "none":
        return None
    if inputs[0].kind != "snapshot":
        raise UserError("a step's root must be a snapshot")
    return inputs[0].ref


class _ExecHandler:
    def __init__(self, worker: Worker) -> None:
        self.w = worker

    async def cache_key(self, vertex: Vertex, input_keys: Sequence[str], job: Job) -> str:
        op = vertex.op
        assert isinstance(op, ExecOp)
        # a bind of the context selects its subtree as a COPY of it would
        return await _context_keyed(
            self.w,
            vertex,
            input_keys,
            job,
            lambda i: [
                Copy(i, m.selector, "/", allow_wildcard=False)
                for m in op.mounts
                if m.type == "bind" and m.input == i
            ],
        )

    async def run(self, vertex: Vertex, inputs: Sequence[Result], job: Job) -> Result:
        op = vertex.op
        assert isinstance(op, ExecOp)

        def out(stream: str, data: bytes) -> None:
            job.events(VertexLog(vertex.digest, 1 if stream == "stdout" else 2, data, time.time()))

        async def run_in(rootfs: Sequence[Mount]) -> None:
            async with contextlib.AsyncExitStack() as stack:
                mounts, env, secret_env = await self._mounts(stack, op, inputs, job)
                process = ProcessSpec(
                    args=op.args,
                    env=(*op.env, *env),
                    cwd=op.cwd or "/",
                    user=op.user,
                    hostname=op.hostname or "buildkitsandbox",
                    network="none" if op.network == "none" else "host",
                    secret_env=secret_env,
                )
                code = await self.w.executor.run(rootfs, process, mounts, out)
            if code != 0:
                # The command line is the Dockerfile's text, never a secret's value.
                raise ExecError(vertex.name or "RUN", " ".join(op.args), code)

        return await self.w.new_snapshot(_root_parent(inputs), run_in)

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
        secret_paths = await stack.enter_async_context(secret_files(self.w.tmp, files))
        socket_paths = await stack.enter_async_context(agent_sockets(self.w.tmp, job.ssh, sockets))
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
                await _copy_tree(src, dst)

        path = await stack.enter_async_context(
            self.w.cache_mounts.acquire(spec, m.selector, seed if m.input >= 0 else None)
        )
        return Mount("bind", str(path), ("rbind", "ro" if m.readonly else "rw"), m.target)

    async def _input_root(
        self, stack: contextlib.AsyncExitStack, m: ExecMount, inputs: Sequence[Result], job: Job
    ) -> Path:
        if m.input >= len(inputs):
            raise UserError(
                f"mount at {m.target} names input {m.input}, the step has {len(inputs)}"
            )
        r = inputs[m.input]
        if r.kind == "dir":
            ctx = job.locals.get(r.ref)
            if not isinstance(ctx, LocalContext):
                raise NotFoundError(f"no local source named {r.ref!r} in this session")
            return ctx.root
        return await stack.enter_async_context(self.w.view(r.ref if r.kind == "snapshot" else None))

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
        if m.input >= len(inputs):
            raise UserError(
                f"mount at {m.target} names input {m.input}, the step has {len(inputs)}"
            )
        r = inputs[m.input]
        rw = "ro" if m.readonly else "rw"
        if r.kind == "dir":
            ctx = job.locals.get(r.ref)
            if not isinstance(ctx, LocalContext):
                raise NotFoundError(f"no local source named {r.ref!r} in this session")
            has_rules = bool(getattr(ctx.ignore, "patterns", ()))
            if m.readonly and not has_rules:
                src = secure_join(ctx.root, m.selector)
                if not os.path.exists(src):
                    raise NotFoundError(
                        f"RUN --mount source {m.selector!r} not found in build context"
                    )
                return Mount("bind", str(src), ("rbind", "ro"), m.target)
            scratch = Path(
                await asyncio.to_thread(tempfile.mkdtemp, dir=self.w.tmp, prefix="bind-")
            )
            stack.push_async_callback(asyncio.to_thread, shutil.rmtree, scratch, True)
            src_path = await asyncio.to_thread(_copy_context, ctx, m.selector, scratch)
            return Mount("bind", str(src_path), ("rbind", rw), m.target)
        if r.kind == "snapshot" and not m.readonly:
            key = f"bind-{uuid.uuid4().hex}"
            mounts = await self.w.snapshots.prepare(key, r.ref)
            stack.push_async_callback(self.w.snapshots.remove, key)
            root = await stack.enter_async_context(mounted(mounts, self.w.tmp))
        else:
            root = await stack.enter_async_context(
                self.w.view(r.ref if r.kind == "snapshot" else None)
            )
        source = secure_join(root, m.selector)
        if not os.path.lexists(source):
            raise NotFoundError(f"RUN --mount source {m.selector!r} not found")
        return Mount("bind", str(source), ("rbind", rw), m.target)


async def _context_keyed(
    w: Worker,
    vertex: Vertex,
    input_keys: Sequence[str],
    job: Job,
    selected: Callable[[int], list[Copy]],
) -> str:
    """The step's cache key, with each local-context input keyed by the content
    of the files the step selects from it (``selected(input index)``), not by
    the whole context: a change elsewhere in the context invalidates nothing,
    a change to a selected file does."""
    keys = list(input_keys)
    for i, inp in enumerate(vertex.inputs):
        ctx = _local_context(inp, job)
        if ctx is not None:
            keys[i] = await asyncio.to_thread(w.content_checksum, ctx, selected(i))
    return digest_of({"op": vertex.op.to_json(), "inputs": keys})


def _local_context(inp: Vertex | None, job: Job) -> LocalContext | None:
    if inp is None or not isinstance(inp.op, SourceOp):
        return None
    if not inp.op.identifier.startswith("local://"):
        return None
    ctx = job.locals.get(inp.op.identifier.removeprefix("local://"))
    return ctx if isinstance(ctx, LocalContext) else None


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


async def _copy_tree(src: Path, dst: Path) -> None:
    """Copy ``src`` into ``dst`` keeping owners, modes, links and times."""
    proc = await asyncio.create_subprocess_exec(
        "cp",
        "-a",
        "-T",
        "--",
        str(src),
        str(dst),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    _, err = await proc.communicate()
    if proc.returncode != 0:
        raise HostError(f"seeding cache mount failed: {err.decode(errors='replace').strip()}")


class _FileHandler:
    def __init__(self, worker: Worker) -> None:
        self.w = worker

    async def cache_key(self, vertex: Vertex, input_keys: Sequence[str], job: Job) -> str:
        op = vertex.op
        assert isinstance(op, FileOp)
        return await _context_keyed(
            self.w,
            vertex,
            input_keys,
            job,
            lambda i: [a for a in op.actions if isinstance(a, Copy) and a.src_input == i],
        )

    async def run(self, vertex: Vertex, inputs: Sequence[Result], job: Job) -> Result:
        op = vertex.op
        assert isinstance(op, FileOp)

        async def edit(mounts: Sequence[Mount]) -> None:
            async with contextlib.AsyncExitStack() as stack:
                dest = await stack.enter_async_context(mounted(mounts, self.w.tmp))
                sources: dict[int, walk.Source] = {}
                for a in op.actions:
                    if isinstance(a, Copy) and a.src_input not in sources:
                        sources[a.src_input] = await self._source(stack, inputs, a.src_input, job)
                await asyncio.to_thread(_apply_actions, dest, op, sources)

        return await self.w.new_snapshot(_root_parent(inputs), edit)

    async def _source(
        self, stack: contextlib.AsyncExitStack, inputs: Sequence[Result], i: int, job: Job
    ) -> walk.Source:
        if i >= len(inputs):
            raise UserError(f"copy names input {i}, but the step has {len(inputs)}")
        r = inputs[i]
        if r.kind == "dir":
            ctx = job.locals.get(r.ref)
            if not isinstance(ctx, LocalContext):
                raise NotFoundError(f"no local source named {r.ref!r} in this session")
            return walk.Source(ctx.root, ctx.ignore, is_context=True)
        root = await stack.enter_async_context(self.w.view(r.ref if r.kind == "snapshot" else None))
        return walk.Source(root)


def _apply_actions(dest: Path, op: FileOp, sources: dict[int, walk.Source]) -> None:
    for a in op.actions:
        if isinstance(a, Copy):
            fileops.do_copy(dest, sources[a.src_input], a, op.cwd)
        elif isinstance(a, Mkdir):
            fileops.do_mkdir(dest, a, op.cwd)
        elif isinstance(a, Mkfile):
            fileops.do_mkfile(dest, a, op.cwd)
        elif isinstance(a, Rm):
            fileops.do_rm(dest, a, op.cwd)
