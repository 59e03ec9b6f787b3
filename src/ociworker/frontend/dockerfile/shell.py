"""Dockerfile word expansion: quotes, escapes and ``$VAR`` / ``${VAR...}`` forms.

This follows the behaviour of BuildKit's ``frontend/dockerfile/shell`` lexer
(unix flavour), which is *not* a POSIX shell: there is no command substitution,
no arithmetic, no field splitting inside quotes, and unknown modifiers are
errors rather than literals. Matching that lexer exactly matters more than
matching bash, because the same Dockerfile must mean the same thing here and
under ``docker build``.

The lexer also has the switches BuildKit's parser uses internally (keep quotes,
keep escapes, leave unset variables as written), exposed through ``Lexer`` so
the parser can detect heredoc words with the same rules.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass

from ociworker.errors import DockerfileError

__all__ = [
    "Expansion",
    "LexResult",
    "Lexer",
    "expand",
    "process_word",
    "process_words",
]

# Go's unicode.IsSpace for Latin-1; beyond it both Go and Python defer to the
# Unicode White_Space property, which str.isspace approximates closely.
_LATIN1_SPACE = frozenset("\t\n\v\f\r \x85\xa0")
_SPECIAL_PARAMS = frozenset("@*#?-$!0")
_REGEX_SPECIAL = frozenset("[]{}.+()|^$")


def _is_space(ch: str) -> bool:
    if ord(ch) < 0x100:
        return ch in _LATIN1_SPACE
    return ch.isspace()


def _is_letter(ch: str) -> bool:
    return unicodedata.category(ch).startswith("L")


def _is_digit(ch: str) -> bool:
    # Go's unicode.IsDigit is category Nd, which is what str.isdecimal tests.
    return ch.isdecimal()


@dataclass(frozen=True)
class Expansion:
    """The result of expanding one word.

    ``used`` holds every variable name the word referenced (set or not), so a
    caller can tell which build args were consumed; ``undefined`` is the subset
    that was not set, for "undefined variable" warnings.
    """

    text: str
    used: frozenset[str]
    undefined: frozenset[str] = frozenset()


@dataclass(frozen=True)
class LexResult:
    text: str
    words: tuple[str, ...]
    matched: frozenset[str]
    unmatched: frozenset[str]


class _Error(Exception):
    """Internal: a lexing failure before it is wrapped with the source word."""


class _Words:
    """Accumulates the word-split view alongside the joined text."""

    __slots__ = ("in_word", "word", "words")

    def __init__(self) -> None:
        self.word = ""
        self.words: list[str] = []
        self.in_word = False

    def add_char(self, ch: str) -> None:
        if _is_space(ch):
            if self.in_word and self.word:
                self.words.append(self.word)
                self.word = ""
                self.in_word = False
        else:
            self.add_raw_char(ch)

    def add_raw_char(self, ch: str) -> None:
        self.word += ch
        self.in_word = True

    def add_string(self, text: str) -> None:
        for ch in text:
            self.add_char(ch)

    def add_raw_string(self, text: str) -> None:
        self.word += text
        self.in_word = True

    def finish(self) -> list[str]:
        if self.word:
            self.words.append(self.word)
            self.word = ""
            self.in_word = False
        return self.words


class _Scan:
    """One pass over one word; mirrors the state of BuildKit's shellWord."""

    def __init__(self, lexer: Lexer, source: str, env: Mapping[str, str]) -> None:
        self.lexer = lexer
        self.src = source
        self.pos = 0
        self.env = env
        self.raw_escapes = lexer.raw_escapes
        self.matched: set[str] = set()
        self.unmatched: set[str] = set()

    # -- scanner primitives ("" stands for end of input) --------------------
    def peek(self) -> str:
        return self.src[self.pos] if self.pos < len(self.src) else ""

    def next(self) -> str:
        if self.pos >= len(self.src):
            return ""
        ch = self.src[self.pos]
        self.pos += 1
        return ch

    def get_env(self, name: str) -> tuple[str, bool]:
        if name in self.env:
            self.matched.add(name)
            return self.env[name], True
        self.unmatched.add(name)
        return "", False

    # -- grammar --------------------------------------------------------------
    def process_stop_on(self, stop: str, raw_escapes: bool) -> tuple[str, list[str]]:
        """Read until ``stop`` (consumed) or, when ``stop`` is "", to the end."""
        saved = self.raw_escapes
        self.raw_escapes = raw_escapes
        try:
            return self._stop_on(stop)
        finally:
            self.raw_escapes = saved

    def _stop_on(self, stop: str) -> tuple[str, list[str]]:
        out: list[str] = []
        words = _Words()
        escape = self.lexer.escape
        quotes = not self.lexer.skip_process_quotes
        while self.pos < len(self.src):
            ch = self.src[self.pos]
            if stop and ch == stop:
                self.pos += 1
                return "".join(out), words.finish()
            if ch == "$":
                tmp = self.process_dollar()
                out.append(tmp)
                words.add_string(tmp)
            elif quotes and ch == "'":
                tmp = self.process_single_quote()
                out.append(tmp)
                words.add_raw_string(tmp)
            elif quotes and ch == '"':
                tmp = self.process_double_quote()
                out.append(tmp)
                words.add_raw_string(tmp)
            else:
                self.pos += 1
                if ch == escape:
                    if self.raw_escapes:
                        words.add_raw_char(ch)
                        out.append(ch)
                    ch = self.next()
                    if not ch:
                        # a lone escape at the end of the word is dropped
                        break
                    words.add_raw_char(ch)
                else:
                    words.add_char(ch)
                out.append(ch)
        if stop:
            raise _Error(f"unexpected end of statement while looking for matching {stop}")
        return "".join(out), words.finish()

    def process_single_quote(self) -> str:
        # Everything up to the next ' is literal; a ' cannot be escaped inside.
        raw = self.lexer.raw_quotes
        out: list[str] = []
        quote = self.next()
        if raw:
            out.append(quote)
        while True:
            ch = self.next()
            if not ch:
                raise _Error("unexpected end of statement while looking for matching single-quote")
            if ch == "'":
                if raw:
                    out.append(ch)
                return "".join(out)
            out.append(ch)

    def process_double_quote(self) -> str:
        raw = self.lexer.raw_quotes
        escape = self.lexer.escape
        out: list[str] = []
        quote = self.next()
        if raw:
            out.append(quote)
        while True:
            ch = self.peek()
            if not ch:
                raise _Error("unexpected end of statement while looking for matching double-quote")
            if ch == '"':
                self.pos += 1
                if raw:
                    out.append(ch)
                return "".join(out)
            if ch == "$":
                out.append(self.process_dollar())
                continue
            self.pos += 1
            if ch == escape:
                if self.raw_escapes:
                    out.append(ch)
                nxt = self.peek()
                if not nxt:
                    continue
                # Inside double quotes the escape only protects " $ and itself;
                # before anything else it stays a literal character.
                if nxt in ('"', "$", escape):
                    ch = self.next()
            out.append(ch)

    def process_dollar(self) -> str:
        self.pos += 1  # the "$"
        if self.peek() != "{":
            name = self.process_name()
            if not name:
                return "$"
            value, found = self.get_env(name)
            if not found and self.lexer.skip_unset_env:
                return "$" + name
            return value

        self.pos += 1  # the "{"
        first = self.peek()
        if not first:
            raise _Error("syntax error: missing '}'")
        if first in "{}:":
            raise _Error("syntax error: bad substitution")
        name = self.process_name()
        ch = self.next()
        chs = ch
        null_is_unset = False

        if ch == "}":
            value, found = self.get_env(name)
            if not found and self.lexer.skip_unset_env:
                return "${" + name + "}"
            return value
        if ch in (":", "+", "-", "?", "#", "%"):
            if ch == ":":
                null_is_unset = True
                ch = self.next()
                chs += ch
            try:
                word, _ = self.process_stop_on("}", ch in ("#", "%"))
            except _Error:
                if not self.peek():
                    raise _Error("syntax error: missing '}'") from None
                raise
            value, found = self.get_env(name)
            if self.lexer.skip_unset_env and not found:
                return "${" + name + chs + word + "}"
            return self._modifier(name, ch, chs, word, value, found, null_is_unset)
        if ch == "/":
            replace_all = self.peek() == "/"
            if replace_all:
                self.pos += 1
            try:
                pattern, _ = self.process_stop_on("/", True)
            except _Error:
                if not self.peek():
                    raise _Error("syntax error: missing '/' in ${}") from None
                raise
            try:
                replacement, _ = self.process_stop_on("}", True)
            except _Error:
                if not self.peek():
                    raise _Error("syntax error: missing '}'") from None
                raise
            value, found = self.get_env(name)
            if self.lexer.skip_unset_env and not found:
                return "${" + name + "/" + pattern + "/" + replacement + "}"
            regex = _pattern_regex(pattern, greedy=True, anchored=False)
            if replace_all:
                return regex.sub(lambda _m: _go_expand_template(replacement), value)
            m = regex.search(value)
            if m is None:
                return value
            return value[: m.start()] + _go_expand_template(replacement) + value[m.end() :]
        raise _Error(f"unsupported modifier ({chs}) in substitution")

    @staticmethod
    def _modifier(
        name: str, ch: str, chs: str, word: str, value: str, found: bool, null_is_unset: bool
    ) -> str:
        unset = not found or (null_is_unset and value == "")
        if ch == "-":
            return word if unset else value
        if ch == "+":
            return "" if unset else word
        if ch == "?":
            if not found:
                raise _Error(f"{name}: {word or 'is not allowed to be unset'}")
            if null_is_unset and value == "":
                raise _Error(f"{name}: {word or 'is not allowed to be empty'}")
            return value
        if ch in ("#", "%"):
            greedy = word.startswith(ch)
            if greedy:
                word = word[1:]
            if ch == "%":
                return _trim_suffix(word, value, greedy)
            return _trim_prefix(word, value, greedy)
        raise _Error(f"unsupported modifier ({chs}) in substitution")

    def process_name(self) -> str:
        start = self.pos
        src = self.src
        if self.pos < len(src):
            ch = src[self.pos]
            if _is_digit(ch):
                # positional parameters: all leading digits form the name
                while self.pos < len(src) and _is_digit(src[self.pos]):
                    self.pos += 1
                return src[start : self.pos]
            if ch in _SPECIAL_PARAMS:
                self.pos += 1
                return ch
        while self.pos < len(src):
            ch = src[self.pos]
            if not (ch == "_" or _is_letter(ch) or _is_digit(ch)):
                break
            self.pos += 1
        return src[start : self.pos]


