"""Dockerfile instructions -> build graph + image config (pure).

Conversion needs the config of every base image, which takes IO to fetch. To
stay pure it runs in rounds: ``convert`` records every image it needed but was
not given in ``Plan.missing``; the caller resolves those and converts again.
Only stages the target depends on are visited, so unneeded stages are neither
resolved nor built.
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ociworker.core.graph import Copy, ExecMount, ExecOp, FileOp, Mkdir, Mkfile, SourceOp, Vertex
from ociworker.core.oci import Platform
from ociworker.errors import DockerfileError, UnsupportedError
from ociworker.frontend.dockerfile.parser import Instruction, ParseResult
from ociworker.frontend.dockerfile.shell import expand, process_word

DEFAULT_SHELL = ("/bin/sh", "-c")
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
CONTEXT = "context"
HISTORY_COMMENT = "buildkit.dockerfile.v0"


@dataclass(frozen=True)
class ImageInfo:
    """A resolved base image: the pinned reference and its raw config JSON."""

    ref: str  # canonical name@sha256:... (the source identifier)
    config: Mapping[str, Any]


@dataclass(frozen=True)
class Options:
    build_args: Mapping[str, str] = field(default_factory=dict)
    target: str = ""
    platform: Platform = field(default_factory=Platform)
    network: str = "host"
    context_name: str = CONTEXT
    ignore_patterns: tuple[str, ...] = ()
    filename: str = "Dockerfile"
    no_cache: bool = False


@dataclass(frozen=True)
class Plan:
    target: Vertex | None  # None: an empty filesystem (FROM scratch and nothing else)
    config: dict[str, Any]  # image config without rootfs (exporter fills it)
    #: history entries of the steps above the base image, with "layer" marking those
    #: whose vertex added a layer (exporter may mark them empty when the diff is empty)
    base_history: tuple[dict[str, Any], ...]
    base_layers: int  # how many layers the base image brings
    missing: tuple[str, ...]  # image references to resolve before converting again
    warnings: tuple[str, ...]


@dataclass
class _Stage:
    index: int
    name: str  # as written after AS (lower-cased), or ""
    base_name: str  # FROM argument after expansion
    instructions: list[Instruction]
    from_line: Instruction
    platform: str = ""


@dataclass
class _State:
    vertex: Vertex | None
    config: dict[str, Any]
    history: list[dict[str, Any]]
    base_history: list[dict[str, Any]]
    base_layers: int
    args: dict[str, str]  # ARG values visible in the stage
    step: int
    total: int
    label: str
    shell: tuple[str, ...] = DEFAULT_SHELL


def _err(msg: str, ins: Instruction, filename: str) -> DockerfileError:
    return DockerfileError(
        msg, filename=filename, line=ins.start_line, source_line=ins.original.split("\n")[0]
    )


def platform_args(platform: Platform) -> dict[str, str]:
    """BuildKit's automatic platform ARGs (build == target: no cross-building yet)."""
    values: dict[str, str] = {}
    for prefix in ("BUILD", "TARGET"):
        values[prefix + "PLATFORM"] = str(platform)
        values[prefix + "OS"] = platform.os
        values[prefix + "ARCH"] = platform.architecture
        values[prefix + "VARIANT"] = platform.variant
    return values


class _Flags:
    """BuildKit-style instruction flags: ``--name=value`` or a bare ``--bool``."""

    def __init__(self, ins: Instruction, allowed: Sequence[str], filename: str) -> None:
        self.values: dict[str, list[str]] = {}
        for raw in ins.flags:
            if not raw.startswith("--"):
                raise _err(f"invalid flag {raw!r}", ins, filename)
            name, eq, value = raw[2:].partition("=")
            if name not in allowed:
                raise _err(
                    f"unknown flag: --{name} (allowed for {ins.cmd.upper()}: "
                    + (", ".join("--" + a for a in allowed) or "none")
                    + ")",
                    ins,
                    filename,
                )
            self.values.setdefault(name, []).append(value if eq else "true")

    def get(self, name: str, default: str = "") -> str:
        vals = self.values.get(name)
        return vals[-1] if vals else default

    def all(self, name: str) -> list[str]:
        return self.values.get(name, [])

    def bool(self, name: str) -> bool:
        return self.get(name, "false").lower() in ("true", "1", "")


