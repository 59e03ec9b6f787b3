"""Property tests for Dockerfile word expansion (frontend/dockerfile/shell.py).

The reference is a small model written here, from BuildKit's documented rules
(``frontend/dockerfile/shell/lex.go`` and the envVarTest table), for a subset of
the grammar: plain characters, escapes, '...' and "..." quotes, ``$VAR``,
``${VAR}``, ``${VAR-w}``, ``${VAR:-w}``, ``${VAR+w}`` and ``${VAR:+w}`` with
nested words. Each generated word is built from tokens that each know their
own source text and their expected expansion, so the expectation never comes
from the code under test. Both escape tokens (``\\`` and the ``# escape=`
directive's backtick) are covered.

Beyond the model: any text at all either expands or fails with
``DockerfileError`` (never another exception), single-quoted text is never
expanded, and a variable's value is never expanded again.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from ociworker.errors import DockerfileError
from ociworker.frontend.dockerfile.shell import expand, process_word, process_words

pytestmark = pytest.mark.stress

NAMES = ("A", "B", "EMPTY", "UNSET", "_x1")
# Values hold every character that would mean something if it were expanded
# again: a value must come out exactly as it is.
VALUE_CHARS = "ab $'\"\\`{}\t"


@dataclass(frozen=True)
class Piece:
    """A fragment of a word: its source text, the text it expands to (each
    character flagged True when unquoted whitespace there splits words), and
    the variable names it mentions."""

    src: str
    out: tuple[tuple[str, bool], ...]
    names: frozenset[str] = frozenset()


def _text(p: Piece) -> str:
    return "".join(ch for ch, _ in p.out)


def _join(pieces: list[Piece]) -> Piece:
    src: list[str] = []
    for i, p in enumerate(pieces):
        s = p.src
        # "$A" followed by a name character would read as a longer name; the
        # braced form keeps the model's token boundaries.
        if s.startswith("$") and not s.startswith("${") and i + 1 < len(pieces):
            nxt = pieces[i + 1].src[:1]
            if nxt and (nxt.isalnum() or nxt == "_"):
                s = "${" + s[1:] + "}"
        src.append(s)
    return Piece(
        "".join(src),
        tuple(c for p in pieces for c in p.out),
        frozenset().union(*(p.names for p in pieces)),
    )


def _splittable(text: str, unquoted: bool) -> tuple[tuple[str, bool], ...]:
    return tuple((ch, unquoted and ch in " \t") for ch in text)


class Model:
    def __init__(self, env: dict[str, str], esc: str) -> None:
        self.env = env
        self.esc = esc

    def var(self, name: str, unquoted: bool) -> Piece:
        return Piece("$" + name, _splittable(self.env.get(name, ""), unquoted), frozenset({name}))

    def braced(self, name: str, unquoted: bool) -> Piece:
        return Piece(
            "${" + name + "}", _splittable(self.env.get(name, ""), unquoted), frozenset({name})
        )

    def modifier(self, name: str, op: str, word: Piece, unquoted: bool) -> Piece:
        found = name in self.env
        value = self.env.get(name, "")
        unset = not found or (op.startswith(":") and value == "")
        if op.endswith("-"):
            text = _text(word) if unset else value
        else:
            text = "" if unset else _text(word)
        # the result of ${...} is one string, split only when unquoted
        return Piece(
            "${" + name + op + word.src + "}",
            _splittable(text, unquoted),
            word.names | {name},
        )


def plain_chars(forbidden: str) -> st.SearchStrategy[str]:
    return st.sampled_from([c for c in "ab-./: \t=@é" if c not in forbidden])


@st.composite
def unquoted_piece(draw: st.DrawFn, m: Model, depth: int, in_braces: bool) -> Piece:
    kinds = ["plain", "escape", "var", "braced"]
    if not in_braces:
        kinds += ["squote", "dquote"]
    if depth > 0:
        kinds.append("modifier")
    kind = draw(st.sampled_from(kinds))
    if kind == "plain":
        ch = draw(plain_chars(""))
        return Piece(ch, _splittable(ch, True))
    if kind == "escape":
        # an escaped character is literal and never splits
        ch = draw(st.sampled_from("a $'\"{}\\`"))
        return Piece(m.esc + ch, ((ch, False),))
    if kind == "squote":
        body = draw(st.text(alphabet='ab $"\\`{}', max_size=6))
        return Piece("'" + body + "'", tuple((c, False) for c in body))
    if kind == "dquote":
        parts = draw(st.lists(dquoted_piece(m, depth), max_size=4))
        inner = _join(parts)
        return Piece('"' + inner.src + '"', inner.out, inner.names)
    name = draw(st.sampled_from(NAMES))
    if kind == "var":
        return m.var(name, True)
    if kind == "braced":
        return m.braced(name, True)
    return modifier_piece(draw, m, name, depth, True)


def modifier_piece(draw: st.DrawFn, m: Model, name: str, depth: int, unquoted: bool) -> Piece:
    op = draw(st.sampled_from(["-", ":-", "+", ":+"]))
    word = _join(draw(st.lists(unquoted_piece(m, depth - 1, True), max_size=3)))
    return m.modifier(name, op, word, unquoted)


@st.composite
def dquoted_piece(draw: st.DrawFn, m: Model, depth: int) -> Piece:
    kinds = ["plain", "escape_special", "escape_other", "squote", "var", "braced"]
    if depth > 0:
        kinds.append("modifier")
    kind = draw(st.sampled_from(kinds))
    if kind == "plain":
        ch = draw(plain_chars("$"))
        return Piece(ch, ((ch, False),))
    if kind == "escape_special":
        # inside "...", the escape protects only " $ and itself
        ch = draw(st.sampled_from(['"', "$", m.esc]))
        return Piece(m.esc + ch, ((ch, False),))
    if kind == "escape_other":
        # ...before anything else it is a literal character
        ch = draw(st.sampled_from("ab '{}"))
        return Piece(m.esc + ch, ((m.esc, False), (ch, False)))
    if kind == "squote":
        return Piece("'", (("'", False),))
    name = draw(st.sampled_from(NAMES))
    if kind == "var":
        return m.var(name, False)
    if kind == "braced":
        return m.braced(name, False)
    return modifier_piece(draw, m, name, depth, False)


@st.composite
def cases(draw: st.DrawFn) -> tuple[dict[str, str], str, Piece]:
    env: dict[str, str] = {"EMPTY": ""}
    for name in ("A", "B", "_x1"):
        if draw(st.booleans()):
            env[name] = draw(st.text(alphabet=VALUE_CHARS, max_size=6))
    esc = draw(st.sampled_from(["\\", "`"]))
    m = Model(env, esc)
    word = _join(draw(st.lists(unquoted_piece(m, 2, False), max_size=8)))
    return env, esc, word


def _words(p: Piece) -> list[str]:
    words: list[str] = []
    cur: list[str] = []
    for ch, splits in p.out:
        if splits:
            if cur:
                words.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if cur:
        words.append("".join(cur))
    return words


@given(cases())
def test_expansion_matches_the_model(case: tuple[dict[str, str], str, Piece]) -> None:
    env, esc, word = case
    got = expand(word.src, env, esc)
    assert got.text == _text(word), word.src
    assert got.used == word.names, word.src
    assert got.undefined == {n for n in word.names if n not in env}, word.src
    assert process_words(word.src, env, esc) == _words(word), word.src


# Any text over the characters that mean something to the lexer.
LEXER_TEXT = st.text(alphabet="ab $'\"\\`{}:-+?#%/*AB_ \t1", max_size=30)


@given(LEXER_TEXT, st.sampled_from(["\\", "`"]))
@example("${A/", "\\")
@example("${A:", "\\")
@example("${A%\\", "\\")
@example("${A/\\x/}", "\\")
def test_any_text_expands_or_fails_with_our_error(text: str, esc: str) -> None:
    env = {"A": "a*b/c", "B": ""}
    try:
        out = process_word(text, env, esc)
    except DockerfileError as exc:
        assert str(exc).startswith("failed to process"), exc
    else:
        assert isinstance(out, str)


@given(st.text(alphabet=st.characters(exclude_characters="'"), max_size=20))
def test_single_quoted_text_is_never_expanded(body: str) -> None:
    env = {"A": "expanded"}
    for esc in ("\\", "`"):
        got = expand("'" + body + "'", env, esc)
        assert got.text == body
        assert got.used == frozenset()


@given(st.text(alphabet=VALUE_CHARS + "$AB{}", max_size=12))
def test_a_value_is_never_expanded_again(value: str) -> None:
    env = {"A": value, "B": "nested"}
    assert process_word("$A", env) == value
    assert process_word('"${A}"', env) == value
    assert process_word("${A-x}", env) == value
