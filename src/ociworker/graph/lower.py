"""``State`` -> the worker's vertices and image config (pure).

The point of this module is the cache: a state lowers to exactly the vertices
the Dockerfile frontend makes for the same instructions (same op JSON: the
environment list, cwd, user, mounts, copy fields), so a Python build and a
Dockerfile build share every cache record. Where a rule exists in the
Dockerfile converter it is taken from there, not restated.

Like the converter, lowering needs the config of every base image: it records
what it was not given in ``Plan.missing``; the caller resolves those (IO) and
lowers again (``image_refs`` lists them up front).
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ociworker.core.build import NAMED_LOCAL_PREFIX
from ociworker.core.filemode import is_symbolic_mode
from ociworker.core.gitref import parse_git_ref, redact
from ociworker.core.graph import (
    Copy,
    DiffOp,
    ExecMount,
    ExecOp,
    FileOp,
    HttpSourceOp,
    MergeOp,
    Mkdir,
    Mkfile,
    Rm,
    SourceOp,
    Vertex,
)
from ociworker.core.oci import Platform
from ociworker.errors import UnsupportedError, UserError
from ociworker.frontend.dockerfile.convert import (
    CONTEXT,
    DEFAULT_PATH,
    DEFAULT_SHELL,
    HISTORY_COMMENT,
    ImageInfo,
    Plan,
    _abs,
    _clean_dir,
    _copy_config,
    _go_list,
    url_filename,
)
from ociworker.graph.state import (
    BindMount,
    CacheMount,
    ConfigNode,
    CopyNode,
    DiffNode,
    GitNode,
    HttpNode,
    ImageNode,
    LocalNode,
    MergeNode,
    MkdirNode,
    MkfileNode,
    Mount,
    Node,
    RmNode,
    RunNode,
    ScratchNode,
    SecretMount,
    SSHMount,
    State,
    TmpfsMount,
)

#: the history comment of steps no Dockerfile instruction makes (mkdir, merge, ...)
GRAPH_COMMENT = "ociworker.graph.v1"


#: history entries as a linked list, newest first (None: none)
_Entries = tuple[dict[str, Any], "_Entries"] | None


@dataclass
class _Lowered:
    """One state lowered: what the converter's per-stage ``_State`` holds."""

    vertex: Vertex | None
    config: dict[str, Any]
    #: the state's own history entries, newest first as a linked list: a child
    #: shares its parent's instead of copying it (a copy per step made long
    #: chains quadratic); ``entries`` gives them in order
    history: _Entries
    base_history: list[dict[str, Any]]
    base_layers: int
    #: what ``run`` sees: the config's Env, in order
    env: dict[str, str]
    cmd_set: bool = False
    #: ``with_arg``s so far, in order (what a RUN's history lists)
    build_args: dict[str, str] = field(default_factory=dict)
    #: the state's own source vertex when it is a local, git or http source:
    #: what a copy or a bind mount takes from it (its root is a copy of it)
    source: Vertex | None = None

    def child(self) -> _Lowered:
        return _Lowered(
            self.vertex,
            _copy_config(self.config),
            self.history,
            self.base_history,
            self.base_layers,
            dict(self.env),
            self.cmd_set,
            dict(self.build_args),
        )

    def entries(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        node = self.history
        while node is not None:
            out.append(node[0])
            node = node[1]
        out.reverse()
        return out

    @property
    def workdir(self) -> str:
        return str(self.config.get("WorkingDir") or "/")

    @property
    def shell(self) -> tuple[str, ...]:
        return tuple(self.config.get("Shell") or DEFAULT_SHELL)


def _inputs_of(node: Node) -> list[State]:
    """The states a node is made from (lowered first)."""
    if isinstance(node, RunNode):
        extra = [m.state for m in node.mounts if isinstance(m, BindMount)]
        extra += [
            m.from_state
            for m in node.mounts
            if isinstance(m, CacheMount) and m.from_state is not None
        ]
        return [node.parent, *extra]
    if isinstance(node, CopyNode):
        return [node.parent, node.source]
    if isinstance(node, MkdirNode | MkfileNode | RmNode | ConfigNode):
        return [node.parent]
    if isinstance(node, MergeNode):
        return list(node.inputs)
    if isinstance(node, DiffNode):
        return [node.lower, node.upper]
    return []


def _post_order(target: State) -> list[State]:
    """Every state ``target`` is made of, each once, inputs first (no recursion:
    a chain of thousands of steps must not hit Python's stack limit)."""
    order: list[State] = []
    done: set[int] = set()
    stack: list[tuple[State, bool]] = [(target, False)]
    while stack:
        st, expanded = stack.pop()
        if id(st) in done:
            continue
        if expanded:
            done.add(id(st))
            order.append(st)
            continue
        stack.append((st, True))
        for i in reversed(_inputs_of(st.node)):
            if not isinstance(i, State):
                raise UserError(f"a graph input must be a State, not {type(i).__name__}")
            if id(i) not in done:
                stack.append((i, False))
    return order


def image_refs(target: State) -> list[str]:
    """The image references ``target`` needs resolved, in first-use order."""
    refs = [s.node.ref for s in _post_order(target) if isinstance(s.node, ImageNode)]
    return list(dict.fromkeys(refs))


def lower(
    target: State,
    images: Mapping[str, ImageInfo],
    platform: Platform | None = None,
    context_ignore: Sequence[str] = (),
) -> Plan:
    """``target`` as the worker's graph plus its image config, given the
    resolved base images (by reference as written; missing ones are listed
    in ``Plan.missing`` and stand as unresolved sources). ``context_ignore``:
    the context's .dockerignore patterns, which a ``local()`` of the context
    given no include / exclude of its own takes (as a Dockerfile's context)."""
    return _Lowering(images, platform or Platform(), tuple(context_ignore)).plan(target)


class _Lowering:
    def __init__(
        self, images: Mapping[str, ImageInfo], platform: Platform, context_ignore: tuple[str, ...]
    ) -> None:
        self.images = images
        self.platform = platform
        self.context_ignore = context_ignore
        self.missing: list[str] = []
        self.done: dict[int, _Lowered] = {}

    def plan(self, target: State) -> Plan:
        for st in _post_order(target):
            self.done[id(st)] = self._node(st.node)
        low = self.done[id(target)]
        cfg: dict[str, Any] = {
            "architecture": self.platform.architecture,
            "os": self.platform.os,
        }
        if self.platform.variant:
            cfg["variant"] = self.platform.variant
        cfg["config"] = {k: v for k, v in low.config.items() if v not in (None, [], {}, "")}
        cfg["history"] = low.base_history + low.entries()
        return Plan(
            target=low.vertex,
            config=cfg,
            base_history=tuple(low.base_history),
            base_layers=low.base_layers,
            missing=tuple(dict.fromkeys(self.missing)),
            warnings=(),
        )

    def _of(self, st: State) -> _Lowered:
        return self.done[id(st)]

    # -- sources --------------------------------------------------------------------

    def _node(self, node: Node) -> _Lowered:
        if isinstance(node, ScratchNode):
            # BuildKit's config of a scratch image says WorkingDir "/"
            return self._with_path(_Lowered(None, {"WorkingDir": "/"}, None, [], 0, {}))
        if isinstance(node, ImageNode):
            return self._image(node)
        if isinstance(node, LocalNode | GitNode | HttpNode):
            return self._fs_source(node)
        if isinstance(node, RunNode):
            return self._run(node)
        if isinstance(node, CopyNode):
            return self._copy(node)
        if isinstance(node, MkdirNode | MkfileNode | RmNode):
            return self._file(node)
        if isinstance(node, ConfigNode):
            return self._config(node)
        if isinstance(node, MergeNode):
            return self._merge(node)
        return self._diff(node)

    @staticmethod
    def _with_path(low: _Lowered) -> _Lowered:
        # the converter's rule: an image without PATH gets the default one
        env = list(low.config.get("Env") or [])
        if not any(e.startswith("PATH=") for e in env):
            low.config["Env"] = [*env, f"PATH={DEFAULT_PATH}"]
        for e in low.config["Env"]:
            k, _, v = e.partition("=")
            low.env[k] = v
        return low

    def _image(self, node: ImageNode) -> _Lowered:
        if node.platform:
            try:
                want = Platform.parse(node.platform)
            except ValueError as exc:
                raise UserError(f"image {node.ref}: {exc}") from None
            if (want.os, want.architecture) != (self.platform.os, self.platform.architecture):
                raise UnsupportedError(
                    f"image {node.ref}: platform {node.platform} is not supported on this "
                    f"worker ({self.platform}): cross-building is not available yet"
                )
        info = self.images.get(node.ref)
        if info is None:
            self.missing.append(node.ref)
            info = ImageInfo(ref=f"{node.ref}@unresolved", config={})
        config = _copy_config(info.config.get("config") or {})
        # ONBUILD triggers are a Dockerfile's: a graph runs only its own steps
        config.pop("OnBuild", None)
        hist = [dict(h) for h in (info.config.get("history") or [])]
        diff_ids = (info.config.get("rootfs") or {}).get("diff_ids") or []
        vertex = None
        if diff_ids:
            vertex = Vertex(SourceOp("docker-image://" + info.ref), (), name=f"FROM {info.ref}")
        return self._with_path(_Lowered(vertex, config, None, hist, len(diff_ids), {}))

    def _source_vertex(self, node: LocalNode | GitNode | HttpNode) -> Vertex:
        if isinstance(node, LocalNode):
            attrs: list[tuple[str, str]] = []
            exclude = node.exclude
            if node.name == CONTEXT and not (node.include or node.exclude):
                exclude = self.context_ignore
            if exclude:
                attrs.append(("excludepatterns", json.dumps(list(exclude))))
            if node.include:
                attrs.append(("includepatterns", json.dumps(list(node.include))))
            if node.name == CONTEXT:
                return Vertex(
                    SourceOp("local://" + CONTEXT, tuple(attrs)),
                    (),
                    name="[internal] load build context",
                )
            # as a Dockerfile's --build-context NAME=DIR names it
            return Vertex(
                SourceOp("local://" + NAMED_LOCAL_PREFIX + node.name, tuple(attrs)),
                (),
                name=f"[internal] load build context {node.name}",
            )
        if isinstance(node, GitNode):
            ref = parse_git_ref(node.url)
            if ref.password or ref.username:
                raise UserError(
                    f"git {ref.shown}: a credential in a git URL would be kept in the "
                    "graph; pass it as a GIT_AUTH_TOKEN secret instead"
                )
            attrs = [("git.keepgitdir", "true" if node.keep_git_dir else "false")]
            return Vertex(
                SourceOp("git://" + ref.shown, tuple(attrs)),
                (),
                name=f"[internal] load git source {ref.shown}",
            )
        fname = node.filename or url_filename(node.url)
        return Vertex(HttpSourceOp(node.url, node.checksum, fname), (), name=redact(node.url))

    def _fs_source(self, node: LocalNode | GitNode | HttpNode) -> _Lowered:
        """A source as a root filesystem: a copy of its files into scratch, as the
        converter makes ``FROM`` a named DIR, git or URL context."""
        src = self._source_vertex(node)
        shown = node.name if isinstance(node, LocalNode) else redact(node.url)
        root = Vertex(
            FileOp((Copy(src_input=1, src="/", dest="/"),), cwd="/"),
            (None, src),
            name=f"[{shown}] load from client"
            if isinstance(node, LocalNode)
            else f"[context] {shown}",
        )
        low = self._with_path(_Lowered(root, {}, None, [], 0, {}))
        low.source = src
        return low

    def _as_input(self, st: State) -> Vertex | None:
        """What a copy or a bind mount takes from ``st``: a source's own vertex
        (a local dir is read in place), else its filesystem."""
        low = self._of(st)
        return low.source if low.source is not None else low.vertex

    # -- steps --------------------------------------------------------------------

    def _run(self, node: RunNode) -> _Lowered:
        parent = self._of(node.parent)
        low = parent.child()
        wd = low.workdir
        inputs: list[Vertex | None] = [low.vertex]
        mounts: list[ExecMount] = []
        ssh_index = 0
        for m in node.mounts:
            mounts.append(self._mount(m, wd, inputs, ssh_index))
            ssh_index += isinstance(m, SSHMount)
        args = [*low.shell, node.args[0]] if node.shell else list(node.args)
        env = dict(low.env)
        env.update(node.env)
        cwd = _clean_dir(wd if node.cwd is None else posixpath.join(wd, node.cwd))
        op = ExecOp(
            args=tuple(args),
            env=tuple(f"{k}={v}" for k, v in env.items()),
            cwd=cwd,
            user=node.user if node.user is not None else str(low.config.get("User") or ""),
            network=node.network,
            mounts=tuple(mounts),
            security=node.security,
        )
        text = "RUN " + " ".join(args)
        low.vertex = Vertex(op, tuple(inputs), name=text)
        # as the converter's _run_history: the ARGs seen so far, by their values now
        seen = [f"{k}={low.env.get(k, v)}" for k, v in low.build_args.items()]
        shown = " ".join([f"|{len(seen)}", *seen, *args]) if seen else " ".join(args)
        _history(low, "RUN " + shown + " # buildkit", True)
        return low

    def _mount(self, m: Mount, wd: str, inputs: list[Vertex | None], ssh_index: int) -> ExecMount:
        """One mount as the converter's ``_run_mount`` makes it from ``--mount``."""
        target = posixpath.normpath(posixpath.join(wd, m.target)) if m.target else ""
        if isinstance(m, SecretMount):
            fields = {"id": m.id, "required": str(m.required).lower(), "mode": _mode(m.mode)}
            fields.update(_ids(m.uid, m.gid))
            if m.env:
                fields["env"] = m.env
            if not target and not m.env:
                target = "/run/secrets/" + m.id
            return ExecMount(target, "secret", -1, "/", True, tuple(sorted(fields.items())))
        if isinstance(m, SSHMount):
            fields = {"id": m.id, "required": str(m.required).lower(), "mode": _mode(m.mode)}
            fields.update(_ids(m.uid, m.gid))
            target = target or f"/run/buildkit/ssh_agent.{ssh_index}"
            return ExecMount(target, "ssh", -1, "/", True, tuple(sorted(fields.items())))
        if not target:
            raise UserError(f"run: the mount {m!r} needs a target")
        if isinstance(m, TmpfsMount):
            fields = {"size": m.size} if m.size else {}
            return ExecMount(target, "tmpfs", -1, "/", False, tuple(sorted(fields.items())))
        source = posixpath.normpath(posixpath.join("/", m.source))
        if source.startswith("//"):
            source = "/" + source.lstrip("/")
        if isinstance(m, BindMount):
            inputs.append(self._as_input(m.state))
            return ExecMount(target, "bind", len(inputs) - 1, source, m.readonly)
        fields = {"id": m.id or target, "sharing": m.sharing}
        if m.mode is not None:
            fields["mode"] = _mode(m.mode)
        fields.update(_ids(m.uid, m.gid))
        index = -1
        if m.from_state is not None:
            inputs.append(self._as_input(m.from_state))
            index = len(inputs) - 1
        return ExecMount(target, "cache", index, source, m.readonly, tuple(sorted(fields.items())))

    def _copy(self, node: CopyNode) -> _Lowered:
        """As the converter's ``COPY --from`` (one source state, one step)."""
        low = self._of(node.parent).child()
        wd = low.workdir
        dest = node.dest if node.dest not in ("", ".") else "./"
        dest_is_dir = dest.endswith("/")
        multi = len(node.srcs) > 1 and not dest_is_dir
        chmod, symbolic, chmod_text = _chmod(node.chmod)
        inputs = (low.vertex, self._as_input(node.source))
        actions = tuple(
            Copy(
                src_input=1,
                src=s,
                dest=_abs(dest, wd),
                chown=node.chown,
                chmod=chmod,
                dest_is_dir=dest_is_dir,
                chmod_symbolic=symbolic,
                multi_source=multi,
                exclude=node.exclude,
                parents=node.parents,
            )
            for s in node.srcs
        )
        msg = ["COPY"]
        if node.parents:
            msg.append("--parents")
        if node.chown:
            msg.append("--chown=" + node.chown)
        if chmod_text:
            msg.append("--chmod=" + chmod_text)
        msg += [*node.srcs, node.dest]
        text = " ".join(msg)
        low.vertex = Vertex(FileOp(actions, cwd=wd), inputs, name=text)
        _history(low, text + " # buildkit", True)
        return low

    def _file(self, node: MkdirNode | MkfileNode | RmNode) -> _Lowered:
        low = self._of(node.parent).child()
        action: Mkdir | Mkfile | Rm
        if isinstance(node, MkdirNode):
            action = Mkdir(node.path, node.mode, node.make_parents, node.chown)
            text = f"MKDIR {node.path}"
        elif isinstance(node, MkfileNode):
            action = Mkfile(node.path, node.data, node.mode, node.chown)
            text = f"MKFILE {node.path}"
        else:
            action = Rm(node.path, node.allow_not_found, node.allow_wildcard)
            text = f"RM {node.path}"
        low.vertex = Vertex(FileOp((action,), cwd=low.workdir), (low.vertex,), name=text)
        _history(low, text, True, GRAPH_COMMENT)
        return low

    def _config(self, node: ConfigNode) -> _Lowered:
        """The converter's ENV, WORKDIR, USER, LABEL, CMD and ENTRYPOINT."""
        low = self._of(node.parent).child()
        kind, pairs = node.kind, node.pairs
        if kind == "ENV":
            env = {}
            for e in low.config.get("Env") or []:
                k, _, v = e.partition("=")
                env[k] = v
            for k, v in pairs:
                env[k] = v
                low.env[k] = v
            low.config["Env"] = [f"{k}={v}" for k, v in env.items()]
            _history(low, "ENV " + " ".join(f"{k}={v}" for k, v in pairs), False)
        elif kind == "ARG":
            for k, v in pairs:
                low.env[k] = v
                low.build_args[k] = v
            _history(low, "ARG " + " ".join(f"{k}={v}" for k, v in pairs), False)
        elif kind == "LABEL":
            labels = low.config.get("Labels")
            if not isinstance(labels, dict):
                labels = low.config["Labels"] = {}
            labels.update(pairs)
            _history(low, "LABEL " + " ".join(f"{k}={v}" for k, v in pairs), False)
        elif kind == "USER":
            low.config["User"] = node.text
            _history(low, "USER " + node.text, False)
        elif kind == "WORKDIR":
            path = node.text
            wd = _clean_dir(posixpath.join("/", low.workdir, path))
            stored = path if path.startswith("/") else wd
            low.config["WorkingDir"] = stored
            if wd == "/":
                _history(low, "WORKDIR " + stored, False)
            else:
                op = FileOp((Mkdir(wd, 0o755, True, str(low.config.get("User") or "")),), cwd="/")
                low.vertex = Vertex(op, (low.vertex,), name="WORKDIR " + stored)
                _history(low, "WORKDIR " + stored, True)
        else:  # CMD, ENTRYPOINT
            argv = list(node.argv)
            cmdline = [*low.shell, argv[0]] if node.shell else argv
            if kind == "CMD":
                low.config["Cmd"] = cmdline
                low.cmd_set = True
            else:
                low.config["Entrypoint"] = cmdline
                if not low.cmd_set:
                    low.config.pop("Cmd", None)  # a base's CMD no longer fits
            _history(low, f"{kind} " + _go_list(cmdline), False)
        return low

    def _merge(self, node: MergeNode) -> _Lowered:
        """The first input's state with, for every layer of each later input's
        chain, that input's history entry: the merge step makes one snapshot
        per applied layer (``ops.merge``), and the image lists each."""
        parts = [self._of(s) for s in node.inputs]
        low = parts[0].child()
        roots = tuple(p.vertex for p in parts)
        if all(r is None for r in roots[1:]):
            return low  # nothing applied over the first input
        low.vertex = Vertex(MergeOp(), roots, name=f"merge {len(roots)} states")
        for p in parts[1:]:
            if p.vertex is not None:
                for entry in _layer_history(p):
                    low.history = (entry, low.history)
        return low

    def _diff(self, node: DiffNode) -> _Lowered:
        lower_low, upper_low = self._of(node.lower), self._of(node.upper)
        if upper_low.vertex is None:
            raise UserError("diff: the upper state is scratch (it has no changes to take)")
        config = _copy_config(upper_low.config)
        low = _Lowered(None, config, None, [], 0, dict(upper_low.env), upper_low.cmd_set)
        low.vertex = Vertex(DiffOp(), (lower_low.vertex, upper_low.vertex), name="diff")
        _history(low, "DIFF", True, GRAPH_COMMENT)
        return low


def _layer_history(low: _Lowered) -> list[dict[str, Any]]:
    """``low``'s whole history as a merge lists it over another chain: its base
    image's entries (one per layer; made up when the image has fewer) and its
    own steps' entries, each layer's entry in chain order."""
    base = [dict(h) for h in low.base_history]
    have = sum(1 for h in base if not h.get("empty_layer"))
    base += [
        {"created_by": "(layer of a merged base image without history)", "comment": GRAPH_COMMENT}
        for _ in range(low.base_layers - have)
    ]
    if have > low.base_layers:  # entries claiming layers the image lacks: not ours to list
        base = [h for h in base if h.get("empty_layer")]
        base += [
            {"created_by": "(layer of a merged base image)", "comment": GRAPH_COMMENT}
            for _ in range(low.base_layers)
        ]
    return base + [dict(h) for h in low.entries()]


def _history(low: _Lowered, created_by: str, layer: bool, comment: str = HISTORY_COMMENT) -> None:
    entry: dict[str, Any] = {"created_by": created_by, "comment": comment}
    if not layer:
        entry["empty_layer"] = True
    low.history = (entry, low.history)


def _mode(mode: int | str) -> str:
    """A mount's mode as ``--mount`` spells it (``0755``)."""
    return mode if isinstance(mode, str) else "0" + format(mode, "o")


def _ids(uid: int | None, gid: int | None) -> dict[str, str]:
    out = {}
    if uid is not None:
        out["uid"] = str(uid)
    if gid is not None:
        out["gid"] = str(gid)
    return out


def _chmod(value: int | str | None) -> tuple[int | None, str, str]:
    """(octal mode, symbolic mode, the text history shows) of ``copy(chmod=)``."""
    if value is None or value == "":
        return None, "", ""
    if isinstance(value, int):
        if not 0 <= value <= 0o7777:
            raise UserError(f"copy: invalid chmod {value:o}: want 0 to 07777")
        return value, "", format(value, "o")
    try:
        mode = int(value, 8)
    except ValueError:
        if not is_symbolic_mode(value):
            raise UserError(
                f"copy: invalid chmod {value!r}: want an octal mode (0755) or a symbolic one"
            ) from None
        return None, value, value
    if not 0 <= mode <= 0o7777:
        raise UserError(f"copy: invalid chmod {value!r}: want 0 to 07777")
    return mode, "", value
