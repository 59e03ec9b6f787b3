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
import re
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ociworker.core.build import NamedContext, Ulimit
from ociworker.core.epoch import SOURCE_DATE_EPOCH, epoch_from_build_args, rfc3339
from ociworker.core.filemode import is_symbolic_mode
from ociworker.core.gitref import TOKEN_SECRET, is_git_url, parse_git_ref, redact
from ociworker.core.graph import (
    Copy,
    ExecMount,
    ExecOp,
    FileOp,
    HttpSourceOp,
    Mkdir,
    Mkfile,
    SourceOp,
    Vertex,
)
from ociworker.core.oci import Platform
from ociworker.core.units import go_duration_ns
from ociworker.errors import DockerfileError, UnsupportedError, UserError
from ociworker.frontend.dockerfile.parser import Instruction, ParseResult, go_quote, parse
from ociworker.frontend.dockerfile.shell import (
    Expansion,
    Lexer,
    expand,
    process_word,
    process_words,
)

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
    network: str = "default"
    #: ("NAME", "IP") for every RUN's /etc/hosts (--add-host)
    extra_hosts: tuple[tuple[str, str], ...] = ()
    ulimits: tuple[Ulimit, ...] = ()
    shm_size: int = 0
    context_name: str = CONTEXT
    ignore_patterns: tuple[str, ...] = ()
    filename: str = "Dockerfile"
    no_cache: bool = False
    #: ``--build-context``s by name: each replaces an image or stage of that name
    #: in FROM, COPY --from and RUN --mount=from (an ``oci-layout`` one is looked
    #: up in ``images`` by its ``raw`` value, which the caller resolves first)
    named_contexts: Mapping[str, NamedContext] = field(default_factory=dict)
    #: ``--no-cache-filter``: stages (names or indexes) whose steps ignore the cache
    no_cache_filter: tuple[str, ...] = ()


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
    #: ``--from`` names that are no stage and are being tried as images: the error to
    #: raise instead of the registry's if one of them cannot be resolved
    from_errors: tuple[tuple[str, DockerfileError], ...] = ()
    #: the build's SOURCE_DATE_EPOCH (None: not given): ``created`` of the config and
    #: of our history entries say it, and the exporter clamps new layers' files to it
    epoch: int | None = None


@dataclass
class _Stage:
    index: int
    name: str  # as written after AS (lower-cased), or ""
    base_name: str  # FROM argument after expansion
    instructions: list[Instruction]
    from_line: Instruction
    platform: str = ""


class _Env(dict[str, str]):
    """What RUN sees (ENV and ARG values, in order). ``pairs()`` is remembered
    until the next change: every RUN needs it, and rebuilding it each time was
    quadratic work on long Dockerfiles."""

    _pairs: tuple[str, ...] | None = None

    def __setitem__(self, key: str, value: str) -> None:
        self._pairs = None
        super().__setitem__(key, value)

    def __delitem__(self, key: str) -> None:
        self._pairs = None
        super().__delitem__(key)

    def pop(self, key: str, *default: Any) -> Any:
        self._pairs = None
        return super().pop(key, *default)

    def update(self, *args: Any, **kwargs: Any) -> None:
        self._pairs = None
        super().update(*args, **kwargs)

    def pairs(self) -> tuple[str, ...]:
        if self._pairs is None:
            self._pairs = tuple(f"{k}={v}" for k, v in self.items())
        return self._pairs


@dataclass
class _State:
    vertex: Vertex | None
    config: dict[str, Any]
    history: list[dict[str, Any]]
    base_history: list[dict[str, Any]]
    base_layers: int
    #: the environment RUN sees and $VARs expand from: the image's ENV plus ARG values,
    #: in one ordered map, so whichever of ENV / ARG came last wins (BuildKit's state env)
    env: _Env
    #: ARGs declared in this stage (and its parent stage), first declaration order and
    #: last value, which is what RUN's history lists
    build_args: dict[str, str | None]
    step: int
    total: int
    label: str
    cmd_set: bool = False  # a CMD in this stage: ENTRYPOINT then keeps it
    no_cache: bool = False  # --no-cache, or the stage is in --no-cache-filter
    onbuild: bool = False  # dispatching a trigger of the base image

    @property
    def shell(self) -> tuple[str, ...]:
        return tuple(self.config.get("Shell") or DEFAULT_SHELL)


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

    def __init__(
        self,
        ins: Instruction,
        allowed: Sequence[str],
        filename: str,
        repeatable: Sequence[str] = (),
    ) -> None:
        self.values: dict[str, list[str]] = {}
        for raw in ins.flags:
            if not raw.startswith("--"):
                raise _err(f"invalid flag {raw!r}: expected --name=value", ins, filename)
            name, eq, value = raw[2:].partition("=")
            if name not in allowed:
                raise _err(
                    f"unknown flag: --{name} (allowed for {ins.cmd.upper()}: "
                    + (", ".join("--" + a for a in allowed) or "none")
                    + ")",
                    ins,
                    filename,
                )
            if name in self.values and name not in repeatable:
                raise _err(f"duplicate flag specified: --{name}", ins, filename)
            self.values.setdefault(name, []).append(value if eq else "true")

    def get(self, name: str, default: str = "") -> str:
        vals = self.values.get(name)
        return vals[-1] if vals else default

    def all(self, name: str) -> list[str]:
        return self.values.get(name, [])

    def bool(self, name: str) -> bool:
        return self.get(name, "false").lower() in ("true", "1", "")


_SPECIAL_RE = re.compile(r"[$'\"]")
_HEREDOC_ONLY_RE = re.compile(r"^[0-9]*<<-?(\S+)$")
_OFFICIAL_FRONTEND_RE = re.compile(
    r"^(docker\.io/)?(docker/dockerfile|docker/dockerfile-upstream)(:[\w.-]+)?(@sha256:[0-9a-f]{64})?$"
    # the registered names of this frontend itself (ociworker.plugins)
    r"|^dockerfile(\.v0)?$"
)
_SIGNALS = frozenset(
    [
        "ABRT",
        "ALRM",
        "BUS",
        "CHLD",
        "CLD",
        "CONT",
        "FPE",
        "HUP",
        "ILL",
        "INT",
        "IO",
        "IOT",
        "KILL",
        "PIPE",
        "POLL",
        "PROF",
        "PWR",
        "QUIT",
        "SEGV",
        "STKFLT",
        "STOP",
        "SYS",
        "TERM",
        "TRAP",
        "TSTP",
        "TTIN",
        "TTOU",
        "URG",
        "USR1",
        "USR2",
        "VTALRM",
        "WINCH",
        "XCPU",
        "XFSZ",
    ]
)