def _pattern_regex(pattern: str, *, greedy: bool, anchored: bool) -> re.Pattern[str]:
    """Translate a ``${v#pat}``-style glob (``*``, ``?``, no brackets) to a regex."""
    out = ["^"] if anchored else []
    star = ".*" if greedy else ".*?"
    i = 0
    n = len(pattern)
    while i < n:
        ch = pattern[i]
        i += 1
        if ch == "*":
            out.append(star)
        elif ch == "?":
            out.append(".")
        elif ch == "\\":
            nxt = pattern[i] if i < n else ""
            # "\}" and "\/" only kept the delimiter out of the ${} syntax
            if nxt in ("}", "/"):
                continue
            if nxt not in ("*", "?", "\\"):
                shown = nxt or "EOF"
                raise _Error(
                    f"invalid pattern ({pattern}) in substitution: invalid escape '\\{shown}'"
                )
            i += 1
            out.append(re.escape(nxt))
        else:
            out.append(re.escape(ch))
    return re.compile("".join(out))


def _reverse_pattern(pattern: str) -> str:
    # Reverse, keeping each "\x" escape pair in its original order.
    tokens: list[str] = []
    i = 0
    while i < len(pattern):
        if pattern[i] == "\\" and i + 1 < len(pattern):
            tokens.append(pattern[i : i + 2])
            i += 2
        else:
            tokens.append(pattern[i])
            i += 1
    return "".join(reversed(tokens))


