"""Dockerfile text -> a flat tuple of instructions (BuildKit's parser AST).

The heavy lifting (line scanning, continuations, comments, parser directives,
JSON forms, heredoc bodies, ENV/LABEL word rules and the errors for all of
those) is done by the ``dockerfile`` package, which is BuildKit's own Go parser
compiled. Its Python view drops a few things BuildKit's AST keeps, which this
module recovers:

* ENV/LABEL separators (``ENV k v`` vs ``ENV k=v``): re-read from the
  instruction text; needed by ``dump`` and for the legacy-format warning.
* ONBUILD: the package reports the trigger's flags nowhere and loses heredoc
  bodies; flags are re-extracted from the text and bodies re-read from the
  source lines.
* heredoc ``expand``/``chomp``: re-derived from the ``<<`` words with BuildKit's
  rules (see ``_heredoc_words``).
* error positions: GoParseError carries only a message, so the failing line is
  found by re-parsing prefixes of the file (only on the error path).
* parser warnings (empty continuation lines) and parser directives.

The 64 KiB line limit is checked here too, because for a line of exactly
65536 bytes the package silently returns no instructions instead of failing.
"""

from __future__ import annotations

import bisect
import difflib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass

import dockerfile

from ociworker.errors import DockerfileError
from ociworker.frontend.dockerfile.shell import Lexer

__all__ = [
    "KNOWN_INSTRUCTIONS",
    "MAX_LINE_BYTES",
    "Heredoc",
    "Instruction",
    "ParseResult",
    "go_quote",
    "parse",
]

MAX_LINE_BYTES = 65535

KNOWN_INSTRUCTIONS = frozenset(
    {
        "add",
        "arg",
        "cmd",
        "copy",
        "entrypoint",
        "env",
        "expose",
        "from",
        "healthcheck",
        "label",
        "maintainer",
        "onbuild",
        "run",
        "shell",
        "stopsignal",
        "user",
        "volume",
        "workdir",
    }
)
_HEREDOC_INSTRUCTIONS = frozenset({"add", "copy", "run"})
_NOT_TRIGGERS = frozenset({"onbuild", "from", "maintainer"})
_KV_INSTRUCTIONS = frozenset({"env", "label"})

_DIRECTIVE_RE = re.compile(r"^#[ \t]*([a-zA-Z][a-zA-Z0-9]*)[ \t]*=[ \t]*(.+?)[ \t]*$")
_VALID_DIRECTIVES = frozenset({"syntax", "escape", "check"})
_HEREDOC_WORD_RE = re.compile(r"^([0-9]*)<<(-?)([^<]*)$")
_LEADING_TABS_RE = re.compile(r"^\t+", re.MULTILINE)
_ONBUILD_PREFIX_RE = re.compile(r"^\s*ONBUILD\s*", re.IGNORECASE)
_CMD_SPLIT_RE = re.compile(r"[\t\v\f\r ]+")
_JSON_NUL = "\\u0000"

# Heredoc words are always lexed with "\" regardless of the escape directive,
# as BuildKit does.
_HEREDOC_LINE_LEXER = Lexer(raw_quotes=True, raw_escapes=True)
_HEREDOC_NAME_LEXER = Lexer(skip_unset_env=True)
_HEREDOC_RAW_LEXER = Lexer(skip_unset_env=True, raw_quotes=True)


@dataclass(frozen=True)
class Heredoc:
    """One ``<<NAME`` document attached to RUN/COPY/ADD.

    ``content`` is the body as written (each line ending in "\\n"), like
    BuildKit's AST; ``body()`` applies ``<<-`` tab stripping. ``expand`` is
    False when any part of the delimiter was quoted (``<<"EOF"``), meaning the
    body must not undergo variable expansion. ``fd`` is the ``3<<EOF`` number.
    """

    name: str
    content: str
    expand: bool = True
    chomp: bool = False
    fd: int = 0

    def body(self) -> str:
        if self.chomp:
            return _LEADING_TABS_RE.sub("", self.content)
        return self.content