class Converter:
    def __init__(self, parsed: ParseResult, opts: Options, images: Mapping[str, ImageInfo]) -> None:
        self.parsed = parsed
        self.opts = opts
        self.images = images
        self.escape = parsed.escape
        self.missing: list[str] = []
        self.from_errors: dict[str, DockerfileError] = {}
        self.warnings: list[str] = list(parsed.warnings)
        self.used_args: set[str] = set()
        self.epoch = epoch_from_build_args(opts.build_args)
        #: what "created" says when SOURCE_DATE_EPOCH is set (the exporter fills
        #: in the build's time when it is not)
        self.created = None if self.epoch is None else rfc3339(self.epoch)
        #: BuildKit's global args: the automatic platform ARGs, then the ARGs before FROM
        self.global_args: dict[str, str] = platform_args(opts.platform)
        self.stages: list[_Stage] = []
        self._done: dict[int, _State] = {}
        self._visiting: set[int] = set()
        if parsed.syntax and not _OFFICIAL_FRONTEND_RE.match(parsed.syntax.strip()):
            self.warnings.append(
                f"{opts.filename}:1: the syntax directive names the frontend {parsed.syntax!r}; "
                "ociworker ignores it and uses its built-in Dockerfile frontend"
            )
        self._split_stages()

    # -- stages ------------------------------------------------------------------

    def _split_stages(self) -> None:
        stage: _Stage | None = None
        for ins in self.parsed.instructions:
            if ins.cmd == "from":
                flags = _Flags(ins, ("platform",), self.opts.filename)
                args = list(ins.args)
                if len(args) not in (1, 3) or (len(args) == 3 and args[1].lower() != "as"):
                    raise _err(
                        "FROM requires either one or three arguments: FROM image [AS name]",
                        ins,
                        self.opts.filename,
                    )
                ex = self._expand(args[0], self.global_args, ins)
                self.used_args |= ex.used
                if not ex.text:
                    raise _err(
                        f"base name ({args[0]}) should not be blank", ins, self.opts.filename
                    )
                name = args[2].lower() if len(args) == 3 else ""
                if name and any(s.name == name for s in self.stages):
                    raise _err(f"duplicate stage name {name!r}", ins, self.opts.filename)
                plat = flags.get("platform")
                if plat:
                    pex = self._expand(plat, self.global_args, ins)
                    self.used_args |= pex.used
                    plat = pex.text
                stage = _Stage(len(self.stages), name, ex.text, [], ins, plat)
                self.stages.append(stage)
            elif stage is None:
                if ins.cmd != "arg":
                    raise _err(
                        f"{ins.cmd.upper()} before the first FROM: only ARG may precede FROM",
                        ins,
                        self.opts.filename,
                    )
                for name, default in self._arg_pairs(ins, self.global_args):
                    if name in self.opts.build_args:
                        self.used_args.add(name)
                        self.global_args[name] = self.opts.build_args[name]
                    elif default is not None:
                        self.global_args[name] = default
            else:
                stage.instructions.append(ins)
        if not self.stages:
            raise DockerfileError(
                "the Dockerfile has no FROM instruction: expected FROM image [AS name]",
                filename=self.opts.filename,
            )

    def _expand(self, word: str, env: Mapping[str, str], ins: Instruction) -> Expansion:
        if not _SPECIAL_RE.search(word) and self.escape not in word:
            # Nothing to expand or unquote (most words): skip the lexer, which
            # dominates conversion time on big files.
            return Expansion(word, frozenset())
        try:
            return expand(word, env, self.escape)
        except DockerfileError as exc:
            raise _err(exc.message, ins, self.opts.filename) from None

    def _arg_pairs(self, ins: Instruction, env: Mapping[str, str]) -> list[tuple[str, str | None]]:
        if not ins.args:
            raise _err("ARG requires at least one argument", ins, self.opts.filename)
        out: list[tuple[str, str | None]] = []
        for a in ins.args:
            name, eq, default = a.partition("=")
            if not name:
                raise _err(f"invalid ARG {a!r}: expected NAME[=default]", ins, self.opts.filename)
            out.append((name, self._expand(default, env, ins).text if eq else None))
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

    def _stage_names(self) -> str:
        return ", ".join(s.name for s in self.stages if s.name) or "none"

    # -- entry -----------------------------------------------------------------------

    def convert(self) -> Plan:
        if self.opts.target:
            target = self.stage_by_ref(self.opts.target)
            if target is None or not target.name:
                raise DockerfileError(
                    f"target stage {self.opts.target!r} could not be found "
                    f"(stages: {self._stage_names()})",
                    filename=self.opts.filename,
                )
        else:
            target = self.stages[-1]
        st = self._stage(target)
        auto = platform_args(self.opts.platform)
        # SOURCE_DATE_EPOCH is read by the build itself, declared or not (BuildKit's
        # nonEnvArgs): RUN sees it only where an ARG declares it
        unused = sorted(
            k
            for k in self.opts.build_args
            if k not in self.used_args and k not in auto and k != SOURCE_DATE_EPOCH
        )
        if unused:
            # spelled as BuildKit prints a Go []string: [FOO BAR]
            self.warnings.append(f"One or more build-args [{' '.join(unused)}] were not consumed")
        config = self._image_config(st)
        return Plan(
            target=st.vertex,
            config=config,
            base_history=tuple(st.base_history),
            base_layers=st.base_layers,
            missing=tuple(dict.fromkeys(self.missing)),
            warnings=tuple(dict.fromkeys(self.warnings)),
            from_errors=tuple(self.from_errors.items()),
            epoch=self.epoch,
        )

    def _image_config(self, st: _State) -> dict[str, Any]:
        plat = self.opts.platform
        cfg: dict[str, Any] = {"architecture": plat.architecture, "os": plat.os}
        if plat.variant:
            cfg["variant"] = plat.variant
        if self.created is not None:
            cfg["created"] = self.created
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

    def _check_platform(self, stage: _Stage) -> None:
        try:
            want = Platform.parse(stage.platform)
        except ValueError as exc:
            raise _err(str(exc), stage.from_line, self.opts.filename) from None
        if (want.os, want.architecture) != (self.opts.platform.os, self.opts.platform.architecture):
            raise UnsupportedError(
                f"{self.opts.filename}:{stage.from_line.start_line}: platform {stage.platform} "
                f"is not supported on this worker ({self.opts.platform}): cross-building is "
                "not available yet"
            )

    def _stage_no_cache(self, stage: _Stage) -> bool:
        wanted = {s.lower() for s in self.opts.no_cache_filter}
        return self.opts.no_cache or bool(wanted & {stage.name, str(stage.index)} - {""})

    def _run_stage(self, stage: _Stage) -> _State:
        total = sum(1 for i in stage.instructions if i.cmd in ("run", "copy", "add", "workdir"))
        label = self._label(stage)
        if stage.platform:
            self._check_platform(stage)
        base = self.stage_by_ref(stage.base_name) if stage.base_name else None
        if base is not None and (base.index >= stage.index or not base.name):
            base = None  # a later stage's name (or a number) is an image name here
        # A named context replaces a stage of its name whole (as buildx), else an
        # image of its name in FROM.
        replaced = self._named(stage.name) if stage.name else None
        named = replaced or (self._named(stage.base_name) if base is None else None)
        image_name = stage.base_name
        st: _State
        if named is not None:
            base = None
            if named.kind in ("docker-image", "oci-layout"):
                image_name = named.value if named.kind == "docker-image" else named.raw
            else:
                st = self._named_fs_state(named, stage, total, label)
                st.no_cache = self._stage_no_cache(stage)
                if not replaced:
                    for ins in stage.instructions:
                        self._dispatch(stage, st, ins)
                return st
        triggers: list[Instruction] = []
        if base is not None:
            parent = self._stage(base)
            # The parent stage's steps stay steps of this image: each of its layers
            # is a snapshot in our chain, exported (or dropped if empty) like ours.
            config = _copy_config(parent.config)
            config.pop("OnBuild", None)  # triggers do not carry over from a stage
            st = _State(
                vertex=parent.vertex,
                config=config,
                history=list(parent.history),
                base_history=parent.base_history,
                base_layers=parent.base_layers,
                env=_Env(parent.env),
                build_args=dict(parent.build_args),
                step=0,
                total=total,
                label=label,
            )
            # BuildKit runs the parent stage's own ONBUILD instructions as triggers here.
            triggers = [i.sub for i in base.instructions if i.cmd == "onbuild" and i.sub]
        elif image_name.lower() == "scratch" and named is None:
            # BuildKit's config of a scratch image says WorkingDir "/" (dockerd's too)
            st = _State(None, {"WorkingDir": "/"}, [], [], 0, _Env(), {}, 0, total, label)
        else:
            info = self.images.get(image_name)
            if info is None:
                self.missing.append(image_name)
                info = ImageInfo(ref=f"{image_name}@unresolved", config={})
            config = _copy_config(info.config.get("config") or {})
            hist = [dict(h) for h in (info.config.get("history") or [])]
            diff_ids = (info.config.get("rootfs") or {}).get("diff_ids") or []
            st = _State(
                vertex=None,
                config=config,
                history=[],
                base_history=hist,
                base_layers=len(diff_ids),
                env=_Env(),
                build_args={},
                step=0,
                total=total + (1 if diff_ids else 0),
                label=label,
            )
            if diff_ids:
                st.step = 1
                st.vertex = Vertex(
                    SourceOp("docker-image://" + info.ref),
                    (),
                    name=self._name(label, 1, st.total, f"FROM {info.ref}"),
                )
            triggers = self._base_triggers(stage, config.pop("OnBuild", None) or [])
        st.no_cache = self._stage_no_cache(stage)
        if replaced is not None:
            return st  # the stage's own instructions are replaced too
        if not any(e.startswith("PATH=") for e in st.config.get("Env") or []):
            st.config["Env"] = [*(st.config.get("Env") or []), f"PATH={DEFAULT_PATH}"]
        if base is None:
            for e in st.config["Env"]:
                k, _, v = e.partition("=")
                st.env[k] = v
        st.total += sum(1 for t in triggers if t.cmd in ("run", "copy", "add", "workdir"))
        st.onbuild = True
        for trig in triggers:
            self._dispatch(stage, st, trig)
        st.onbuild = False
        for ins in stage.instructions:
            self._dispatch(stage, st, ins)
        return st

    # -- named contexts ------------------------------------------------------------

    def _named(self, name: str) -> NamedContext | None:
        if not name or not self.opts.named_contexts:
            return None
        return self.opts.named_contexts.get(name) or self.opts.named_contexts.get(name.lower())

    def _named_vertex(self, nc: NamedContext) -> Vertex:
        """The files of a DIR, git or URL context as a source (a dir or a snapshot)."""
        if nc.kind == "git":
            try:
                ref = parse_git_ref(nc.value)
            except UserError as exc:
                raise UserError(f"--build-context {nc.name}: {exc}") from None
            # no credential in the identifier: a token goes in a secret
            return Vertex(
                SourceOp("git://" + ref.shown, (("git.keepgitdir", "false"),)),
                (),
                name=f"[context {nc.name}] load git source {ref.shown}",
            )
        if nc.kind == "url":
            return Vertex(
                HttpSourceOp(nc.value, "", url_filename(nc.value)),
                (),
                name=f"[context {nc.name}] {redact(nc.value)}",
            )
        return Vertex(
            SourceOp("local://" + nc.local_name),
            (),
            name=f"[internal] load build context {nc.name}",
        )

    def _named_fs_state(self, nc: NamedContext, stage: _Stage, total: int, label: str) -> _State:
        """FROM a DIR or URL context: its files as a root filesystem (a snapshot
        copied from the source), with an empty config as ``FROM scratch``."""
        root = Vertex(
            FileOp((Copy(src_input=1, src="/", dest="/"),), cwd="/"),
            (None, self._named_vertex(nc)),
            name=f"[context {nc.name}] load from client"
            if nc.kind == "local"
            else f"[context {nc.name}] {redact(nc.value)}",
        )
        env = _Env()
        config: dict[str, Any] = {"Env": [f"PATH={DEFAULT_PATH}"]}
        env["PATH"] = DEFAULT_PATH
        return _State(root, config, [], [], 0, env, {}, 0, total, label)

    def _base_triggers(self, stage: _Stage, texts: Sequence[str]) -> list[Instruction]:
        """The base image's ONBUILD triggers as instructions, located at our FROM."""
        out: list[Instruction] = []
        for text in texts:
            try:
                parsed = parse(str(text), self.opts.filename)
            except DockerfileError as exc:
                raise _err(
                    f"ONBUILD trigger {text!r} of the base image: {exc.message}",
                    stage.from_line,
                    self.opts.filename,
                ) from None
            if len(parsed.instructions) != 1:
                raise _err(
                    f"ONBUILD trigger {text!r} of the base image should be a single instruction",
                    stage.from_line,
                    self.opts.filename,
                )
            trig = parsed.instructions[0]
            if trig.cmd in ("onbuild", "from", "maintainer"):
                raise _err(
                    f"{trig.cmd.upper()} isn't allowed as an ONBUILD trigger (base image)",
                    stage.from_line,
                    self.opts.filename,
                )
            out.append(
                Instruction(
                    trig.cmd,
                    trig.flags,
                    trig.args,
                    trig.json,
                    trig.heredocs,
                    stage.from_line.start_line,
                    stage.from_line.end_line,
                    trig.original,
                    trig.sub,
                    trig.kv_legacy,
                )
            )
        return out

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

    def _word(self, st: _State, word: str, ins: Instruction) -> str:
        ex = self._expand(word, st.env, ins)
        return ex.text

    def _words(self, st: _State, word: str, ins: Instruction) -> list[str]:
        if not _SPECIAL_RE.search(word) and self.escape not in word and " " not in word:
            return [word] if word.strip() else []
        try:
            return process_words(word, st.env, self.escape)
        except DockerfileError as exc:
            raise _err(exc.message, ins, self.opts.filename) from None

    def _run_env(self, st: _State) -> tuple[str, ...]:
        return st.env.pairs()

    def _set_env(self, st: _State, key: str, value: str) -> None:
        env = self._env_map(st)
        env[key] = value
        st.config["Env"] = [f"{k}={v}" for k, v in env.items()]
        st.env[key] = value

    def _history(self, st: _State, created_by: str, layer: bool) -> None:
        entry: dict[str, Any] = {"created_by": created_by, "comment": HISTORY_COMMENT}
        if self.created is not None:
            entry["created"] = self.created
        if not layer:
            entry["empty_layer"] = True
        st.history.append(entry)

    def _step_name(self, st: _State, ins: Instruction, suffix: str = "") -> str:
        st.step += 1
        text = redact(ins.original.split("\n")[0].strip() + suffix)
        if st.onbuild:
            text = "ONBUILD " + text
        return self._name(st.label, st.step, st.total, text)

    # -- instructions --------------------------------------------------------------------

    def _dispatch(self, stage: _Stage, st: _State, ins: Instruction) -> None:
        fn = getattr(self, "_i_" + ins.cmd, None)
        if fn is None:
            raise _err(f"unknown instruction: {ins.cmd.upper()}", ins, self.opts.filename)
        fn(stage, st, ins)

    def _i_arg(self, stage: _Stage, st: _State, ins: Instruction) -> None:
        shown = []
        for name, default in self._arg_pairs(ins, st.env):
            value: str | None = default
            if name in self.opts.build_args:
                value = self.opts.build_args[name]
            elif default is None:
                value = self.global_args.get(name)
            self.used_args.add(name)
            if value is not None:
                st.env[name] = value
            st.build_args[name] = value
            shown.append(name if value is None else f"{name}={value}")
        self._history(st, "ARG " + " ".join(shown), False)

    def _pairs(self, st: _State, ins: Instruction, what: str) -> list[tuple[str, str]]:
        pairs = list(ins.args)
        if not pairs or len(pairs) % 2:
            raise _err(f"{what} requires at least one key=value pair", ins, self.opts.filename)
        # Every word is expanded with the environment from before the instruction,
        # so ``ENV A=1 B=$A`` does not see the new A (as in BuildKit).
        return [
            (self._word(st, k, ins), self._word(st, v, ins))
            for k, v in zip(pairs[::2], pairs[1::2], strict=True)
        ]

    def _i_env(self, stage: _Stage, st: _State, ins: Instruction) -> None:
        pairs = self._pairs(st, ins, "ENV")
        for k, v in pairs:
            if not k:
                raise _err("ENV names must not be empty", ins, self.opts.filename)
            self._set_env(st, k, v)
        self._history(st, "ENV " + " ".join(f"{k}={v}" for k, v in pairs), False)

    def _i_label(self, stage: _Stage, st: _State, ins: Instruction) -> None:
        pairs = self._pairs(st, ins, "LABEL")
        # In place: the state owns its config (copied at FROM), and copying a big map
        # per instruction would make long Dockerfiles quadratic.
        _owned_map(st, "Labels").update(pairs)
        self._history(st, "LABEL " + " ".join(f"{k}={v}" for k, v in pairs), False)

    def _i_maintainer(self, stage: _Stage, st: _State, ins: Instruction) -> None:
        # BuildKit keeps it as the image author; the parser already warned.
        text = " ".join(ins.args)
        st.config["_maintainer"] = text
        self._history(st, "MAINTAINER " + text, False)

    def _i_expose(self, stage: _Stage, st: _State, ins: Instruction) -> None:
        if not ins.args:
            raise _err("EXPOSE requires at least one argument", ins, self.opts.filename)
        ports = _owned_map(st, "ExposedPorts")
        words: list[str] = []
        for raw in ins.args:
            words.extend(self._words(st, raw, ins))
        for w in words:
            for p in _expand_ports(w, ins, self.opts.filename):
                ports[p] = {}
        self._history(st, "EXPOSE " + " ".join(words), False)

    def _i_user(self, stage: _Stage, st: _State, ins: Instruction) -> None:
        if len(ins.args) != 1:
            raise _err("USER requires exactly one argument", ins, self.opts.filename)
        st.config["User"] = self._word(st, ins.args[0], ins)
        self._history(st, "USER " + st.config["User"], False)

    def _i_stopsignal(self, stage: _Stage, st: _State, ins: Instruction) -> None:
        if len(ins.args) != 1:
            raise _err("STOPSIGNAL requires exactly one argument", ins, self.opts.filename)
        sig = self._word(st, ins.args[0], ins)
        name = sig.upper().removeprefix("SIG")
        if not (sig.isdigit() and 0 < int(sig) <= 64) and name not in _SIGNALS:
            rt = name.removeprefix("RTMIN").removeprefix("RTMAX")
            if not (name.startswith(("RTMIN", "RTMAX")) and (not rt or rt.lstrip("+-").isdigit())):
                raise _err(
                    f"invalid signal: {sig} (expected a name such as SIGTERM or a number)",
                    ins,
                    self.opts.filename,
                )
        st.config["StopSignal"] = sig
        self._history(st, "STOPSIGNAL " + sig, False)

    def _i_volume(self, stage: _Stage, st: _State, ins: Instruction) -> None:
        vols = _owned_map(st, "Volumes")
        paths: list[str] = []
        for v in ins.args:
            if ins.json:
                paths.append(self._word(st, v, ins))
            else:
                paths.extend(self._words(st, v, ins))
        if not paths:
            raise _err("VOLUME requires at least one argument", ins, self.opts.filename)
        for path in paths:
            if not path.strip():
                raise _err("VOLUME specified can not be an empty string", ins, self.opts.filename)
            vols[path] = {}
        self._history(st, "VOLUME [" + " ".join(paths) + "]", False)

    def _i_shell(self, stage: _Stage, st: _State, ins: Instruction) -> None:
        if not ins.json or not ins.args:
            raise _err(
                'SHELL requires the arguments to be in JSON form: SHELL ["executable", "param"]',
                ins,
                self.opts.filename,
            )
        st.config["Shell"] = list(ins.args)
        self._history(st, "SHELL [" + " ".join(ins.args) + "]", False)

    def _cmdline(self, st: _State, ins: Instruction) -> list[str]:
        if ins.json:
            return list(ins.args)
        return [*st.shell, " ".join(ins.args)]

    def _i_cmd(self, stage: _Stage, st: _State, ins: Instruction) -> None:
        st.config["Cmd"] = self._cmdline(st, ins)
        st.cmd_set = True
        self._history(st, "CMD " + _go_list(st.config["Cmd"]), False)

    def _i_entrypoint(self, stage: _Stage, st: _State, ins: Instruction) -> None:
        st.config["Entrypoint"] = self._cmdline(st, ins)
        if not st.cmd_set:
            st.config.pop("Cmd", None)  # a CMD inherited from the base no longer fits
        self._history(st, "ENTRYPOINT " + _go_list(st.config["Entrypoint"]), False)

    def _i_onbuild(self, stage: _Stage, st: _State, ins: Instruction) -> None:
        if ins.sub is None:
            raise _err("ONBUILD requires an instruction to run later", ins, self.opts.filename)
        # Stored as written, expanded only when a build uses this image as its base;
        # BuildKit adds no history entry for it.
        st.config["OnBuild"] = [*(st.config.get("OnBuild") or []), ins.sub.original.strip()]

    def _i_healthcheck(self, stage: _Stage, st: _State, ins: Instruction) -> None:
        flags = _Flags(
            ins,
            ("interval", "timeout", "start-period", "start-interval", "retries"),
            self.opts.filename,
        )
        args = list(ins.args)
        if args and args[0].upper() == "NONE":
            if len(args) > 1 or flags.values:
                raise _err("HEALTHCHECK NONE takes no arguments", ins, self.opts.filename)
            st.config["Healthcheck"] = {"Test": ["NONE"]}
        else:
            if not args or args[0].upper() != "CMD":
                raise _err(
                    "HEALTHCHECK expects NONE or CMD followed by a command",
                    ins,
                    self.opts.filename,
                )
            rest = args[1:]
            if not rest:
                raise _err("HEALTHCHECK CMD requires a command", ins, self.opts.filename)
            test = ["CMD", *rest] if ins.json else ["CMD-SHELL", " ".join(rest)]
            hc: dict[str, Any] = {"Test": test}
            for flag, key in (
                ("interval", "Interval"),
                ("timeout", "Timeout"),
                ("start-period", "StartPeriod"),
                ("start-interval", "StartInterval"),
            ):
                if flags.get(flag):
                    ns = go_duration_ns(flags.get(flag))
                    if ns is None:
                        raise _err(f"invalid duration {flags.get(flag)!r}", ins, self.opts.filename)
                    if 0 < ns < 10**6:
                        raise _err(f"--{flag} cannot be less than 1ms", ins, self.opts.filename)
                    if ns:
                        hc[key] = ns
            if flags.get("retries"):
                try:
                    retries = int(flags.get("retries"))
                except ValueError:
                    raise _err(
                        f"invalid --retries {flags.get('retries')!r}: expected an integer",
                        ins,
                        self.opts.filename,
                    ) from None
                if retries < 0:
                    raise _err("--retries cannot be negative", ins, self.opts.filename)
                if retries:
                    hc["Retries"] = retries
            st.config["Healthcheck"] = hc
        self._history(st, "HEALTHCHECK " + json.dumps(st.config["Healthcheck"]), False)

    def _i_workdir(self, stage: _Stage, st: _State, ins: Instruction) -> None:
        if len(ins.args) != 1:
            raise _err("WORKDIR requires exactly one argument", ins, self.opts.filename)
        path = self._word(st, ins.args[0], ins)
        wd = _clean_dir(posixpath.join("/", st.config.get("WorkingDir") or "/", path))
        # BuildKit stores an absolute path as written ("/a//b/" stays so: dockerd
        # 20.10 and v0.32 alike) and a relative one joined and cleaned.
        stored = path if path.startswith("/") else wd
        st.config["WorkingDir"] = stored
        if wd == "/":
            st.total -= 1  # nothing to create: BuildKit runs no step and adds no layer
            self._history(st, "WORKDIR " + stored, False)
            return
        name = self._step_name(st, ins)
        op = FileOp((Mkdir(wd, 0o755, True, st.config.get("User", "")),), cwd="/")
        st.vertex = Vertex(op, (st.vertex,), name=name, ignore_cache=_no_cache(st, (st.vertex,)))
        self._history(st, "WORKDIR " + stored, True)

    def _i_run(self, stage: _Stage, st: _State, ins: Instruction) -> None:
        flags = _Flags(
            ins, ("mount", "network", "security"), self.opts.filename, repeatable=("mount",)
        )
        inputs: list[Vertex | None] = [st.vertex]
        mounts: list[ExecMount] = []
        ssh_index = 0
        for m in flags.all("mount"):
            mount = self._run_mount(stage, st, ins, self._word(st, m, ins), inputs, ssh_index)
            ssh_index += mount.type == "ssh"
            mounts.append(mount)
        network = self.opts.network
        if flags.get("network"):
            network = self._word(st, flags.get("network"), ins)
            if network == "default":
                network = self.opts.network
            if network not in ("default", "host", "none"):
                raise _err(
                    f"unsupported RUN --network={network}: use default, none or host",
                    ins,
                    self.opts.filename,
                )
        security = flags.get("security")
        if security and security not in ("sandbox", "insecure"):
            raise _err(
                f"invalid RUN --security={security}: use sandbox or insecure",
                ins,
                self.opts.filename,
            )
        suffix = ""
        if ins.json:
            args = list(ins.args)
        else:
            cmdline = " ".join(ins.args)
            if ins.heredocs:
                args, suffix = self._run_heredoc(st, ins, cmdline, mounts, inputs)
            else:
                args = [*st.shell, cmdline]
        if not args or not args[0]:
            raise _err("RUN requires a command to run", ins, self.opts.filename)
        name = self._step_name(st, ins, suffix)
        op = ExecOp(
            args=tuple(args),
            env=self._run_env(st),
            cwd=_clean_dir(st.config.get("WorkingDir") or "/"),
            user=st.config.get("User") or "",
            network=network,
            mounts=tuple(mounts),
            ulimits=self.opts.ulimits,
            shm_size=self.opts.shm_size,
            security=security or "sandbox",
            extra_hosts=self.opts.extra_hosts,
        )
        st.vertex = Vertex(op, tuple(inputs), name=name, ignore_cache=_no_cache(st, inputs))
        self._history(st, "RUN " + self._run_history(st, args) + " # buildkit", True)

    def _run_heredoc(
        self,
        st: _State,
        ins: Instruction,
        cmdline: str,
        mounts: list[ExecMount],
        inputs: list[Vertex | None],
    ) -> tuple[list[str], str]:
        """Process args for a RUN with heredocs, the way BuildKit builds them."""
        first = ins.heredocs[0]
        only = _HEREDOC_ONLY_RE.match(cmdline.strip())
        if only is None:
            # A heredoc fed to a command: hand the whole text back to the shell,
            # which does the redirection, <<- tab stripping and expansion itself.
            full = cmdline + "".join("\n" + h.content + h.name for h in ins.heredocs)
            return [*st.shell, full], ""
        data = first.body()
        summary = data.strip().split("\n")
        suffix = f" ({summary[0]}{'...' if len(summary) > 1 else ''})"
        if data.startswith("#!"):
            # A script with its own interpreter: mounted as an executable file.
            script = Vertex(
                FileOp((Mkfile("/" + first.name, data, 0o755),), cwd="/"),
                (None,),
                name="[internal] preparing inline document",
            )
            inputs.append(script)
            mounts.append(ExecMount("/dev/pipes/", "bind", len(inputs) - 1, "/", True))
            return [*st.shell, posixpath.join("/dev/pipes/", first.name)], suffix
        # The body is the script; the shell expands it (the quoting of the delimiter
        # is not honoured here, as in BuildKit).
        return [*st.shell, data], suffix

    def _run_history(self, st: _State, args: Sequence[str]) -> str:
        # Docker records the build args a RUN saw, so a changed arg shows in history.
        seen: dict[str, str] = {}
        for k, v in st.build_args.items():
            seen[k] = st.env.get(k, v or "")
        parts = [f"|{len(seen)}", *(f"{k}={v}" for k, v in seen.items())] if seen else []
        return " ".join([*parts, *args])

    def _run_mount(
        self,
        stage: _Stage,
        st: _State,
        ins: Instruction,
        spec: str,
        inputs: list[Vertex | None],
        ssh_index: int,
    ) -> ExecMount:
        """One ``RUN --mount=...`` as BuildKit's dockerfile frontend reads it.

        Bind and cache mounts with a source get it as an extra input of the step
        (the build context unless ``from`` names a stage or an image), so the
        step's key covers the source; secret and ssh mounts carry only their id,
        never a value.
        """
        fname = self.opts.filename
        fields: dict[str, str] = {}
        for part in spec.split(","):
            k, eq, v = part.partition("=")
            k = k.strip().lower()
            if not k:
                continue
            fields[_MOUNT_ALIASES.get(k, k)] = v.strip() if eq else "true"
        typ = fields.pop("type", "bind")
        if typ not in _MOUNT_OPTIONS:
            raise _err(
                f"RUN --mount: unknown mount type {typ!r} (use bind, cache, tmpfs, secret or ssh)",
                ins,
                fname,
            )
        unknown = set(fields) - _MOUNT_OPTIONS[typ] - {"target"}
        if unknown:
            raise _err(
                f"RUN --mount=type={typ}: unknown option(s) {', '.join(sorted(unknown))}",
                ins,
                fname,
            )

        def flag(name: str, default: bool) -> bool:
            value = fields.pop(name, None)
            if value is None:
                return default
            if value.lower() not in ("true", "1", "false", "0"):
                raise _err(f"RUN --mount: invalid {name}={value!r}", ins, fname)
            return value.lower() in ("true", "1")

        for key in ("mode",):
            if key in fields and not re.fullmatch(r"0?[0-7]{1,4}", fields[key]):
                raise _err(f"RUN --mount: invalid mode {fields[key]!r}", ins, fname)
        for key in ("uid", "gid"):
            if key in fields and not fields[key].isdigit():
                raise _err(f"RUN --mount: invalid {key} {fields[key]!r}", ins, fname)
        wd = st.config.get("WorkingDir") or "/"
        target = fields.pop("target", "")
        if target:
            target = posixpath.normpath(posixpath.join(wd, target))
        if typ == "secret":
            secret_id = fields.pop("id", "") or (posixpath.basename(target) if target else "")
            if not secret_id:
                raise _err("RUN --mount=type=secret: id or target is required", ins, fname)
            if not target and not fields.get("env"):
                target = "/run/secrets/" + secret_id
            fields["id"] = secret_id
            fields["required"] = str(flag("required", False)).lower()
            fields.setdefault("mode", "0400")
            return ExecMount(target, "secret", -1, "/", True, tuple(sorted(fields.items())))
        if typ == "ssh":
            fields["id"] = fields.get("id") or "default"
            target = target or f"/run/buildkit/ssh_agent.{ssh_index}"
            fields["required"] = str(flag("required", False)).lower()
            fields.setdefault("mode", "0600")
            return ExecMount(target, "ssh", -1, "/", True, tuple(sorted(fields.items())))
        if not target:
            raise _err(f"RUN --mount={spec}: target is required", ins, fname)
        if typ == "tmpfs":
            if "size" in fields and not re.fullmatch(r"[0-9]+[kKmMgG%]?", fields["size"]):
                raise _err(f"RUN --mount=type=tmpfs: invalid size {fields['size']!r}", ins, fname)
            return ExecMount(target, "tmpfs", -1, "/", False, tuple(sorted(fields.items())))
        # Source paths are taken from / of their input: ``..`` is clamped there.
        source = posixpath.normpath(posixpath.join("/", fields.pop("source", "/")))
        if source.startswith("//"):
            source = "/" + source.lstrip("/")
        from_ref = fields.pop("from", "")
        if typ == "bind":
            rw = flag("rw", False)
            readonly = flag("readonly", not rw)
            src_vertex = (
                self._copy_source(stage, st, ins, from_ref) if from_ref else self._context_vertex()
            )
            inputs.append(src_vertex)
            return ExecMount(target, "bind", len(inputs) - 1, source, readonly)
        # cache
        fields.setdefault("id", target)
        sharing = fields.setdefault("sharing", "shared")
        if sharing not in ("shared", "private", "locked"):
            raise _err(f"RUN --mount=type=cache: invalid sharing {sharing!r}", ins, fname)
        fields.pop("rw", None)
        readonly = flag("readonly", False)
        index = -1
        if from_ref:
            # Seeds a new cache (only when it is first made), as BuildKit does.
            inputs.append(self._copy_source(stage, st, ins, from_ref))
            index = len(inputs) - 1
        return ExecMount(target, "cache", index, source, readonly, tuple(sorted(fields.items())))

    def _i_copy(self, stage: _Stage, st: _State, ins: Instruction) -> None:
        self._copy(stage, st, ins, add=False)

    def _i_add(self, stage: _Stage, st: _State, ins: Instruction) -> None:
        self._copy(stage, st, ins, add=True)

    def _copy_source(self, stage: _Stage, st: _State, ins: Instruction, ref: str) -> Vertex | None:
        """The vertex a ``--from`` names: an earlier stage, else an image."""
        try:
            literal = process_word(ref, {}, self.escape)
        except DockerfileError:
            literal = ""
        if literal != ref:
            raise _err(
                "variable expansion is not supported for --from: define a new stage with "
                "FROM using an ARG from the global scope instead",
                ins,
                self.opts.filename,
            )
        named = self._named(ref)
        if named is not None:
            if named.kind in ("local", "git", "url"):
                return self._named_vertex(named)
            ref = named.value if named.kind == "docker-image" else named.raw
            return self._image_source(ref, ins)
        src_stage = self.stage_by_ref(ref)
        if ref.isdigit() and src_stage is None:
            raise _err(f"invalid stage index {ref}", ins, self.opts.filename)
        if src_stage is not None:
            if src_stage.index == stage.index:
                raise _err(f"circular dependency detected on stage {ref}", ins, self.opts.filename)
            if src_stage.index > stage.index:
                raise _err(
                    f"cannot copy from stage {ref!r}: it needs to be defined before the "
                    f"current stage {stage.name or stage.index!s}",
                    ins,
                    self.opts.filename,
                )
            return self._stage(src_stage).vertex
        return self._image_source(ref, ins)

    def _image_source(self, ref: str, ins: Instruction) -> Vertex | None:
        info = self.images.get(ref)
        if info is None:
            self.missing.append(ref)
            info = ImageInfo(ref=f"{ref}@unresolved", config={})
            if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.-]*", ref):
                self.from_errors[ref] = _err(
                    f"--from={ref}: no stage or image named {ref!r} "
                    f"(stages: {self._stage_names()})",
                    ins,
                    self.opts.filename,
                )
        if not (info.config.get("rootfs") or {}).get("diff_ids") and info.config:
            return None
        return Vertex(SourceOp("docker-image://" + info.ref), (), name=f"FROM {info.ref}")

    def _copy(self, stage: _Stage, st: _State, ins: Instruction, add: bool) -> None:
        allowed = ["chown", "chmod", "link", "exclude"]
        allowed += ["keep-git-dir", "checksum", "unpack"] if add else ["from", "parents"]
        flags = _Flags(ins, allowed, self.opts.filename, repeatable=("exclude",))
        if len(ins.args) < 2:
            raise _err(
                f"{ins.cmd.upper()} requires at least two arguments: source(s) and destination",
                ins,
                self.opts.filename,
            )
        heredocs = {h.name: h for h in ins.heredocs}
        words: list[str] = []
        for idx, a in enumerate(ins.args):
            if ins.heredocs and idx < len(ins.args) - 1 and _HEREDOC_ONLY_RE.match(a):
                words.append(a)  # heredoc sources are not expanded as paths
            else:
                words.append(self._word(st, a, ins))
        *srcs, dest = words
        chown = self._word(st, flags.get("chown"), ins) if flags.get("chown") else ""
        chmod_text = self._word(st, flags.get("chmod"), ins) if flags.get("chmod") else ""
        chmod: int | None = None
        chmod_symbolic = ""
        if chmod_text:
            try:
                chmod = int(chmod_text, 8)
            except ValueError:
                if chmod_text.isdigit():
                    raise _err(
                        f"invalid chmod parameter: {chmod_text!r}: it should be an octal "
                        "string between 0 and 07777",
                        ins,
                        self.opts.filename,
                    ) from None
                if not is_symbolic_mode(chmod_text):
                    raise _err(
                        f"invalid chmod parameter: {chmod_text!r}: want an octal mode "
                        "(0755) or a symbolic one (u+x,g-w)",
                        ins,
                        self.opts.filename,
                    ) from None
                chmod_symbolic = chmod_text
            if chmod is not None and not 0 <= chmod <= 0o7777:
                raise _err(
                    f"invalid chmod parameter: {chmod_text!r}: it should be an octal string "
                    "between 0 and 07777",
                    ins,
                    self.opts.filename,
                )
        git_src = self._git_source(st, ins, srcs, flags) if add else None
        remote = [s for s in srcs if s.startswith(("http://", "https://", "git@", "git://"))]
        if remote and not add:
            raise _err(
                f"COPY source can't be a URL or git ref ({redact(remote[0])}): use ADD",
                ins,
                self.opts.filename,
            )
        checksum = self._word(st, flags.get("checksum"), ins) if flags.get("checksum") else ""
        if checksum:
            if not remote:
                raise _err("checksum requires HTTP(S) or Git sources", ins, self.opts.filename)
            # a git source's checksum (a commit) is checked by _git_source
            if git_src is None and len(srcs) != 1:
                # BuildKit: a checksum pins one download
                raise _err(
                    "checksum can't be specified for multiple sources", ins, self.opts.filename
                )
            if git_src is None and not re.fullmatch(r"sha256:[0-9a-f]{64}", checksum):
                raise _err(
                    f"invalid checksum digest format: {checksum!r} (want sha256:<64 hex digits>)",
                    ins,
                    self.opts.filename,
                )
        if flags.get("keep-git-dir") and git_src is None:
            raise _err("--keep-git-dir requires a Git source", ins, self.opts.filename)
        from_ref = flags.get("from")
        is_context = not from_ref and git_src is None
        src_vertex = git_src or (
            self._copy_source(stage, st, ins, from_ref) if from_ref else self._context_vertex()
        )
        wd = st.config.get("WorkingDir") or "/"
        if dest in ("", "."):
            dest = "./"
        # a repository's files go into the destination, as BuildKit copies them
        dest_is_dir = dest.endswith("/") or git_src is not None
        # Several sources into a dest without "/": it must be an existing dir
        # (checked when the step runs: BuildKit refuses to create it).
        multi = len(srcs) > 1 and not dest_is_dir
        unpack = add and is_context
        if flags.get("unpack"):
            unpack = flags.bool("unpack")
        actions: list[Copy | Mkfile] = []
        shown: list[str] = []
        shown_docs: list[str] = []
        inputs: list[Vertex | None] = [st.vertex]
        src_index = -1  # the --from source's (or the context's) input, once needed
        for s in srcs:
            if git_src is None and s.startswith(("http://", "https://")):
                # A download is a source of its own (BuildKit's http source),
                # copied like a file; remote archives are never extracted.
                fname = url_filename(s)
                inputs.append(Vertex(HttpSourceOp(s, checksum, fname), (), name=redact(s)))
                shown.append(redact(s))
                actions.append(
                    Copy(
                        src_input=len(inputs) - 1,
                        src="/" + fname if fname else "/*",
                        dest=_abs(dest, wd),
                        chown=chown,
                        chmod=chmod,
                        dest_is_dir=dest_is_dir,
                        chmod_symbolic=chmod_symbolic,
                        multi_source=multi,
                    )
                )
                continue
            m = _HEREDOC_ONLY_RE.match(s)
            name = m.group(1).strip("'\"") if m else ""
            if m and name in heredocs:
                h = heredocs[name]
                data = h.body()
                if h.expand:
                    data = self._expand_raw(st, data, ins)
                # As BuildKit: the document is a file of its own, copied like any
                # source (so an existing directory as dest takes it by its name).
                inputs.append(
                    Vertex(
                        FileOp((Mkfile("/" + h.name, data, 0o644),), cwd="/"),
                        (None,),
                        name="[internal] preparing inline document",
                    )
                )
                actions.append(
                    Copy(
                        src_input=len(inputs) - 1,
                        src="/" + h.name,
                        dest=_abs(dest, wd),
                        chown=chown,
                        chmod=chmod,
                        dest_is_dir=dest_is_dir,
                        allow_wildcard=False,
                        chmod_symbolic=chmod_symbolic,
                        multi_source=multi,
                    )
                )
                shown_docs.append("<<" + h.name)
                continue
            shown.append(s)
            if src_index < 0:
                inputs.append(src_vertex)
                src_index = len(inputs) - 1
            actions.append(
                Copy(
                    src_input=src_index,
                    src="/" if git_src is not None else s,
                    dest=_abs(dest, wd) + ("/" if dest_is_dir and not dest.endswith("/") else ""),
                    chown=chown,
                    chmod=chmod,
                    dest_is_dir=dest_is_dir,
                    chmod_symbolic=chmod_symbolic,
                    multi_source=multi,
                    exclude=tuple(self._word(st, e, ins) for e in flags.all("exclude")),
                    unpack_archive=unpack,
                    parents=flags.bool("parents") if flags.get("parents") else False,
                )
            )
        name = self._step_name(st, ins)
        op = FileOp(tuple(actions), cwd=wd)
        st.vertex = Vertex(op, tuple(inputs), name=name, ignore_cache=_no_cache(st, inputs))
        msg = [ins.cmd.upper()]
        if flags.get("parents") and flags.bool("parents"):
            msg.append("--parents")
        if chown:
            msg.append("--chown=" + chown)
        if chmod_text:
            msg.append("--chmod=" + chmod_text)
        msg += shown + shown_docs + [words[-1]]
        self._history(st, " ".join(msg) + " # buildkit", True)

    def _expand_raw(self, st: _State, data: str, ins: Instruction) -> str:
        # Heredoc bodies expand $VARs but keep quotes, as BuildKit's raw expansion does.
        try:
            return Lexer(skip_process_quotes=True).process(data, st.env).text
        except DockerfileError as exc:
            raise _err(exc.message, ins, self.opts.filename) from None

    def _git_source(
        self, st: _State, ins: Instruction, srcs: Sequence[str], flags: _Flags
    ) -> Vertex | None:
        """``ADD [--keep-git-dir] GIT_URL#REF:SUBDIR /dst``: the git source vertex
        (None when no source is a git URL). Its identifier holds no credential:
        a password in the URL would be stored in the definition and the history,
        so a token goes in a ``GIT_AUTH_TOKEN.<host>`` secret instead."""
        gits = [s for s in srcs if is_git_url(s)]
        if not gits:
            return None
        if len(srcs) != 1:
            raise _err("a git source must be ADD's only source", ins, self.opts.filename)
        try:
            ref = parse_git_ref(gits[0])
        except UserError as exc:
            raise _err(str(exc), ins, self.opts.filename) from None
        if ref.password or ref.username:
            raise _err(
                f"ADD {ref.shown}: a password in a git URL would be kept in the image's "
                f"history; pass it as --secret id={TOKEN_SECRET}.{ref.host} instead",
                ins,
                self.opts.filename,
            )
        keep = flags.bool("keep-git-dir") if flags.get("keep-git-dir") else False
        attrs: tuple[tuple[str, str], ...] = (("git.keepgitdir", "true" if keep else "false"),)
        checksum = self._word(st, flags.get("checksum"), ins) if flags.get("checksum") else ""
        if checksum:
            # BuildKit v0.32: a git source's checksum is (a prefix of) the commit
            # the ref names, or of its annotated tag; the source checks it
            if not re.fullmatch(r"[0-9a-fA-F]{1,64}", checksum):
                raise _err(
                    f"invalid checksum {checksum}: expected hex commit hash",
                    ins,
                    self.opts.filename,
                )
            attrs += (("git.checksum", checksum.lower()),)
        ident = "git://" + ref.shown
        return Vertex(SourceOp(ident, attrs), (), name=f"[internal] load git source {ref.shown}")

    def _context_vertex(self) -> Vertex:
        attrs: list[tuple[str, str]] = []
        if self.opts.ignore_patterns:
            attrs.append(("excludepatterns", json.dumps(list(self.opts.ignore_patterns))))
        return Vertex(
            SourceOp("local://" + self.opts.context_name, tuple(attrs)),
            (),
            # BuildKit's name for the main context; a named one says which
            name="[internal] load build context"
            if self.opts.context_name == CONTEXT
            else f"[internal] load build context {self.opts.context_name}",
        )


