"""The build graph: content-addressed vertices of source, exec and file ops (pure).

A vertex's digest covers its op and its inputs' digests, never its display name,
so two frontends that ask for the same work get the same vertex.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Protocol

from ociworker.core.build import Ulimit
from ociworker.core.digest import Digest, digest_of

# --- ops ---------------------------------------------------------------------


@dataclass(frozen=True)
class SourceOp:
    """Where bytes come from: ``docker-image://REF@DIGEST`` or ``local://NAME``."""

    identifier: str
    attrs: tuple[tuple[str, str], ...] = ()

    def attr(self, name: str, default: str = "") -> str:
        return dict(self.attrs).get(name, default)

    def to_json(self) -> dict[str, Any]:
        return {"source": {"identifier": self.identifier, "attrs": dict(self.attrs)}}


@dataclass(frozen=True)
class HttpSourceOp:
    """A file fetched over HTTP(S) (BuildKit's http source): a snapshot holding
    the one file, named ``filename`` (else from Content-Disposition), mode 0600,
    mtime from Last-Modified. ``checksum`` (``sha256:...``) pins its content.
    Its cache key is the content's digest, found by a conditional request."""

    url: str
    checksum: str = ""
    filename: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"http": {"url": self.url, "checksum": self.checksum, "filename": self.filename}}


@dataclass(frozen=True)
class ExecMount:
    """An extra mount of an exec op (``RUN --mount``); input is an index into the
    vertex's inputs or -1 for none."""

    target: str
    type: str = "bind"
    input: int = -1
    selector: str = "/"
    readonly: bool = True
    options: tuple[tuple[str, str], ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "type": self.type,
            "input": self.input,
            "selector": self.selector,
            "readonly": self.readonly,
            "options": dict(self.options),
        }


@dataclass(frozen=True)
class ExecOp:
    """Run a command with input 0 (or an empty dir) as its writable rootfs."""

    args: tuple[str, ...]
    env: tuple[str, ...] = ()
    cwd: str = "/"
    user: str = ""
    #: "default" (a sandboxed network), "none" or "host" (needs network.host)
    network: str = "default"
    hostname: str = ""
    mounts: tuple[ExecMount, ...] = ()
    #: the build's ``--ulimit``s and ``--shm-size`` (bytes, 0 = default); part of
    #: the step's key as in BuildKit's ``Meta``
    ulimits: tuple[Ulimit, ...] = ()
    shm_size: int = 0
    #: "sandbox" or "insecure" (RUN --security; needs security.insecure)
    security: str = "sandbox"
    #: ("NAME", "IP") lines of the step's /etc/hosts (in the key, as BuildKit's ExtraHosts)
    extra_hosts: tuple[tuple[str, str], ...] = ()

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "args": list(self.args),
            "env": list(self.env),
            "cwd": self.cwd,
            "user": self.user,
            "network": self.network,
            "hostname": self.hostname,
            "mounts": [m.to_json() for m in self.mounts],
        }
        # Each only when set: the keys of every existing step stay as they were.
        if self.security != "sandbox":
            body["security"] = self.security
        if self.extra_hosts:
            body["extra_hosts"] = [list(h) for h in self.extra_hosts]
        if self.ulimits:
            body["ulimits"] = [str(u) for u in self.ulimits]
        if self.shm_size:
            body["shm_size"] = self.shm_size
        return {"exec": body}


@dataclass(frozen=True)
class Copy:
    """Copy ``src`` (a path or wildcard in input ``src_input``) to ``dest`` of the base."""

    src_input: int
    src: str
    dest: str
    chown: str = ""  # "user[:group]", resolved against the destination's passwd/group
    chmod: int | None = None
    follow_symlinks: bool = True
    allow_wildcard: bool = True
    allow_empty_wildcard: bool = False
    create_dest_path: bool = True
    dir_contents_only: bool = True
    dest_is_dir: bool = False  # the caller said so (trailing slash, several sources)
    exclude: tuple[str, ...] = ()  # COPY --exclude patterns, matched below each source
    unpack_archive: bool = False  # ADD: a local tar archive is extracted
    parents: bool = False  # COPY --parents: keep the source's parent dirs under dest
    #: ``--chmod=u+x,g-w``: applied to each copied entry's own mode (``chmod`` is None)
    chmod_symbolic: str = ""
    #: one of several literal sources of a COPY whose dest has no trailing "/":
    #: the dest must then be an existing directory (BuildKit refuses otherwise)
    multi_source: bool = False

    def to_json(self) -> dict[str, Any]:
        body = _fields(self)
        # only when set: the keys of every existing copy step stay as they were
        for key, unset in (("chmod_symbolic", ""), ("multi_source", False)):
            if body[key] == unset:
                del body[key]
        return {"copy": body}


