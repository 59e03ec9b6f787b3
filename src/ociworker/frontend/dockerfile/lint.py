"""``build --check``: BuildKit's Dockerfile lint rules (the ones enabled by
default) over the parsed instructions, and the report buildx prints (pure).

Rule names, messages and documentation links are BuildKit's
(``frontend/dockerfile/linter/ruleset.go``, https://docs.docker.com/reference/build-checks/),
and so is when each fires (``dockerfile2llb/validations.go``, ``convert.go``).
The rules that need the base images (UndefinedVar: their ``Env``;
InvalidBaseImagePlatform: their platform) use the ``BaseImage``s the caller
resolved for the names ``base_images`` lists, as BuildKit's check resolves
them; a stage whose base is unknown (not resolved, a named context) reports no
UndefinedVar, as its variables may come from that base.
"""

from __future__ import annotations

import contextlib
import csv
import re
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from ociworker.core.oci import Platform
from ociworker.core.reference import parse_reference
from ociworker.errors import DockerfileError, OciworkerError
from ociworker.frontend.dockerfile.parser import Instruction, ParseResult, go_quote
from ociworker.frontend.dockerfile.shell import Lexer, expand

_DOCS = "https://docs.docker.com/go/dockerfile/rule/"
#: rules BuildKit gives no documentation link (its report prints the name alone)
_NO_URL = frozenset({"InvalidBaseImagePlatform"})
#: BuildKit's automatic platform ARGs, declared in every Dockerfile
_AUTO_ARGS = frozenset(
    p + s for p in ("BUILD", "TARGET") for s in ("PLATFORM", "OS", "ARCH", "VARIANT")
)
_RESERVED_STAGES = ("context", "scratch")
#: BuildKit's secretsRegexp: a name part (split on "_") that names a secret
_SECRET_RE = re.compile(
    r"(?i)(?:_|^)(?:apikey|auth|credential|credentials|key|password|pword|passwd|secret|token)(?:_|$)"
)
#: ... unless a part says it is not one (BuildKit's secretsAllowRegexp)
_SECRET_ALLOW_RE = re.compile(r"(?i)(?:_|^)(?:public|file|version)(?:_|$)")
_EMPTY_CONT_RE = re.compile(r"^.*:(\d+): empty continuation line")
#: ARGs BuildKit never puts in the environment (so never "undefined")
_NON_ENV_ARGS = frozenset({"BUILDKIT_SBOM_SCAN_CONTEXT", "BUILDKIT_SBOM_SCAN_STAGE"})
#: a ``FROM scratch`` stage's environment (BuildKit's emptyImage)
_SCRATCH_ENV = (("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"),)
#: rules BuildKit runs with the file's settings only: a "# check=" comment above
#: an instruction does not skip them (validateCommandCasing, validateStageNames,
#: the parser's warnings, the base image checks)
_FILE_RULES = frozenset(
    {
        "ConsistentInstructionCasing",
        "DuplicateStageName",
        "ReservedStageName",
        "NoEmptyContinuation",
        "InvalidDefaultArgInFrom",
        "InvalidBaseImagePlatform",
    }
)
#: a comment BuildKit reads as a setting (its DirectiveParser, "#" stripped)
_CHECK_COMMENT_RE = re.compile(r"^\s*check\s*=\s*(.+?)\s*$", re.IGNORECASE)
_DIRECTIVE_LINE_RE = re.compile(r"^\s*#\s*([a-zA-Z][a-zA-Z0-9]*)\s*=")


class _Warn(Protocol):
    """How a rule reports: the rule, its message, the instruction it is about,
    and (when another) the instruction whose ``# check=`` comment governs it."""

    def __call__(
        self, rule: str, detail: str, ins: Instruction, by: Instruction | None = None
    ) -> None: ...


@dataclass(frozen=True)
class LintWarning:
    rule: str
    #: the rule's message for this case
    detail: str
    line: int
    end_line: int

    @property
    def url(self) -> str:
        if self.rule in _NO_URL:
            return ""
        # JSONArgsRecommended -> json-args-recommended (an acronym is one word)
        kebab = re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "-", self.rule)
        kebab = kebab.lower()
        return _DOCS + kebab + "/"