@dataclass(frozen=True)
class Instruction:
    """One instruction as BuildKit's parser sees it (no typing, no expansion).

    ``args`` holds the arguments: one string for shell form, one per element
    for exec (JSON) form, and key, value, key, value... for ENV and LABEL
    (values keep their quotes; expansion happens later). ``kv_legacy`` is True
    for the whitespace form ``ENV key value`` (one pair, no "=").
    """

    cmd: str
    flags: tuple[str, ...]
    args: tuple[str, ...]
    json: bool
    heredocs: tuple[Heredoc, ...]
    start_line: int
    end_line: int
    original: str
    sub: Instruction | None = None
    kv_legacy: bool = False

    def dump(self) -> str:
        """This instruction as one S-expression of BuildKit's ``Node.Dump``."""
        parts = [self.cmd]
        if self.flags:
            parts.append("[" + " ".join(go_quote(f) for f in self.flags) + "]")
        if self.sub is not None:
            parts.append(self.sub.dump())
        elif self.cmd in _KV_INSTRUCTIONS:
            sep = "" if self.kv_legacy else "="
            for i in range(0, len(self.args) - 1, 2):
                parts.append(go_quote(self.args[i]))
                parts.append(go_quote(self.args[i + 1]))
                parts.append(go_quote(sep))
        else:
            parts.extend(go_quote(a) for a in self.args)
        return "(" + " ".join(parts) + ")"


@dataclass(frozen=True)
class ParseResult:
    instructions: tuple[Instruction, ...]
    escape: str = "\\"
    syntax: str | None = None
    check: str | None = None
    warnings: tuple[str, ...] = ()

    def dump(self) -> str:
        """BuildKit's AST dump: one line per instruction, newline-terminated."""
        return "".join(i.dump() + "\n" for i in self.instructions)


_GO_ESCAPES = {
    "\a": "\\a",
    "\b": "\\b",
    "\f": "\\f",
    "\n": "\\n",
    "\r": "\\r",
    "\t": "\\t",
    "\v": "\\v",
    "\\": "\\\\",
    '"': '\\"',
}


def go_quote(text: str) -> str:
    """Quote like Go's ``strconv.Quote`` (printable Unicode stays as is)."""
    if text.isascii() and text.isprintable() and '"' not in text and "\\" not in text:
        return '"' + text + '"'
    out = ['"']
    for ch in text:
        esc = _GO_ESCAPES.get(ch)
        if esc is not None:
            out.append(esc)
        elif ch.isprintable():
            out.append(ch)
        else:
            code = ord(ch)
            if code < 0x80:
                out.append(f"\\x{code:02x}")
            elif code < 0x10000:
                out.append(f"\\u{code:04x}")
            else:
                out.append(f"\\U{code:08x}")
    out.append('"')
    return "".join(out)


# --- entry point ---------------------------------------------------------------


def syntax_of(text: str) -> str | None:
    """The ``# syntax=`` directive of a Dockerfile (read before it is parsed:
    it may name another frontend, whose file need not parse as a Dockerfile)."""
    found = _directives(text).get("syntax")
    return found.strip() if found is not None else None


def parse(text: str, filename: str = "Dockerfile") -> ParseResult:
    """Parse Dockerfile ``text``; raise DockerfileError with the failing line."""
    try:
        raw = text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise DockerfileError("the Dockerfile is not valid UTF-8 text", filename=filename) from exc
    if len(raw) > MAX_LINE_BYTES:
        _check_line_lengths(raw, filename)
    if "\x00" in text:
        # The compiled parser takes a C string, so a NUL would silently end
        # the file there; refuse it instead of building half a Dockerfile.
        number = text.count("\n", 0, text.index("\x00")) + 1
        raise DockerfileError(
            "NUL character in the Dockerfile: expected text",
            filename=filename,
            line=number,
            source_line=text.split("\n")[number - 1].replace("\x00", "\\x00"),
        )

    directives = _directives(text)
    escape = directives.get("escape", "\\")
    try:
        commands = dockerfile.parse_string(text)
    except dockerfile.GoParseError as exc:
        raise _located_error(text, str(exc), filename) from None

    src = _Source(text, escape, filename)
    instructions: list[Instruction] = []
    warnings: list[str] = []
    for command in commands:
        instructions.append(_convert(command, src, warnings))
    return ParseResult(
        instructions=tuple(instructions),
        escape=escape,
        syntax=directives.get("syntax"),
        check=directives.get("check"),
        warnings=tuple(warnings),
    )