class Converter:
    def __init__(self, parsed: ParseResult, opts: Options, images: Mapping[str, ImageInfo]) -> None:
        self.parsed = parsed
        self.opts = opts
        self.images = images
        self.missing: list[str] = []
        self.warnings: list[str] = list(parsed.warnings)
        self.used_args: set[str] = set()
        self.global_args: dict[str, str] = {}
        self.global_declared: set[str] = set()
        self.stages: list[_Stage] = []
        self._done: dict[int, _State] = {}
        self._visiting: set[int] = set()
        self._split_stages()

    # -- stages ------------------------------------------------------------------

    def _split_stages(self) -> None:
        auto = platform_args(self.opts.platform)
        env_for_from: dict[str, str] = dict(auto)
        stage: _Stage | None = None
        for ins in self.parsed.instructions:
            if ins.cmd == "from":
                flags = _Flags(ins, ("platform",), self.opts.filename)
                args = list(ins.args)
                if len(args) not in (1, 3) or (len(args) == 3 and args[1].lower() != "as"):
                    raise _err(
                        "FROM requires either one or three arguments", ins, self.opts.filename
                    )
                ex = expand(args[0], env_for_from)
                self.used_args |= ex.used
                name = args[2].lower() if len(args) == 3 else ""
                if name and any(s.name == name for s in self.stages):
                    raise _err(f"duplicate stage name {name!r}", ins, self.opts.filename)
                plat = flags.get("platform")
                if plat:
                    plat = process_word(plat, env_for_from)
                stage = _Stage(len(self.stages), name, ex.text, [], ins, plat)
                self.stages.append(stage)
            elif stage is None:
                if ins.cmd != "arg":
                    raise _err(
                        f"{ins.cmd.upper()} before the first FROM: only ARG may precede FROM",
                        ins,
                        self.opts.filename,
                    )
                for name, default in self._arg_pairs(ins, env_for_from):
                    self.global_declared.add(name)
                    value = self.opts.build_args.get(name, default)
                    if value is not None:
                        self.global_args[name] = value
                        env_for_from[name] = value
            else:
                stage.instructions.append(ins)
        if not self.stages:
            raise DockerfileError(
                "the Dockerfile has no FROM instruction", filename=self.opts.filename
            )

    def _arg_pairs(self, ins: Instruction, env: Mapping[str, str]) -> list[tuple[str, str | None]]:
        if not ins.args:
            raise _err("ARG requires at least one argument", ins, self.opts.filename)
        out: list[tuple[str, str | None]] = []
        for a in ins.args:
            name, eq, default = a.partition("=")
            if not name:
                raise _err(f"invalid ARG {a!r}", ins, self.opts.filename)
            out.append((name, process_word(default, env) if eq else None))
        return out

    def stage_by_ref(self, ref: str) -> _Stage | None:
        low = ref.lower()
        for s in self.stages:
            if s.name and s.name == low:
                return s
        if ref.isdigit():
            i = int(ref)
            if i < len(self.stages):
                return self.stages[i]
        return None

    # -- entry -----------------------------------------------------------------------

    def convert(self) -> Plan:
        if self.opts.target:
            target = self.stage_by_ref(self.opts.target)
            if target is None or not target.name:
                names = ", ".join(s.name for s in self.stages if s.name) or "none"
                raise DockerfileError(
                    f"target stage {self.opts.target!r} could not be found (stages: {names})",
                    filename=self.opts.filename,
                )
        else:
            target = self.stages[-1]
        st = self._stage(target)
        unused = sorted(
            k
            for k in self.opts.build_args
            if k not in self.used_args and k not in platform_args(self.opts.platform)
        )
        if unused:
            self.warnings.append(f"One or more build-args {unused} were not consumed")
        config = self._image_config(st)
        return Plan(
            target=st.vertex,
            config=config,
            base_history=tuple(st.base_history),
            base_layers=st.base_layers,
            missing=tuple(dict.fromkeys(self.missing)),
            warnings=tuple(dict.fromkeys(self.warnings)),
        )

    def _image_config(self, st: _State) -> dict[str, Any]:
        plat = self.opts.platform
        cfg: dict[str, Any] = {"architecture": plat.architecture, "os": plat.os}
        if plat.variant:
            cfg["variant"] = plat.variant
        cfg["config"] = {k: v for k, v in st.config.items() if v not in (None, [], {}, "")}
        cfg["history"] = st.base_history + st.history
        return cfg

    # -- one stage ---------------------------------------------------------------------

    def _stage(self, stage: _Stage) -> _State:
        done = self._done.get(stage.index)
        if done is not None:
            return done
        if stage.index in self._visiting:
            raise _err(
                f"circular dependency detected on stage {stage.name or stage.index}",
                stage.from_line,
                self.opts.filename,
            )
        self._visiting.add(stage.index)
        try:
            st = self._run_stage(stage)
        finally:
            self._visiting.discard(stage.index)
        self._done[stage.index] = st
        return st

    def _label(self, stage: _Stage) -> str:
        if len(self.stages) == 1:
            return ""
        return stage.name or f"stage-{stage.index}"

    def _run_stage(self, stage: _Stage) -> _State:
        total = 1 + sum(1 for i in stage.instructions if i.cmd in ("run", "copy", "add", "workdir"))
        label = self._label(stage)
        if stage.platform:
            try:
                want = Platform.parse(stage.platform)
            except ValueError as exc:
                raise _err(str(exc), stage.from_line, self.opts.filename) from None
            if (want.os, want.architecture) != (
                self.opts.platform.os,
                self.opts.platform.architecture,
            ):
                raise UnsupportedError(
                    f"platform {stage.platform} is not supported on this worker "
                    f"({self.opts.platform}): cross-building is not available yet"
                )
        base = self.stage_by_ref(stage.base_name) if stage.base_name else None
        if base is not None and base.index >= stage.index:
            base = None  # a later stage's name is an image name here, as in BuildKit
        st: _State
        if base is not None:
            parent = self._stage(base)
            # The parent stage's steps stay steps of this image: each of its layers
            # is a snapshot in our chain, exported (or dropped if empty) like ours.
            st = _State(
                vertex=parent.vertex,
                config=json.loads(json.dumps(parent.config)),
                history=[dict(h) for h in parent.history],
                base_history=parent.base_history,
                base_layers=parent.base_layers,
                args={},
                step=1,
                total=total,
                label=label,
                shell=parent.shell,
            )
        elif stage.base_name.lower() == "scratch":
            st = _State(None, {"Env": [f"PATH={DEFAULT_PATH}"]}, [], [], 0, {}, 1, total, label)
        else:
            info = self.images.get(stage.base_name)
            if info is None:
                self.missing.append(stage.base_name)
                info = ImageInfo(ref=f"{stage.base_name}@unresolved", config={})
            inner = dict(info.config.get("config") or {})
            hist = [dict(h) for h in (info.config.get("history") or [])]
            diff_ids = (info.config.get("rootfs") or {}).get("diff_ids") or []
            vertex = Vertex(
                SourceOp("docker-image://" + info.ref),
                (),
                name=self._name(label, 1, total, f"FROM {info.ref}"),
            )
            st = _State(
                vertex=vertex if diff_ids else None,
                config=inner,
                history=[],
                base_history=hist,
                base_layers=len(diff_ids),
                args={},
                step=1,
                total=total,
                label=label,
            )
            if not st.config.get("Env"):
                st.config["Env"] = [f"PATH={DEFAULT_PATH}"]
        for ins in stage.instructions:
            self._dispatch(stage, st, ins)
        return st

    @staticmethod
    def _name(label: str, step: int, total: int, text: str) -> str:
        prefix = f"[{label} {step}/{total}]" if label else f"[{step}/{total}]"
        return f"{prefix} {text}"

    # -- environment -------------------------------------------------------------------

    def _env_map(self, st: _State) -> dict[str, str]:
        env: dict[str, str] = {}
        for e in st.config.get("Env") or []:
            k, _, v = e.partition("=")
            env[k] = v
        return env

    def _expand_env(self, st: _State) -> dict[str, str]:
        """What $VARs expand to: stage ARGs overridden by ENV, as in Docker."""
        env = dict(st.args)
        env.update(self._env_map(st))
        return env

    def _word(self, st: _State, word: str) -> str:
        ex = expand(word, self._expand_env(st), self.parsed.escape)
        self.used_args |= ex.used & set(st.args)
        return ex.text

    def _run_env(self, st: _State) -> tuple[str, ...]:
        env = self._env_map(st)
        out = [f"{k}={v}" for k, v in env.items()]
        for k, v in st.args.items():
            if k not in env:
                out.append(f"{k}={v}")
        return tuple(out)

    def _set_env(self, st: _State, key: str, value: str) -> None:
        env = self._env_map(st)
        env[key] = value
        st.config["Env"] = [f"{k}={v}" for k, v in env.items()]

    def _history(self, st: _State, created_by: str, layer: bool) -> None:
        entry: dict[str, Any] = {"created_by": created_by, "comment": HISTORY_COMMENT}
        if not layer:
            entry["empty_layer"] = True
        st.history.append(entry)

    def _step_name(self, st: _State, ins: Instruction) -> str:
        st.step += 1
        text = ins.original.split("\n")[0].strip()
        return self._name(st.label, st.step, st.total, text)

    # -- instructions --------------------------------------------------------------------

    def _dispatch(self, stage: _Stage, st: _State, ins: Instruction) -> None:
        fn = getattr(self, "_i_" + ins.cmd, None)
        if fn is None:
            raise _err(f"unknown instruction: {ins.cmd.upper()}", ins, self.opts.filename)
        fn(stage, st, ins)

    def _i_arg(self, stage: _Stage, st: _State, ins: Instruction) -> None:
        for name, default in self._arg_pairs(ins, self._expand_env(st)):
            if name in self.opts.build_args:
                value: str | None = self.opts.build_args[name]
                self.used_args.add(name)
            elif default is not None:
                value = default
            elif name in self.global_declared:
                value = self.global_args.get(name)
            else:
                value = platform_args(self.opts.platform).get(name)
            if value is not None:
                st.args[name] = value
            else:
                st.args.pop(name, None)
        self._history(st, "ARG " + " ".join(ins.args), False)

    def _i_env(self, stage: _Stage, st: _State, ins: Instruction) -> None:
        pairs = list(ins.args)
        if not pairs or len(pairs) % 2:
            raise _err("ENV requires key/value pairs", ins, self.opts.filename)
        shown = []
        for k, v in zip(pairs[::2], pairs[1::2], strict=True):
            val = self._word(st, v)
            self._set_env(st, k, val)
            shown.append(f"{k}={val}")
        self._history(st, "ENV " + " ".join(shown), False)

    def _i_label(self, stage: _Stage, st: _State, ins: Instruction) -> None:
        pairs = list(ins.args)
        if not pairs or len(pairs) % 2:
            raise _err("LABEL requires key/value pairs", ins, self.opts.filename)
        labels = dict(st.config.get("Labels") or {})
        shown = []
        for k, v in zip(pairs[::2], pairs[1::2], strict=True):
            key, val = self._word(st, k), self._word(st, v)
            labels[key] = val
            shown.append(f"{key}={val}")
        st.config["Labels"] = labels
        self._history(st, "LABEL " + " ".join(shown), False)

    def _i_maintainer(self, stage: _Stage, st: _State, ins: Instruction) -> None:
        self.warnings.append(
            f"{self.opts.filename}:{ins.start_line}: MAINTAINER is deprecated; use LABEL"
        )
        st.config["_maintainer"] = " ".join(ins.args)
        self._history(st, "MAINTAINER " + " ".join(ins.args), False)

    def _i_expose(self, stage: _Stage, st: _State, ins: Instruction) -> None:
        ports = dict(st.config.get("ExposedPorts") or {})
        for raw in ins.args:
            for p in _expand_ports(self._word(st, raw), ins, self.opts.filename):
                ports[p] = {}
        st.config["ExposedPorts"] = ports
        self._history(st, "EXPOSE " + " ".join(sorted(ports)), False)

    def _i_user(self, stage: _Stage, st: _State, ins: Instruction) -> None:
        if len(ins.args) != 1:
            raise _err("USER requires exactly one argument", ins, self.opts.filename)
        st.config["User"] = self._word(st, ins.args[0])
        self._history(st, "USER " + st.config["User"], False)

    def _i_stopsignal(self, stage: _Stage, st: _State, ins: Instruction) -> None:
        if len(ins.args) != 1:
            raise _err("STOPSIGNAL requires exactly one argument", ins, self.opts.filename)
        st.config["StopSignal"] = self._word(st, ins.args[0])
        self._history(st, "STOPSIGNAL " + st.config["StopSignal"], False)

    def _i_volume(self, stage: _Stage, st: _State, ins: Instruction) -> None:
        vols = dict(st.config.get("Volumes") or {})
        for v in ins.args:
            path = self._word(st, v)
            if not path:
                raise _err("VOLUME specified can not be an empty string", ins, self.opts.filename)
            vols[path] = {}
        st.config["Volumes"] = vols
        self._history(st, "VOLUME " + json.dumps(list(ins.args)), False)

    def _i_shell(self, stage: _Stage, st: _State, ins: Instruction) -> None:
        if not ins.json:
            raise _err("SHELL requires the arguments to be in JSON form", ins, self.opts.filename)
        st.shell = tuple(ins.args)
        st.config["Shell"] = list(ins.args)
        self._history(st, "SHELL " + json.dumps(list(ins.args)), False)

    def _cmdline(self, st: _State, ins: Instruction) -> list[str]:
        if ins.json:
            return list(ins.args)
        return [*st.shell, " ".join(ins.args)]

    def _i_cmd(self, stage: _Stage, st: _State, ins: Instruction) -> None:
        st.config["Cmd"] = self._cmdline(st, ins)
        self._history(st, "CMD " + json.dumps(st.config["Cmd"]), False)

    def _i_entrypoint(self, stage: _Stage, st: _State, ins: Instruction) -> None:
        st.config["Entrypoint"] = self._cmdline(st, ins)
        st.config.pop("Cmd", None)  # Docker resets CMD inherited from the base
        self._history(st, "ENTRYPOINT " + json.dumps(st.config["Entrypoint"]), False)

    def _i_onbuild(self, stage: _Stage, st: _State, ins: Instruction) -> None:
        text = ins.original.split(None, 1)[1] if " " in ins.original.strip() else ""
        st.config["OnBuild"] = [*(st.config.get("OnBuild") or []), text.strip()]
        self._history(st, "ONBUILD " + text.strip(), False)

    def _i_healthcheck(self, stage: _Stage, st: _State, ins: Instruction) -> None:
        flags = _Flags(
            ins,
            ("interval", "timeout", "start-period", "start-interval", "retries"),
            self.opts.filename,
        )
        args = list(ins.args)
        if args and args[0].upper() == "NONE":
            st.config["Healthcheck"] = {"Test": ["NONE"]}
        else:
            if not args or args[0].upper() != "CMD":
                raise _err("HEALTHCHECK requires NONE or CMD", ins, self.opts.filename)
            rest = args[1:]
            test = ["CMD", *rest] if ins.json else ["CMD-SHELL", " ".join(rest)]
            hc: dict[str, Any] = {"Test": test}
            for flag, key in (
                ("interval", "Interval"),
                ("timeout", "Timeout"),
                ("start-period", "StartPeriod"),
                ("start-interval", "StartInterval"),
            ):
                if flags.get(flag):
                    hc[key] = _duration_ns(flags.get(flag), ins, self.opts.filename)
            if flags.get("retries"):
                hc["Retries"] = int(flags.get("retries"))
            st.config["Healthcheck"] = hc
        self._history(st, "HEALTHCHECK " + json.dumps(st.config["Healthcheck"]), False)

    def _i_workdir(self, stage: _Stage, st: _State, ins: Instruction) -> None:
        if len(ins.args) != 1:
            raise _err("WORKDIR requires exactly one argument", ins, self.opts.filename)
        path = self._word(st, ins.args[0])
        wd = posixpath.normpath(posixpath.join(st.config.get("WorkingDir") or "/", path))
        st.config["WorkingDir"] = wd
        name = self._step_name(st, ins)
        op = FileOp((Mkdir(wd, 0o755, True, st.config.get("User", "")),), cwd="/")
        st.vertex = Vertex(op, (st.vertex,), name=name, ignore_cache=self.opts.no_cache)
        self._history(st, "WORKDIR " + wd, True)

    def _i_run(self, stage: _Stage, st: _State, ins: Instruction) -> None:
        flags = _Flags(ins, ("mount", "network", "security"), self.opts.filename)
        mounts = tuple(self._run_mount(st, ins, self._word(st, m)) for m in flags.all("mount"))
        network = self.opts.network
        if flags.get("network"):
            network = flags.get("network")
            if network == "default":
                network = self.opts.network
            if network not in ("host", "none"):
                raise _err(
                    f"unsupported RUN --network={network}: use default, none or host",
                    ins,
                    self.opts.filename,
                )
        if flags.get("security") and flags.get("security") != "sandbox":
            raise UnsupportedError(
                f"{self.opts.filename}:{ins.start_line}: RUN --security=insecure needs the "
                "security.insecure entitlement, which this worker does not grant"
            )
        if ins.json:
            args = list(ins.args)
        elif ins.heredocs and " ".join(ins.args).strip() == "<<" + ins.heredocs[0].name:
            args = [*st.shell, ins.heredocs[0].content]
        else:
            args = [*st.shell, " ".join(ins.args)]
        if not args:
            raise _err("RUN requires a command", ins, self.opts.filename)
        name = self._step_name(st, ins)
        op = ExecOp(
            args=tuple(args),
            env=self._run_env(st),
            cwd=st.config.get("WorkingDir") or "/",
            user=st.config.get("User") or "",
            network=network,
            mounts=mounts,
        )
        st.vertex = Vertex(op, (st.vertex,), name=name, ignore_cache=self.opts.no_cache)
        shown = args if ins.json else [*st.shell, " ".join(ins.args)]
        prefix = ""
        if st.args:
            # Docker records the build args a RUN saw, so a changed arg shows in history.
            prefix = f"|{len(st.args)} " + " ".join(f"{k}={v}" for k, v in st.args.items()) + " "
        self._history(st, "RUN " + prefix + " ".join(shown) + " # buildkit", True)

    def _run_mount(self, st: _State, ins: Instruction, spec: str) -> ExecMount:
        fields: dict[str, str] = {}
        for part in spec.split(","):
            k, eq, v = part.partition("=")
            k = k.strip().lower()
            fields[k] = v.strip() if eq else "true"
        typ = fields.pop("type", "bind")
        target = fields.pop("target", "") or fields.pop("dst", "") or fields.pop("destination", "")
        if not target:
            raise _err(f"RUN --mount={spec}: target is required", ins, self.opts.filename)
        wd = st.config.get("WorkingDir") or "/"
        target = posixpath.normpath(posixpath.join(wd, target))
        known = {
            "cache": {
                "id",
                "sharing",
                "mode",
                "uid",
                "gid",
                "ro",
                "readonly",
                "rw",
                "from",
                "source",
                "src",
            },
            "tmpfs": {"size"},
        }
        if typ not in known:
            raise UnsupportedError(
                f"{self.opts.filename}:{ins.start_line}: RUN --mount=type={typ} is not "
                "supported yet (cache and tmpfs are)"
            )
        unknown = set(fields) - known[typ]
        if unknown:
            raise _err(
                f"RUN --mount=type={typ}: unknown option(s) {', '.join(sorted(unknown))}",
                ins,
                self.opts.filename,
            )
        if typ == "cache":
            fields.setdefault("id", target)
            sharing = fields.setdefault("sharing", "shared")
            if sharing not in ("shared", "private", "locked"):
                raise _err(
                    f"RUN --mount=type=cache: invalid sharing {sharing!r}",
                    ins,
                    self.opts.filename,
                )
            ro = fields.pop("ro", fields.pop("readonly", "false")).lower() in ("true", "1")
            fields.pop("rw", None)
            return ExecMount(target, "cache", -1, "/", ro, tuple(sorted(fields.items())))
        return ExecMount(target, "tmpfs", -1, "/", False, tuple(sorted(fields.items())))

    def _i_copy(self, stage: _Stage, st: _State, ins: Instruction) -> None:
        self._copy(stage, st, ins, add=False)

    def _i_add(self, stage: _Stage, st: _State, ins: Instruction) -> None:
        self._copy(stage, st, ins, add=True)

    def _copy(self, stage: _Stage, st: _State, ins: Instruction, add: bool) -> None:
        allowed = ["chown", "chmod", "link"]
        allowed += ["keep-git-dir", "checksum"] if add else ["from", "parents", "exclude"]
        flags = _Flags(ins, allowed, self.opts.filename)
        args = [self._word(st, a) for a in ins.args]
        if len(args) < 2:
            raise _err(
                f"{ins.cmd.upper()} requires at least two arguments", ins, self.opts.filename
            )
        *srcs, dest = args
        chown = self._word(st, flags.get("chown")) if flags.get("chown") else ""
        chmod: int | None = None
        if flags.get("chmod"):
            try:
                chmod = int(self._word(st, flags.get("chmod")), 8)
            except ValueError:
                raise _err(
                    f"invalid --chmod {flags.get('chmod')!r}: want an octal mode",
                    ins,
                    self.opts.filename,
                ) from None
        src_vertex: Vertex | None
        is_context = True
        from_ref = self._word(st, flags.get("from")) if flags.get("from") else ""
        if from_ref:
            is_context = False
            src_stage = self.stage_by_ref(from_ref)
            if src_stage is not None and src_stage.index == stage.index:
                raise _err(
                    f"circular dependency detected on stage {from_ref}", ins, self.opts.filename
                )
            if src_stage is not None and src_stage.index < stage.index:
                src_vertex = self._stage(src_stage).vertex
            elif src_stage is not None:
                raise _err(
                    f"COPY --from={from_ref}: stage {from_ref!r} is defined after this one",
                    ins,
                    self.opts.filename,
                )
            else:
                if "/" not in from_ref and ":" not in from_ref and from_ref.isidentifier():
                    names = ", ".join(s.name for s in self.stages if s.name) or "none"
                    self.warnings.append(
                        f"{self.opts.filename}:{ins.start_line}: --from={from_ref} names no "
                        f"stage (stages: {names}); using it as an image"
                    )
                info = self.images.get(from_ref)
                if info is None:
                    self.missing.append(from_ref)
                    info = ImageInfo(ref=f"{from_ref}@unresolved", config={})
                src_vertex = Vertex(
                    SourceOp("docker-image://" + info.ref), (), name=f"FROM {info.ref}"
                )
        else:
            src_vertex = self._context_vertex()
        if any(s.startswith(("http://", "https://")) for s in srcs) or any(
            s.startswith("git@") or s.endswith(".git") for s in srcs
        ):
            raise UnsupportedError(
                f"{self.opts.filename}:{ins.start_line}: "
                "remote sources (URLs, git) in ADD are not supported yet"
            )
        wd = st.config.get("WorkingDir") or "/"
        dest_is_dir = dest.endswith("/") or len(srcs) > 1
        actions: list[Copy | Mkfile] = []
        heredoc_names = {h.name: h for h in ins.heredocs}
        for s in srcs:
            if s.startswith("<<") and s.lstrip("<-").strip("'\"") in heredoc_names:
                h = heredoc_names[s.lstrip("<-").strip("'\"")]
                target = posixpath.join(dest, h.name) if dest_is_dir else dest
                actions.append(Mkfile(_abs(target, wd), h.content, chmod or 0o644, chown))
                continue
            actions.append(
                Copy(
                    src_input=1,
                    src=s,
                    dest=_abs(dest, wd) + ("/" if dest_is_dir and not dest.endswith("/") else ""),
                    chown=chown,
                    chmod=chmod,
                    dest_is_dir=dest_is_dir,
                    exclude=tuple(flags.all("exclude")),
                    unpack_archive=add and is_context,
                )
            )
        name = self._step_name(st, ins)
        op = FileOp(tuple(actions), cwd=wd)
        st.vertex = Vertex(op, (st.vertex, src_vertex), name=name, ignore_cache=self.opts.no_cache)
        shown = " ".join(ins.flags + ins.args)
        self._history(st, f"{ins.cmd.upper()} {shown} # buildkit", True)

    def _context_vertex(self) -> Vertex:
        attrs: list[tuple[str, str]] = []
        if self.opts.ignore_patterns:
            attrs.append(("excludepatterns", json.dumps(list(self.opts.ignore_patterns))))
        return Vertex(
            SourceOp("local://" + self.opts.context_name, tuple(attrs)),
            (),
            name=f"[internal] load build context {self.opts.context_name}",
        )