class IgnoreRules(Protocol):
    """The context's .dockerignore, as CopyIgnoredFile asks it (fs.IgnoreMatcher)."""

    @property
    def patterns(self) -> tuple[str, ...]: ...

    def excluded(self, path: str) -> bool: ...


@dataclass(frozen=True)
class BaseRef:
    """A base image a stage names (global ARGs expanded) and the platform the
    stage wants it for: what the caller resolves for the rules that need it."""

    name: str
    platform: str


@dataclass(frozen=True)
class BaseImage:
    """What the check needs of a resolved base image's config."""

    #: its ``config.Env`` ("KEY=VALUE" entries)
    env: tuple[str, ...]
    #: its ``os/architecture[/variant]``; "" when the config says none
    platform: str
    #: False for an image without layers (BuildKit takes it as scratch)
    layers: bool = True


def _keyword(ins: Instruction) -> str:
    """The instruction's keyword as written (its casing)."""
    return ins.original.lstrip().split(None, 1)[0] if ins.original.strip() else ins.cmd


def _case(word: str) -> str:
    if word.isupper():
        return "upper"
    if word.islower():
        return "lower"
    return "mixed"


def _levenshtein(a: str, b: str) -> int:
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def _suggest(value: str, options: Iterable[str]) -> str:
    """BuildKit's ``suggest.Search`` (case-sensitive): the first option closest
    to ``value`` within an edit distance of 2, or ""."""
    match, best = "", 3
    for opt in options:
        if opt == value:
            return ""
        d = _levenshtein(value, opt)
        if d < best:
            match, best = opt, d
    return match


def _platform_args(platform: str) -> dict[str, str]:
    """BuildKit's automatic platform ARGs for a build on (and for) ``platform``."""
    if not platform:
        return dict.fromkeys(sorted(_AUTO_ARGS), "")
    p = Platform.parse(platform)
    out: dict[str, str] = {}
    for prefix in ("BUILD", "TARGET"):
        out[prefix + "PLATFORM"] = str(p)
        out[prefix + "OS"] = p.os
        out[prefix + "ARCH"] = p.architecture
        out[prefix + "VARIANT"] = p.variant
    return out


def _expand(word: str, env: Mapping[str, str], escape: str) -> tuple[str, frozenset[str]]:
    """The word expanded and the variables it names that ``env`` lacks; a word
    the shell lexer refuses is left as is (the build reports it, not the check)."""
    try:
        ex = expand(word, env, escape)
    except OciworkerError:
        return word, frozenset()
    return ex.text, ex.undefined


def _global_args(
    parsed: ParseResult, build_args: Mapping[str, str] | None, platform: str
) -> tuple[set[str], dict[str, str]]:
    """The ARGs before the first FROM: every declared name (with BuildKit's
    automatic ones), and the values of those that have one (``build_args``
    win over defaults; None: defaults only, as BuildKit's InvalidDefaultArgInFrom)."""
    values = _platform_args(platform)
    declared = set(values)
    for ins in parsed.instructions:
        if ins.cmd == "from":
            break
        if ins.cmd != "arg":
            continue
        for a in ins.args:
            name, eq, default = a.partition("=")
            declared.add(name)
            if build_args is not None and name in build_args:
                values[name] = build_args[name]
            elif eq:
                values[name] = _expand(default, values, parsed.escape)[0]
    return declared, values


def _from_platform(ins: Instruction, args: Mapping[str, str], escape: str, default: str) -> str:
    for flag in ins.flags:
        if flag.startswith("--platform="):
            value = _expand(flag.partition("=")[2], args, escape)[0]
            try:
                return str(Platform.parse(value))
            except ValueError:
                return value
    return default


def base_images(
    parsed: ParseResult,
    build_args: Mapping[str, str] | None = None,
    platform: str = "",
    named: Collection[str] = (),
) -> list[BaseRef]:
    """The images the stages are built FROM (not scratch, an earlier stage or a
    named context), in order, each once: what a check resolves."""
    _, args = _global_args(parsed, build_args or {}, platform)
    stages: set[str] = set()
    out: list[BaseRef] = []
    for ins in parsed.instructions:
        if ins.cmd != "from" or not ins.args:
            continue
        name = _expand(ins.args[0], args, parsed.escape)[0]
        ref = BaseRef(name, _from_platform(ins, args, parsed.escape, platform))
        local = name.lower() in stages | {"scratch"} or name in named
        if name and not local and ref not in out:
            out.append(ref)
        if len(ins.args) == 3:
            stages.add(ins.args[2].lower())
    return out