# --- helpers -------------------------------------------------------------------


class _Source:
    """Raw source lines, split only when an instruction spans several lines."""

    def __init__(self, text: str, escape: str, filename: str) -> None:
        self.text = text
        self.filename = filename
        self.continuation = re.compile(re.escape(escape) + r"[ \t]*$")
        self._lines: list[str] | None = None
        self._blank: list[int] | None = None

    @property
    def lines(self) -> list[str]:
        if self._lines is None:
            lines = self.text.split("\n")
            if lines and lines[0].startswith("\ufeff"):
                lines[0] = lines[0][1:]
            self._lines = [ln[:-1] if ln.endswith("\r") else ln for ln in lines]
        return self._lines

    def blank_within(self, first: int, last: int) -> bool:
        """Whether a whitespace-only line lies in lines ``first+1..last``."""
        if self._blank is None:
            self._blank = [i for i, ln in enumerate(self.lines, start=1) if not ln.strip()]
        at = bisect.bisect_right(self._blank, first)
        return at < len(self._blank) and self._blank[at] <= last

    def line(self, number: int) -> str:
        lines = self.lines
        return lines[number - 1] if 0 < number <= len(lines) else ""

    def error(self, message: str, line: int) -> DockerfileError:
        return DockerfileError(
            message, filename=self.filename, line=line, source_line=self.line(line)
        )

    def warn(self, line: int, message: str) -> str:
        return f"{self.filename}:{line}: {message}"

    def logical_end(self, start_line: int) -> tuple[int, bool]:
        """Last line (1-based) of the instruction text starting at ``start_line``.

        Returns it with whether an empty line sat inside the continuation; both
        follow BuildKit's scanner: comment lines inside a continuation are
        skipped, blank ones are skipped but remembered.
        """
        lines = self.lines
        idx = start_line - 1
        if not self.continuation.search(lines[idx]):
            return start_line, False
        empty = False
        idx += 1
        while idx < len(lines):
            stripped = lines[idx].lstrip()
            if stripped.startswith("#"):
                idx += 1
                continue
            if not stripped:
                empty = True
                idx += 1
                continue
            if not self.continuation.search(lines[idx]):
                return idx + 1, empty
            idx += 1
        return len(lines), empty


def _check_line_lengths(raw: bytes, filename: str) -> None:
    for number, line in enumerate(raw.split(b"\n"), start=1):
        if len(line) > MAX_LINE_BYTES:
            preview = line[:80].decode("utf-8", "replace") + "..."
            raise DockerfileError(
                f"line is {len(line)} bytes long; at most {MAX_LINE_BYTES} bytes are allowed "
                "per line (split it with line continuations)",
                filename=filename,
                line=number,
                source_line=preview,
            )


def _directives(text: str) -> dict[str, str]:
    """Parser directives (``# escape=`` ...) from the top of the file.

    Only informational here: the Go parser applies them itself (and rejects
    duplicates and bad escape tokens); this just reports what it saw.
    """
    found: dict[str, str] = {}
    start = 1 if text.startswith("\ufeff") else 0
    pos = start
    while pos < len(text):
        end = text.find("\n", pos)
        if end < 0:
            end = len(text)
        line = text[pos:end].rstrip("\r\n").lstrip()
        pos = end + 1
        m = _DIRECTIVE_RE.match(line)
        if m is None:
            break
        key = m.group(1).lower()
        if key not in _VALID_DIRECTIVES:
            break
        found.setdefault(key, m.group(2))
    return found


