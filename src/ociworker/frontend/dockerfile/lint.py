"""``build --check``: BuildKit's Dockerfile lint rules (the ones enabled by
default) over the parsed instructions, and the report buildx prints (pure).

Rule names, messages and documentation links are BuildKit's
(``frontend/dockerfile/linter/ruleset.go``, https://docs.docker.com/reference/build-checks/).
Rules that need the base image's config (UndefinedVar) or a registry
(InvalidBaseImagePlatform) are not checked here.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ociworker.frontend.dockerfile.parser import Instruction, ParseResult, go_quote

_DOCS = "https://docs.docker.com/go/dockerfile/rule/"
#: BuildKit's automatic platform ARGs, declared in every Dockerfile
_AUTO_ARGS = frozenset(
    p + s for p in ("BUILD", "TARGET") for s in ("PLATFORM", "OS", "ARCH", "VARIANT")
)
_RESERVED_STAGES = ("context", "scratch")
#: BuildKit's secretsRegexp: a name part (split on "_") that names a secret
_SECRET_RE = re.compile(
    r"(?i)(?:_|^)(?:apikey|auth|credential|credentials|key|password|pword|passwd|secret|token)(?:_|$)"
)
_VAR_RE = re.compile(r"\$(?:\{([A-Za-z_][A-Za-z0-9_]*)[^}]*\}|([A-Za-z_][A-Za-z0-9_]*))")
_EMPTY_CONT_RE = re.compile(r"^.*:(\d+): empty continuation line")
#: how a rule reports: (rule, message, the instruction it is about)
_Warn = Callable[[str, str, Instruction], None]


@dataclass(frozen=True)
class LintWarning:
    rule: str
    #: the rule's message for this case
    detail: str
    line: int
    end_line: int

    @property
    def url(self) -> str:
        # JSONArgsRecommended -> json-args-recommended (an acronym is one word)
        kebab = re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "-", self.rule)
        kebab = kebab.lower()
        return _DOCS + kebab + "/"


def _keyword(ins: Instruction) -> str:
    """The instruction's keyword as written (its casing)."""
    return ins.original.lstrip().split(None, 1)[0] if ins.original.strip() else ins.cmd


def _case(word: str) -> str:
    if word.isupper():
        return "upper"
    if word.islower():
        return "lower"
    return "mixed"


def lint(parsed: ParseResult) -> list[LintWarning]:
    """Every default rule's warnings, in the order of the lines they are on."""
    out: list[LintWarning] = []

    def warn(rule: str, detail: str, ins: Instruction) -> None:
        out.append(LintWarning(rule, detail, ins.start_line, ins.end_line))

    for text in parsed.warnings:
        m = _EMPTY_CONT_RE.match(text)
        if m:
            line = int(m.group(1))
            out.append(LintWarning("NoEmptyContinuation", "Empty continuation line", line, line))

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

    global_args: set[str] = set(_AUTO_ARGS)
    stage_names: list[str] = []
    seen_from = False
    stage_has: dict[str, int] = {}
    abs_workdir = False
    for ins in parsed.instructions:
        if ins.cmd == "from":
            seen_from = True
            stage_has = {}
            abs_workdir = False
            _lint_from(ins, global_args, stage_names, warn)
            continue
        if ins.cmd == "arg" and not seen_from:
            global_args.update(a.partition("=")[0] for a in ins.args)
        if ins.cmd == "maintainer":
            warn(
                "MaintainerDeprecated",
                "Maintainer instruction is deprecated in favor of using label",
                ins,
            )
        if ins.cmd in ("cmd", "entrypoint") and not ins.json:
            warn(
                "JSONArgsRecommended",
                f"JSON arguments recommended for {ins.cmd.upper()} to prevent unintended "
                "behavior related to OS signals",
                ins,
            )
        if ins.cmd in ("cmd", "entrypoint", "healthcheck"):
            stage_has[ins.cmd] = stage_has.get(ins.cmd, 0) + 1
            if stage_has[ins.cmd] > 1:
                warn(
                    "MultipleInstructionsDisallowed",
                    f"Multiple {ins.cmd.upper()} instructions should not be used in the same "
                    "stage because only the last one will be used",
                    ins,
                )
        if ins.cmd in ("env", "label") and ins.kv_legacy:
            c = ins.cmd.upper()
            warn(
                "LegacyKeyValueFormat",
                f'"{c} key=value" should be used instead of legacy "{c} key value" format',
                ins,
            )
        if ins.cmd in ("arg", "env"):
            names = (
                [a.partition("=")[0] for a in ins.args] if ins.cmd == "arg" else list(ins.args[::2])
            )
            for name in names:
                if _SECRET_RE.search(name):
                    warn(
                        "SecretsUsedInArgOrEnv",
                        "Do not use ARG or ENV instructions for sensitive data "
                        f"({ins.cmd.upper()} {go_quote(name)})",
                        ins,
                    )
        if ins.cmd == "workdir" and ins.args:
            path = ins.args[0]
            if path.startswith("/") or path.startswith("$"):
                abs_workdir = True
            elif not abs_workdir:
                warn(
                    "WorkdirRelativePath",
                    f"Relative workdir {go_quote(path)} can have unexpected results if the "
                    "base image changes",
                    ins,
                )
    return sorted(out, key=lambda w: w.line)


def _lint_from(
    ins: Instruction,
    global_args: set[str],
    stage_names: list[str],
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
    if args:
        for m in _VAR_RE.finditer(args[0]):
            var = m.group(1) or m.group(2)
            if var not in global_args:
                warn("UndefinedArgInFrom", f"FROM argument '{var}' is not declared", ins)
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
        out.append(f"\nWARNING: {w.rule} - {w.url}\n{w.detail}\n")
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