def lint(
    parsed: ParseResult,
    bases: Mapping[BaseRef, BaseImage] | None = None,
    *,
    build_args: Mapping[str, str] | None = None,
    platform: str = "",
    named: Collection[str] = (),
    ignore: IgnoreRules | None = None,
    source: str = "",
) -> list[LintWarning]:
    """Every default rule's warnings, in the order of the lines they are on.

    ``bases``: the configs of the images ``base_images`` lists (None: nothing
    resolved); ``platform``: the build's (the expected one of a base image);
    ``named``: the build's named contexts; ``ignore``: the context's
    .dockerignore (for CopyIgnoredFile; None: there is none); ``source``: the
    Dockerfile's text, for the ``# check=`` comments above instructions."""
    out: list[LintWarning] = []
    #: the start line of the instruction whose comments govern each warning
    governed: list[int] = []

    def warn(rule: str, detail: str, ins: Instruction, by: Instruction | None = None) -> None:
        out.append(LintWarning(rule, detail, ins.start_line, ins.end_line))
        governed.append((by or ins).start_line)

    for text in parsed.warnings:
        m = _EMPTY_CONT_RE.match(text)
        if m:
            line = int(m.group(1))
            out.append(LintWarning("NoEmptyContinuation", "Empty continuation line", line, line))
            governed.append(line)

    # ConsistentInstructionCasing: against the majority casing of the file
    words = [_keyword(i) for i in parsed.instructions]
    upper = sum(1 for w in words if _case(w) == "upper")
    lower = sum(1 for w in words if _case(w) == "lower")
    majority = "upper" if upper >= lower else "lower"
    for ins, w in zip(parsed.instructions, words, strict=True):
        if _case(w) != majority:
            warn(
                "ConsistentInstructionCasing",
                f"Command '{w}' should match the case of the command majority ({majority}case)",
                ins,
            )

    _lint_default_from_args(parsed, warn)
    global_declared, global_values = _global_args(parsed, build_args or {}, platform)
    walk = _StageWalk(
        parsed.escape, global_declared, global_values, bases, platform, named, ignore, warn
    )
    stage_names: list[str] = []
    seen_from = False
    for ins in parsed.instructions:
        if ins.cmd == "from":
            seen_from = True
            _lint_from(ins, global_declared, stage_names, parsed.escape, warn)
            walk.start(ins)
            continue
        if not seen_from:
            continue
        walk.step(ins)
    skip_all, skipped = _check_options(parsed, build_args)
    local = _comment_skips(parsed, source) if source else {}
    kept: list[LintWarning] = []
    for found, by in zip(out, governed, strict=True):
        if skip_all or found.rule in skipped:
            continue
        here_all, here = local.get(by, (False, frozenset()))
        if found.rule not in _FILE_RULES and (here_all or found.rule in here):
            continue
        kept.append(found)
    return sorted(kept, key=lambda w: w.line)


def _parse_skips(text: str) -> tuple[bool, frozenset[str]]:
    skip_all, skipped = False, set[str]()
    for part in text.strip().split(";", 2) if text.strip() else []:
        key, eq, value = part.partition("=")
        key, value = key.strip(), value.strip()
        if not eq or key not in ("skip", "error", "experimental"):
            raise DockerfileError(f"failed to parse check options: invalid check option {part!r}")
        if key == "skip":
            if value == "all":
                skip_all = True
            else:
                skipped.update(r.strip() for r in value.split(","))
        elif key == "error" and value not in _GO_BOOLS:
            raise DockerfileError(f"failed to parse check options: {part!r} is no boolean")
    return skip_all, frozenset(skipped)