def _trim_prefix(pattern: str, value: str, greedy: bool) -> str:
    m = _pattern_regex(pattern, greedy=greedy, anchored=True).search(value)
    return value[m.end() :] if m else value


def _trim_suffix(pattern: str, value: str, greedy: bool) -> str:
    # A regex cannot find the shortest match anchored at the end, so match the
    # reversed pattern against the reversed value instead.
    return _trim_prefix(_reverse_pattern(pattern), value[::-1], greedy)[::-1]


_TEMPLATE_NAME = re.compile(r"[A-Za-z0-9_]+")


def _go_expand_template(template: str) -> str:
    """Apply Go's regexp replacement-template rules for a pattern with no groups.

    BuildKit hands the replacement to ``Regexp.ReplaceAllString``, so ``$$``
    becomes ``$`` and ``$name``/``${name}`` (always an unknown group here)
    become empty; a ``$`` that starts no valid reference stays literal.
    """
    if "$" not in template:
        return template
    out: list[str] = []
    i = 0
    n = len(template)
    while i < n:
        ch = template[i]
        if ch != "$" or i + 1 >= n:
            out.append(ch)
            i += 1
            continue
        nxt = template[i + 1]
        if nxt == "$":
            out.append("$")
            i += 2
            continue
        if nxt == "{":
            end = template.find("}", i + 2)
            if end > i + 2 and _TEMPLATE_NAME.fullmatch(template, i + 2, end):
                i = end + 1
                continue
            out.append(ch)
            i += 1
            continue
        m = _TEMPLATE_NAME.match(template, i + 1)
        if m:
            i = m.end()
            continue
        out.append(ch)
        i += 1
    return "".join(out)