def _abs(path: str, wd: str) -> str:
    joined = posixpath.normpath(posixpath.join(wd, path))
    if path.endswith("/") and joined != "/":
        joined += "/"
    return joined


def _expand_ports(spec: str, ins: Instruction, filename: str) -> list[str]:
    port, _, proto = spec.partition("/")
    proto = (proto or "tcp").lower()
    if proto not in ("tcp", "udp", "sctp"):
        raise _err(f"invalid proto {proto!r} in EXPOSE {spec}", ins, filename)
    lo, dash, hi = port.partition("-")
    try:
        start = int(lo)
        end = int(hi) if dash else start
    except ValueError:
        raise _err(f"invalid port {spec!r} in EXPOSE", ins, filename) from None
    if not (0 < start <= end <= 65535):
        raise _err(f"invalid port range {spec!r} in EXPOSE", ins, filename)
    return [f"{p}/{proto}" for p in range(start, end + 1)]


_UNITS = {
    "ns": 1,
    "us": 10**3,
    "µs": 10**3,
    "ms": 10**6,
    "s": 10**9,
    "m": 60 * 10**9,
    "h": 3600 * 10**9,
}


def _duration_ns(text: str, ins: Instruction, filename: str) -> int:
    """A Go duration (``30s``, ``1m30s``, ``500ms``) in nanoseconds."""
    total = 0.0
    num = ""
    unit = ""
    rest = text.strip()
    if not rest:
        raise _err("empty duration", ins, filename)
    i = 0
    while i < len(rest):
        num = ""
        while i < len(rest) and (rest[i].isdigit() or rest[i] == "."):
            num += rest[i]
            i += 1
        unit = ""
        while i < len(rest) and not (rest[i].isdigit() or rest[i] == "."):
            unit += rest[i]
            i += 1
        if not num or unit not in _UNITS:
            raise _err(f"invalid duration {text!r}", ins, filename)
        total += float(num) * _UNITS[unit]
    return int(total)


def convert(parsed: ParseResult, opts: Options, images: Mapping[str, ImageInfo]) -> Plan:
    return Converter(parsed, opts, images).convert()