def _comment_skips(parsed: ParseResult, source: str) -> dict[int, tuple[bool, frozenset[str]]]:
    """Each instruction's (start line) ``# check=...`` comment: the first such
    among the comment lines since the instruction before it ("#" alone clears
    them; the file's directives at the top are none), text after a space
    ignored, a bad one ignored (BuildKit's WithMergedConfigFromComments)."""
    lines = source.split("\n")
    out: dict[int, tuple[bool, frozenset[str]]] = {}
    prev_end = 0
    for i, ins in enumerate(parsed.instructions):
        comments: list[str] = []
        top = i == 0
        for n in range(prev_end + 1, ins.start_line):
            raw = lines[n - 1].strip() if n - 1 < len(lines) else ""
            if top and _DIRECTIVE_LINE_RE.match(raw):
                continue  # a parser directive, not a comment
            if raw.startswith("#"):
                top = False
                text = raw[1:].strip()
                comments = [*comments, text] if text else []
            elif raw:
                top = False
        prev_end = max(prev_end, ins.end_line)
        for text in comments:
            m = _CHECK_COMMENT_RE.match(text)
            if m is None:
                continue
            # a bad setting in a comment is ignored, as BuildKit
            with contextlib.suppress(DockerfileError):
                out[ins.start_line] = _parse_skips(m.group(1).split(" ", 1)[0])
            break
    return out


def _check_options(
    parsed: ParseResult, build_args: Mapping[str, str] | None
) -> tuple[bool, frozenset[str]]:
    """The rules to skip: ``--build-arg BUILDKIT_DOCKERFILE_CHECK=...`` if given,
    else the ``# check=...`` directive (BuildKit's ParseLintOptions:
    ``skip=all|RULE,...``, ``error=BOOL``, ``experimental=...``, ";"-separated)."""
    text = (build_args or {}).get("BUILDKIT_DOCKERFILE_CHECK")
    if text is None:
        text = parsed.check or ""
    return _parse_skips(text)


#: what Go's strconv.ParseBool accepts
_GO_BOOLS = frozenset(
    ["1", "t", "T", "TRUE", "true", "True", "0", "f", "F", "FALSE", "false", "False"]
)