@dataclass(frozen=True)
class Lexer:
    """A configured expansion lexer; the module functions use the defaults.

    ``raw_quotes`` keeps quote characters in the output, ``raw_escapes`` keeps
    escape characters, ``skip_unset_env`` leaves references to unset variables
    as written, ``skip_process_quotes`` treats quotes as ordinary characters.
    """

    escape: str = "\\"
    raw_quotes: bool = False
    raw_escapes: bool = False
    skip_unset_env: bool = False
    skip_process_quotes: bool = False

    def __post_init__(self) -> None:
        if self.escape not in ("\\", "`"):
            raise DockerfileError(f"invalid escape token {self.escape!r}: expected \\ or `")

    def process(self, word: str, env: Mapping[str, str]) -> LexResult:
        scan = _Scan(self, word, env)
        try:
            text, words = scan.process_stop_on("", self.raw_escapes)
        except _Error as exc:
            raise DockerfileError(f"failed to process {_go_quote_simple(word)}: {exc}") from None
        return LexResult(
            text=text,
            words=tuple(words),
            matched=frozenset(scan.matched),
            unmatched=frozenset(scan.unmatched),
        )


def _go_quote_simple(text: str) -> str:
    # Enough of Go's %q for an error message; the exact form is cosmetic here.
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


_DEFAULT = Lexer()
_BACKTICK = Lexer(escape="`")


def _lexer(escape: str) -> Lexer:
    if escape == "\\":
        return _DEFAULT
    if escape == "`":
        return _BACKTICK
    return Lexer(escape=escape)  # raises with a clear message


def process_word(word: str, env: Mapping[str, str], escape: str = "\\") -> str:
    """Expand ``word`` into one string (spaces between words are kept)."""
    return _lexer(escape).process(word, env).text


def process_words(word: str, env: Mapping[str, str], escape: str = "\\") -> list[str]:
    """Expand ``word`` and split it into words on unquoted whitespace.

    Splitting happens after expansion, so a variable holding spaces yields
    several words unless it was quoted.
    """
    return list(_lexer(escape).process(word, env).words)


def expand(word: str, env: Mapping[str, str], escape: str = "\\") -> Expansion:
    """Expand ``word`` and report which variables it referenced."""
    res = _lexer(escape).process(word, env)
    return Expansion(
        text=res.text,
        used=res.matched | res.unmatched,
        undefined=res.unmatched,
    )