def _no_cache(st: _State, inputs: Sequence[Vertex | None]) -> bool:
    """Whether a step ignores the cache: its stage does (--no-cache, or named by
    --no-cache-filter), or an input does. A step that uses a re-run step's result
    re-runs too: our keys are known before anything runs, so a cached user would
    never see the new result (BuildKit finds it by the content's checksum)."""
    return st.no_cache or any(i is not None and i.ignore_cache for i in inputs)


def _clean_dir(path: str) -> str:
    """An absolute directory path cleaned as Go's ``path.Clean`` cleans it."""
    out = posixpath.normpath(posixpath.join("/", path))
    return "/" + out.lstrip("/") if out.startswith("//") else out


def url_filename(url: str) -> str:
    """The file name an ``ADD URL`` gets from the URL's path ("" when the path
    names none: the download's Content-Disposition then names it)."""
    path = url.partition("://")[2].partition("/")[2].partition("?")[0].partition("#")[0]
    if not path or path.endswith("/"):
        return ""
    base = posixpath.basename(urllib.parse.unquote(path))
    return "" if base in (".", "..") else base


def _owned_map(st: _State, key: str) -> dict[str, Any]:
    """A map of the config to edit in place (base images often store null)."""
    value = st.config.get(key)
    if not isinstance(value, dict):
        value = st.config[key] = {}
    return value