class _StageWalk:
    """The rules that follow a stage's state: its environment (UndefinedVar),
    its WORKDIR, its CMD/ENTRYPOINT/HEALTHCHECK; and each instruction's own."""

    def __init__(
        self,
        escape: str,
        global_declared: set[str],
        global_values: dict[str, str],
        bases: Mapping[BaseRef, BaseImage] | None,
        platform: str,
        named: Collection[str],
        ignore: IgnoreRules | None,
        warn: _Warn,
    ) -> None:
        self.escape = escape
        self.global_declared = global_declared
        self.global_values = global_values
        self.bases = bases
        self.platform = platform
        self.named = named
        self.ignore = ignore
        self.warn = warn
        #: each stage's final (environment or None when unknown, declared ARGs,
        #: whether it set a WORKDIR): what a stage FROM it starts with
        self.stages: dict[str, tuple[dict[str, str] | None, set[str], bool]] = {}
        self.env: dict[str, str] | None = None
        self.args: set[str] = set()
        self.name = ""
        self.workdir_set = False
        self.used_once: dict[str, Instruction] = {}

    def _close(self) -> None:
        if self.name:
            self.stages[self.name] = (self.env, self.args, self.workdir_set)

    def start(self, ins: Instruction) -> None:
        self._close()
        self.workdir_set = False
        self.used_once = {}
        self.name = ins.args[2].lower() if len(ins.args) == 3 else ""
        base = _expand(ins.args[0], self.global_values, self.escape)[0] if ins.args else ""
        self.env, self.args = None, set()
        if base.lower() == "scratch":
            self.env = dict(_SCRATCH_ENV)
        elif base.lower() in self.stages and base not in self.named:
            env, args, self.workdir_set = self.stages[base.lower()]
            self.env = None if env is None else dict(env)
            self.args = set(args)
        elif base and base not in self.named and self.bases is not None:
            want = _from_platform(ins, self.global_values, self.escape, self.platform)
            img = self.bases.get(BaseRef(base, want))
            if img is not None:
                self.env = dict(e.partition("=")[::2] for e in img.env)
                self._check_platform(ins, base, want, img)

    def _check_platform(self, ins: Instruction, base: str, want: str, img: BaseImage) -> None:
        if not img.layers or not img.platform or not want:
            return
        have, expected = Platform.parse(img.platform), Platform.parse(want)
        if (have.os, have.architecture) != (expected.os, expected.architecture):
            self.warn(
                "InvalidBaseImagePlatform",
                f"Base image {base} was pulled with platform {go_quote(str(have))}, "
                f"expected {go_quote(str(expected))} for current build",
                ins,
            )

    def _undefined(self, ins: Instruction, words: Iterable[str], raw: bool = False) -> None:
        """UndefinedVar for the variables ``words`` name that the stage has not."""
        env = self.env
        if env is None:
            return
        for word in words:
            if raw:  # a heredoc body: variables expand, quotes stay
                try:
                    missing = Lexer(skip_process_quotes=True).process(word, env).unmatched
                except OciworkerError:
                    continue
            else:
                missing = _expand(word, env, self.escape)[1]
            for var in sorted(missing - self.args - _NON_ENV_ARGS):
                hint = _suggest(var, env)
                detail = f"Usage of undefined variable '${var}'"
                self.warn(
                    "UndefinedVar", detail + (f" (did you mean ${hint}?)" if hint else ""), ins
                )

    def _flag(self, ins: Instruction, name: str) -> list[str]:
        return [f.partition("=")[2] for f in ins.flags if f.startswith(f"--{name}=")]

    def step(self, ins: Instruction) -> None:
        cmd, warn = ins.cmd, self.warn
        if cmd == "maintainer":
            warn(
                "MaintainerDeprecated",
                "Maintainer instruction is deprecated in favor of using label",
                ins,
            )
        if cmd in ("cmd", "entrypoint") and not ins.json:
            warn(
                "JSONArgsRecommended",
                f"JSON arguments recommended for {cmd.upper()} to prevent unintended "
                "behavior related to OS signals",
                ins,
            )
        if cmd in ("cmd", "entrypoint", "healthcheck"):
            before = self.used_once.get(cmd)
            if before is not None:
                # BuildKit points at the earlier one: it is the one ignored
                warn(
                    "MultipleInstructionsDisallowed",
                    f"Multiple {cmd.upper()} instructions should not be used in the same "
                    "stage because only the last one will be used",
                    before,
                    by=ins,
                )
            self.used_once[cmd] = ins
        if cmd in ("env", "label") and ins.kv_legacy:
            c = cmd.upper()
            warn(
                "LegacyKeyValueFormat",
                f'"{c} key=value" should be used instead of legacy "{c} key value" format',
                ins,
            )
        if cmd in ("arg", "env"):
            names = [a.partition("=")[0] for a in ins.args] if cmd == "arg" else ins.args[::2]
            for name in names:
                if _SECRET_RE.search(name) and not _SECRET_ALLOW_RE.search(name):
                    warn(
                        "SecretsUsedInArgOrEnv",
                        "Do not use ARG or ENV instructions for sensitive data "
                        f"({cmd.upper()} {go_quote(name)})",
                        ins,
                    )
        handler = getattr(self, "_" + cmd, None)
        if handler is not None:
            handler(ins)

    # -- per instruction (BuildKit's expansion of each, then its dispatch) --------

    def _arg(self, ins: Instruction) -> None:
        for a in ins.args:
            name, eq, default = a.partition("=")
            value: str | None = None
            if eq:
                self._undefined(ins, [default])
                value = _expand(default, self.env or {}, self.escape)[0]
            elif name in self.global_declared and name in self.global_values:
                value = self.global_values[name]
            if self.env is not None and value is not None and name not in _NON_ENV_ARGS:
                self.env[name] = value
            self.args.add(name)

    def _env(self, ins: Instruction) -> None:
        self._undefined(ins, ins.args)
        if self.env is not None:
            env = self.env
            for key, value in zip(ins.args[::2], ins.args[1::2], strict=True):
                env[_expand(key, env, self.escape)[0]] = _expand(value, env, self.escape)[0]

    def _label(self, ins: Instruction) -> None:
        self._undefined(ins, ins.args)

    def _user(self, ins: Instruction) -> None:
        self._undefined(ins, ins.args)

    def _stopsignal(self, ins: Instruction) -> None:
        self._undefined(ins, ins.args)

    def _volume(self, ins: Instruction) -> None:
        self._undefined(ins, ins.args)

    def _workdir(self, ins: Instruction) -> None:
        self._undefined(ins, ins.args)
        if not ins.args:
            return
        path = ins.args[0]
        if self.env is not None:
            path = _expand(path, self.env, self.escape)[0]
        # only the stage's first WORKDIR: fixing it fixes those after it (BuildKit);
        # an unknown variable may hold an absolute path
        if not self.workdir_set and not path.startswith(("/", "$")):
            self.warn(
                "WorkdirRelativePath",
                f"Relative workdir {go_quote(path)} can have unexpected results if the "
                "base image changes",
                ins,
            )
        self.workdir_set = True

    def _run(self, ins: Instruction) -> None:
        values: list[str] = []
        for spec in self._flag(ins, "mount"):
            for row in csv.reader([spec]):
                values += [f.partition("=")[2] for f in row if "=" in f]
        self._undefined(ins, values)

    def _copy(self, ins: Instruction, add: bool = False) -> None:
        flags = ["chown", "chmod"] + (["checksum"] if add else [])
        words = [v for f in flags for v in self._flag(ins, f)]
        heredoc_words = {"<<" + h.name for h in ins.heredocs} | {
            "<<-" + h.name for h in ins.heredocs
        }
        paths = [a for a in ins.args if a not in heredoc_words and not a.startswith("<<")]
        self._undefined(ins, words + paths)
        self._undefined(ins, [h.content for h in ins.heredocs if h.expand], raw=True)
        if self.ignore is not None and not self._flag(ins, "from"):
            self._ignored(ins, paths[:-1], "Add" if add else "Copy")

    def _add(self, ins: Instruction) -> None:
        self._copy(ins, add=True)

    def _ignored(self, ins: Instruction, sources: Sequence[str], cmd: str) -> None:
        """CopyIgnoredFile: a local source the .dockerignore leaves out of the context
        (not checked when the file has exceptions, as BuildKit)."""
        ignore = self.ignore
        if ignore is None or any(p.startswith("!") for p in ignore.patterns):
            return
        for raw in sources:
            src = _expand(raw, self.env or {}, self.escape)[0]
            if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", src) or src.startswith("git@"):
                continue  # a URL or git source, not a context path
            clean = _clean(src)
            if clean in (".", "/"):
                # the context root: only when a pattern drops every entry of it
                if not any(p in ("*", "**", "**/*") for p in ignore.patterns):
                    continue
                hit = True
            else:
                hit = ignore.excluded(clean)
            if hit:
                self.warn(
                    "CopyIgnoredFile",
                    f"Attempting to {cmd} file {go_quote(clean)} that is excluded by .dockerignore",
                    ins,
                )

    def _expose(self, ins: Instruction) -> None:
        env = self.env or {}
        for raw in ins.args:
            word = _expand(raw, env, self.escape)[0]
            for port in word.split():
                parts = port.split(":")
                ip, host = (":".join(parts[:-2]), parts[-2]) if len(parts) > 2 else ("", "")
                if len(parts) == 2:
                    host = parts[0]
                proto = parts[-1].partition("/")[2]
                if proto.lower() in ("tcp", "udp", "sctp") and proto != proto.lower():
                    self.warn(
                        "ExposeProtoCasing",
                        f"Defined protocol '{port}' in EXPOSE instruction should be lowercase",
                        ins,
                    )
                if ip or host:
                    self.warn(
                        "ExposeInvalidFormat",
                        "EXPOSE instruction should not define an IP address or host-port "
                        f"mapping, found '{port}'",
                        ins,
                    )