def _located_error(text: str, message: str, filename: str) -> DockerfileError:
    """Attach a line to a GoParseError message.

    The parser stops at the first failing instruction, so the shortest prefix
    of the file failing with the same message ends on the failing line. To keep
    this linear on big files, windows of lines are parsed on their own, each
    starting where a complete instruction ended (plus the directive lines, so
    the escape character stays the same).
    """
    if message == "file with no instructions":
        return DockerfileError(
            "file with no instructions: expected at least one instruction such as FROM",
            filename=filename,
        )
    parts = text.split("\n")
    total = len(parts)
    header: list[str] = []
    for line in parts:
        if not _DIRECTIVE_RE.match(line.lstrip("\ufeff").rstrip("\r").lstrip()):
            break
        header.append(line)

    escape = _directives("\n".join(header)).get("escape", "\\")
    continuation = re.compile(re.escape(escape) + r"[ \t]*$")

    def attempt(begin: int, stop: int) -> tuple[str | None, tuple[dockerfile.Command, ...]]:
        lead = header if begin > 0 else []
        try:
            cmds = dockerfile.parse_string("\n".join(lead + parts[begin:stop]))
        except dockerfile.GoParseError as exc:
            return str(exc), ()
        return None, cmds

    def found(begin: int, stop: int) -> DockerfileError:
        lo, hi = begin + 1, stop
        while lo < hi:
            mid = (lo + hi) // 2
            if attempt(begin, mid)[0] == message:
                hi = mid
            else:
                lo = mid + 1
        # point at the first line of the instruction, not where it broke
        j = lo - 1
        while j >= 1:
            prev = parts[j - 1].rstrip("\r")
            stripped = prev.lstrip()
            if not stripped or stripped.startswith("#"):
                j -= 1
                continue
            if not continuation.search(prev):
                break
            lo = j
            j -= 1
        source = parts[lo - 1].rstrip("\r")
        if lo == 1:
            source = source.lstrip("\ufeff")
        return DockerfileError(message, filename=filename, line=lo, source_line=source)

    begin, width = 0, 2048
    while begin < total:
        stop = min(begin + width, total)
        error, cmds = attempt(begin, stop)
        if error == message:
            return found(begin, stop)
        if stop == total:
            break
        if error is None and len(cmds) >= 2:
            # the last instruction may be cut off; the one before is complete
            shift = len(header) if begin > 0 else 0
            begin = begin + cmds[-2].end_line - shift
        elif error == "file with no instructions":
            begin = stop
        else:
            width *= 2
    # the windows disagreed with the whole file (should not happen): report
    # the error without a line rather than a wrong one
    return DockerfileError(message, filename=filename)


def _split_command(line: str) -> tuple[str, str]:
    parts = _CMD_SPLIT_RE.split(line.strip(), maxsplit=1)
    return parts[0], parts[1] if len(parts) > 1 else ""


def _extract_flags(line: str) -> tuple[list[str], str]:
    """Leading ``--flag`` words of ``line`` and the text after them.

    Same rules as BuildKit's parser: flags end at the first word not starting
    with "--" or after a bare "--"; quotes and "\\" inside a flag are resolved.
    """
    flags: list[str] = []
    pos = 0
    n = len(line)
    while True:
        while pos < n and line[pos].isspace():
            pos += 1
        if pos >= n:
            return flags, ""
        if not line.startswith("--", pos):
            return flags, line[pos:]
        word: list[str] = []
        quote = ""
        quoted = False
        while pos < n:
            ch = line[pos]
            if quote:
                if ch == quote:
                    quote = ""
                    pos += 1
                    continue
            elif ch.isspace():
                break
            elif ch in ("'", '"'):
                quote = ch
                quoted = True
                pos += 1
                continue
            if ch == "\\":
                if pos + 1 >= n:
                    pos += 1
                    continue
                pos += 1
                ch = line[pos]
            word.append(ch)
            pos += 1
        text = "".join(word)
        if text == "--" and not quoted:
            return flags, line[pos:].lstrip()
        if text or quoted:
            flags.append(text)