def _go_list(items: Sequence[str]) -> str:
    """A string list the way Go's ``%q`` prints it (Docker's history text)."""
    return "[" + " ".join(go_quote(i) for i in items) + "]"


def _copy_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """A copy a stage can edit without touching its parent's: image config values
    are strings, lists of strings and maps of (maps of) strings. Explicit rather
    than a JSON round trip, which was the slowest step on long Dockerfiles."""
    out: dict[str, Any] = {}
    for k, v in config.items():
        if isinstance(v, list):
            out[k] = list(v)
        elif isinstance(v, dict):
            out[k] = {kk: dict(vv) if isinstance(vv, dict) else vv for kk, vv in v.items()}
        else:
            out[k] = v
    return out


#: RUN --mount option spellings BuildKit accepts, mapped to one name
_MOUNT_ALIASES = {
    "dst": "target",
    "destination": "target",
    "src": "source",
    "ro": "readonly",
    "readwrite": "rw",
}
_MOUNT_OPTIONS: dict[str, set[str]] = {
    "bind": {"source", "from", "readonly", "rw"},
    "cache": {"id", "sharing", "mode", "uid", "gid", "readonly", "rw", "from", "source"},
    "tmpfs": {"size"},
    "secret": {"id", "env", "required", "mode", "uid", "gid"},
    "ssh": {"id", "required", "mode", "uid", "gid"},
}


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


def convert(parsed: ParseResult, opts: Options, images: Mapping[str, ImageInfo]) -> Plan:
    return Converter(parsed, opts, images).convert()