def _clean(path: str) -> str:
    """Go's ``filepath.Clean`` of a "/"-separated path."""
    rooted = path.startswith("/")
    parts: list[str] = []
    for part in path.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if parts and parts[-1] != "..":
                parts.pop()
            elif not rooted:
                parts.append("..")
            continue
        parts.append(part)
    text = "/".join(parts)
    return ("/" + text) if rooted else (text or ".")


def _lint_default_from_args(parsed: ParseResult, warn: _Warn) -> None:
    """InvalidDefaultArgInFrom: a FROM whose name, with the global ARGs' defaults
    only (no --build-arg), is no valid image reference."""
    _, defaults = _global_args(parsed, None, "")
    for ins in parsed.instructions:
        if ins.cmd != "from" or not ins.args:
            continue
        if "$" not in ins.args[0]:
            continue  # a literal name: the build itself says what is wrong with it
        name = _expand(ins.args[0], defaults, parsed.escape)[0]
        try:
            parse_reference(name)
        except OciworkerError:
            warn(
                "InvalidDefaultArgInFrom",
                f"Default value for ARG {ins.args[0]} results in empty or invalid base image name",
                ins,
            )


def _lint_from(
    ins: Instruction,
    global_args: set[str],
    stage_names: list[str],
    escape: str,
    warn: _Warn,
) -> None:
    args = list(ins.args)
    if len(args) == 3:
        as_word, name = args[1], args[2]
        from_word = _keyword(ins)
        if _case(from_word) != _case(as_word) and "mixed" not in (_case(from_word),):
            warn(
                "FromAsCasing", f"'{as_word}' and '{from_word}' keywords' casing do not match", ins
            )
        if name != name.lower():
            warn("StageNameCasing", f"Stage name '{name}' should be lowercase", ins)
        low = name.lower()
        if low in stage_names:
            warn(
                "DuplicateStageName",
                f"Duplicate stage name {go_quote(low)}, stage names should be unique",
                ins,
            )
        if low in _RESERVED_STAGES:
            warn(
                "ReservedStageName",
                f"Stage name should not use the same name as reserved stage {go_quote(low)}",
                ins,
            )
        stage_names.append(low)
    # the image name, then the --platform value (BuildKit's buildDispatchStates)
    words = args[:1] + [f.partition("=")[2] for f in ins.flags if f.startswith("--platform=")]
    for word in words:
        _, missing = _expand(word, dict.fromkeys(global_args, "x"), escape)
        for var in sorted(missing):
            hint = _suggest(var, sorted(global_args))
            detail = f"FROM argument '{var}' is not declared"
            warn("UndefinedArgInFrom", detail + (f" (did you mean {hint}?)" if hint else ""), ins)
    for flag in ins.flags:
        if flag.startswith("--platform="):
            value = flag.partition("=")[2]
            if value in ("$TARGETPLATFORM", "${TARGETPLATFORM}"):
                warn(
                    "RedundantTargetPlatform",
                    f"Setting platform to predefined {value} in FROM is redundant as this is "
                    "the default behavior",
                    ins,
                )
            elif "$" not in value:
                warn(
                    "FromPlatformFlagConstDisallowed",
                    f"FROM --platform flag should not use constant value {go_quote(value)}",
                    ins,
                )