def _heredoc_words(line: str) -> list[tuple[str, int, bool, bool]]:
    """(name, fd, chomp, expand) for each ``<<`` word of an instruction line.

    The delimiter is lexed twice, once keeping quotes: if the two results
    differ in quote count, part of it was quoted and the body is literal.
    """
    if not any(c in line for c in "'\"\\$"):
        # nothing to lex: plain white-space splitting gives the same words
        words = line.split()
    else:
        try:
            words = list(_HEREDOC_LINE_LEXER.process(line, {}).words)
        except DockerfileError:
            return []
    docs: list[tuple[str, int, bool, bool]] = []
    for word in words:
        m = _HEREDOC_WORD_RE.match(word)
        if m is None or not m.group(3):
            continue
        names = _HEREDOC_NAME_LEXER.process(m.group(3), {}).words
        if len(names) != 1:
            continue
        raw_names = _HEREDOC_RAW_LEXER.process(m.group(3), {}).words
        name = names[0]
        quotes = name.count("'") + name.count('"')
        raw_quotes = raw_names[0].count("'") + raw_names[0].count('"')
        docs.append((name, int(m.group(1) or 0), m.group(2) == "-", quotes == raw_quotes))
    return docs


def _heredocs(command: dockerfile.Command, line: str, src: _Source) -> tuple[Heredoc, ...]:
    words = _heredoc_words(line)
    got = command.heredocs
    if len(words) != len(got) or any(w[0] != h.name for w, h in zip(words, got, strict=False)):
        raise src.error(
            "internal error: could not match the heredoc delimiters of this instruction",
            command.start_line,
        )
    return tuple(
        Heredoc(name=h.name, content=h.content, expand=w[3], chomp=w[2], fd=w[1])
        for w, h in zip(words, got, strict=True)
    )


def _onbuild_heredocs(command: dockerfile.Command, line: str, src: _Source) -> tuple[Heredoc, ...]:
    """Re-read heredoc bodies of an ONBUILD trigger from the source lines."""
    words = _heredoc_words(line)
    if not words:
        return ()
    idx, _ = src.logical_end(command.start_line)  # 1-based last line == 0-based next
    lines = src.lines
    docs: list[Heredoc] = []
    for name, fd, chomp, expand in words:
        body: list[str] = []
        while True:
            if idx >= len(lines):
                raise src.error(
                    f"unterminated heredoc: expected a line {name!r}", command.start_line
                )
            current = lines[idx]
            idx += 1
            if (current.lstrip("\t") if chomp else current) == name:
                break
            body.append(current + "\n")
        docs.append(Heredoc(name=name, content="".join(body), expand=expand, chomp=chomp, fd=fd))
    if idx != command.end_line:
        raise src.error(
            "internal error: ONBUILD heredoc bodies do not end where the parser's do",
            command.start_line,
        )
    return tuple(docs)


def _json_args(line: str, name: str, args: tuple[str, ...]) -> tuple[str, ...]:
    """Re-decode an exec-form array whose strings contain ``\\u0000``.

    The compiled parser hands strings back as C strings, cutting each at its
    first NUL; decoding the array again restores the full values.
    """
    _, rest = _split_command(line)
    _, rest = _extract_flags(rest)
    prefix: tuple[str, ...] = ()
    if name == "healthcheck":
        word, rest = _split_command(rest)
        prefix = (word,)
    try:
        values, _ = json.JSONDecoder().raw_decode(rest.lstrip())
    except ValueError:
        return args
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        return args
    return (*prefix, *values)


def _kv_legacy(rest: str, args: Sequence[str]) -> bool:
    """True for ``ENV key value``: the first key is followed by space, not "="."""
    if not args:
        return False
    rest = rest.lstrip()
    key = args[0]
    return not (rest.startswith(key) and rest[len(key) : len(key) + 1] == "=")


def _unknown(name: str, line: int, src: _Source) -> DockerfileError:
    close = difflib.get_close_matches(name.lower(), sorted(KNOWN_INSTRUCTIONS), n=1)
    hint = f" (did you mean {close[0].upper()}?)" if close else ""
    return src.error(
        f"unknown instruction: {name}{hint}; expected one of "
        + ", ".join(sorted(i.upper() for i in KNOWN_INSTRUCTIONS)),
        line,
    )