@dataclass(frozen=True)
class Mkdir:
    path: str
    mode: int = 0o755
    make_parents: bool = True
    chown: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"mkdir": _fields(self)}


@dataclass(frozen=True)
class Mkfile:
    path: str
    data: str
    mode: int = 0o644
    chown: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"mkfile": _fields(self)}


@dataclass(frozen=True)
class Rm:
    path: str
    allow_not_found: bool = True
    allow_wildcard: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"rm": _fields(self)}


FileAction = Copy | Mkdir | Mkfile | Rm


@dataclass(frozen=True)
class FileOp:
    """Edit input 0 (or an empty dir) in-process: no container is started."""

    actions: tuple[FileAction, ...]
    cwd: str = "/"

    def to_json(self) -> dict[str, Any]:
        return {"file": {"actions": [a.to_json() for a in self.actions], "cwd": self.cwd}}


@dataclass(frozen=True)
class MergeOp:
    """BuildKit's MergeOp: the inputs' layers applied in order, each input's
    whole chain (its deletions too) over what the inputs before it made. A
    ``None`` input (scratch) adds nothing."""

    def to_json(self) -> dict[str, Any]:
        return {"merge": {}}


@dataclass(frozen=True)
class DiffOp:
    """BuildKit's DiffOp: the changes from input 0 (lower; ``None`` = scratch) to
    input 1 (upper). Mounted on its own it holds the added and changed files;
    its layer (what an image or a later merge takes) also deletes what upper
    removed from lower."""

    def to_json(self) -> dict[str, Any]:
        return {"diff": {}}


#: the op types every worker runs
Op = SourceOp | HttpSourceOp | ExecOp | FileOp | MergeOp | DiffOp


class OpSpec(Protocol):
    """What the graph needs of an op: its JSON, which the vertex digest and the
    cache keys are made of. Besides the ``Op`` types, any op type that has a
    handler registered in ``ociworker.ops.registry`` can stand in a vertex."""

    def to_json(self) -> dict[str, Any]: ...


def _fields(obj: Any) -> dict[str, Any]:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(obj).items()}


# --- vertices ----------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Vertex:
    """One step. ``inputs[i] is None`` stands for an empty filesystem (scratch)."""

    op: OpSpec
    inputs: tuple[Vertex | None, ...] = ()
    name: str = field(default="", compare=False)
    #: progress only; e.g. "[stage-1 2/4] RUN make"
    ignore_cache: bool = field(default=False, compare=False)

    @cached_property
    def digest(self) -> Digest:
        # The inputs' digests first, deepest first, without recursion: a chain
        # of a few hundred steps would otherwise pass Python's stack limit.
        todo: list[Vertex] = [self]
        while todo:
            v = todo[-1]
            missing = [i for i in v.inputs if i is not None and "digest" not in i.__dict__]
            if missing:
                todo.extend(missing)
                continue
            todo.pop()
            if v is not self and "digest" not in v.__dict__:
                v.__dict__["digest"] = v._own_digest()
        return self._own_digest()

    def _own_digest(self) -> Digest:
        """The digest, given that every input's is known already."""
        return digest_of(
            {
                "op": self.op.to_json(),
                "inputs": [i.digest if i is not None else None for i in self.inputs],
            }
        )

    def __hash__(self) -> int:
        return hash(self.digest)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vertex) and other.digest == self.digest

    def walk(self) -> Iterator[Vertex]:
        """Every vertex reachable from here, each once, inputs before users."""
        seen: set[Digest] = set()
        stack: list[tuple[Vertex, bool]] = [(self, False)]
        while stack:
            v, expanded = stack.pop()
            if v.digest in seen:
                continue
            if expanded:
                seen.add(v.digest)
                yield v
                continue
            stack.append((v, True))
            for i in reversed(v.inputs):
                if i is not None and i.digest not in seen:
                    stack.append((i, False))


def graph_to_json(target: Vertex) -> dict[str, Any]:
    """A serialisable definition of the graph (the graph frontend reads this back)."""
    vertices = []
    for v in target.walk():
        vertices.append(
            {
                "digest": v.digest,
                "name": v.name,
                "op": v.op.to_json(),
                "inputs": [i.digest if i is not None else None for i in v.inputs],
            }
        )
    return {"target": target.digest, "vertices": vertices}