def report(warnings: Sequence[LintWarning], source: str, filename: str) -> str:
    """The text ``buildx build --check`` prints (buildx ``printResult`` "lint" and
    BuildKit's ``lint.Warning.PrintTo`` / ``errdefs.Source.Print``): a summary, then
    each warning with its rule's link, its message and the lines around it."""
    if not warnings:
        return "Check complete, no warnings found.\n"
    n = len(warnings)
    found = "1 warning has been found!" if n == 1 else f"{n} warnings have been found!"
    out = [f"Check complete, {found}\n"]
    lines = source.split("\n")
    for w in warnings:
        link = f" - {w.url}" if w.url else ""
        out.append(f"\nWARNING: {w.rule}{link}\n{w.detail}\n")
        out.append(_source_excerpt(lines, w.line, w.end_line, filename))
    return "".join(out)


def _source_excerpt(lines: list[str], line: int, end_line: int, filename: str) -> str:
    """BuildKit's ``errdefs.Source.Print``: the lines of the instruction marked
    ``>>>``, with 2 lines around a one-line one (1 around a longer one) where the
    file has them."""
    if line < 1 or line > len(lines):
        return ""
    last = min(end_line, len(lines))
    start, end = line, last
    pad = 4 if end == start else 2
    p = 0
    while p < pad:
        if start > 1:
            start -= 1
            p += 1
        if end != len(lines):
            end += 1
            p += 1
        p += 1
    text = [f"{filename}:{line}\n--------------------\n"]
    for i in range(start, end + 1):
        pfx = ">>>" if line <= i <= last else "   "
        text.append(f" {i:>3} | {pfx} {lines[i - 1]}\n")
    text.append("--------------------\n")
    return "".join(text)