def _convert(command: dockerfile.Command, src: _Source, warnings: list[str]) -> Instruction:
    # Hot path: runs once per instruction, so the common case does no string
    # work beyond what the package already did.
    name = command.cmd.lower()
    start = command.start_line
    if name not in KNOWN_INSTRUCTIONS:
        raise _unknown(command.cmd, start, src)
    original = command.original

    if command.end_line > start and src.blank_within(start, command.end_line):
        _, empty = src.logical_end(start)
        if empty:
            warnings.append(
                src.warn(
                    start,
                    "empty continuation line found in: "
                    f"{original.split(chr(10), 1)[0]} "
                    "(empty continuation lines will become errors in a future release)",
                )
            )

    if name == "onbuild":
        return _convert_onbuild(command, original.split("\n", 1)[0], src, warnings)
    if name == "maintainer":
        warnings.append(
            src.warn(start, "MAINTAINER is deprecated: use LABEL maintainer=... instead")
        )

    heredocs: tuple[Heredoc, ...] = ()
    if command.heredocs:
        heredocs = _heredocs(command, original.split("\n", 1)[0], src)

    args: tuple[str, ...] = command.value
    if command.json and _JSON_NUL in original:
        args = _json_args(original, name, args)
    kv_legacy = False
    if name in _KV_INSTRUCTIONS:
        _, rest = _split_command(original)
        _, rest = _extract_flags(rest)
        kv_legacy = _kv_legacy(rest, args)
        if kv_legacy:
            warnings.append(
                src.warn(
                    start,
                    f'"{name.upper()} key=value" should be used instead of legacy '
                    f'"{name.upper()} key value" format',
                )
            )
    return Instruction(
        name,
        command.flags,
        args,
        command.json,
        heredocs,
        start,
        command.end_line,
        original,
        None,
        kv_legacy,
    )


def _convert_onbuild(
    command: dockerfile.Command, first_line: str, src: _Source, warnings: list[str]
) -> Instruction:
    start, end = command.start_line, command.end_line
    sub: Instruction | None = None
    if command.sub_cmd:
        sub_name = command.sub_cmd.lower()
        if sub_name not in KNOWN_INSTRUCTIONS:
            raise _unknown(command.sub_cmd, start, src)
        if sub_name in _NOT_TRIGGERS:
            what = (
                "chaining ONBUILD via `ONBUILD ONBUILD` isn't allowed"
                if sub_name == "onbuild"
                else f"{sub_name.upper()} isn't allowed as an ONBUILD trigger"
            )
            raise src.error(what, start)
        _, rest = _split_command(first_line)
        _, trigger = _extract_flags(rest)  # drop ONBUILD's own flags
        _, rest = _split_command(trigger)  # drop the trigger instruction name
        sub_flags, sub_rest = _extract_flags(rest)
        args = tuple(command.value)
        if command.json and _JSON_NUL in first_line:
            args = _json_args(trigger, sub_name, args)
        kv_legacy = sub_name in _KV_INSTRUCTIONS and _kv_legacy(sub_rest, args)
        heredocs: tuple[Heredoc, ...] = ()
        if sub_name in _HEREDOC_INSTRUCTIONS and not command.json and "<<" in first_line:
            heredocs = _onbuild_heredocs(command, first_line, src)
        sub = Instruction(
            cmd=sub_name,
            flags=tuple(sub_flags),
            args=args,
            json=bool(command.json),
            heredocs=heredocs,
            start_line=start,
            end_line=end,
            original=_ONBUILD_PREFIX_RE.sub("", command.original, count=1),
            kv_legacy=kv_legacy,
        )
    return Instruction(
        cmd="onbuild",
        flags=tuple(command.flags),
        args=(),
        json=False,
        heredocs=(),
        start_line=start,
        end_line=end,
        original=command.original,
        sub=sub,
    )
