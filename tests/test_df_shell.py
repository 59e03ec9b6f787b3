"""Word expansion against BuildKit's envVarTest/wordsTest tables plus extra cases."""

from __future__ import annotations

from pathlib import Path

import pytest

from ociworker.errors import DockerfileError
from ociworker.frontend.dockerfile.shell import Lexer, expand, process_word, process_words

SHELL_DATA = Path(__file__).resolve().parents[2] / "shared" / "conformance" / "shell"

# BuildKit's own test adds NULL="" to the environment the README lists; the
# "${NULL?}" line depends on it.
ENV_VAR_ENV = {"PWD": "/home", "SHELL": "bash", "KOREAN": "한국어", "NULL": ""}


def _env_var_cases() -> list[tuple[int, str, str]]:
    path = SHELL_DATA / "envVarTest"
    if not path.is_file():
        return []
    cases = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.startswith("#") or not line.strip():
            continue
        platform, source, expected = (part.strip() for part in line.split("|"))
        if platform == "W":
            continue
        cases.append((number, source, expected))
    return cases


def _words_cases() -> list[tuple[int, str, dict[str, str], list[str]]]:
    path = SHELL_DATA / "wordsTest"
    if not path.is_file():
        return []
    env: dict[str, str] = {}
    cases = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.startswith("#") or not line.strip():
            continue
        if line.startswith("ENV "):
            key, value = line[4:].lstrip(" ").split("=", 1)
            env[key] = value
            continue
        source, expected = line.split("|")
        cases.append((number, source.strip(), dict(env), expected.lstrip(" ").split(",")))
    return cases


_ENV_VAR = _env_var_cases()
_WORDS = _words_cases()
_NO_DATA = f"conformance data not found under {SHELL_DATA}"


@pytest.mark.skipif(not _ENV_VAR, reason=_NO_DATA)
@pytest.mark.parametrize(("number", "source", "expected"), _ENV_VAR, ids=lambda v: str(v))
def test_env_var_table(number: int, source: str, expected: str) -> None:
    if expected == "error":
        with pytest.raises(DockerfileError):
            process_word(source, ENV_VAR_ENV)
    else:
        assert process_word(source, ENV_VAR_ENV) == expected, f"envVarTest line {number}"


@pytest.mark.skipif(not _WORDS, reason=_NO_DATA)
@pytest.mark.parametrize(("number", "source", "env", "expected"), _WORDS)
def test_words_table(number: int, source: str, env: dict[str, str], expected: list[str]) -> None:
    if expected == ["error"]:
        with pytest.raises(DockerfileError):
            process_words(source, env)
    else:
        assert process_words(source, env) == expected, f"wordsTest line {number}"


@pytest.mark.parametrize(
    ("word", "expected"),
    [
        ("${V#*/}", "b/c.tar.gz"),
        ("${V##*/}", "c.tar.gz"),
        ("${V%.*}", "a/b/c.tar"),
        ("${V%%.*}", "a/b/c"),
        ("${V#x}", "a/b/c.tar.gz"),
        ("${V/\\//-}", "a-b/c.tar.gz"),
        ("${V//\\//-}", "a-b-c.tar.gz"),
        ("${V/b*/}", "a/"),
        ("${V//?/x}", "xxxxxxxxxxxx"),
        ("${E-def}", ""),
        ("${E:-def}", "def"),
        ("${U-def}", "def"),
        ("${E+alt}", "alt"),
        ("${E:+alt}", ""),
        ("${U+alt}", ""),
        ("${E?}", ""),
        ("${V/a/$$}", "/b/c.tar.gz"),  # "$$" is the shell PID: unset
    ],
)
def test_modifiers(word: str, expected: str) -> None:
    assert process_word(word, {"V": "a/b/c.tar.gz", "E": ""}) == expected


@pytest.mark.parametrize(
    ("word", "message"),
    [
        ("${U?}", "U: is not allowed to be unset"),
        ("${E:?}", "E: is not allowed to be empty"),
        ("${U:?custom message}", "U: custom message"),
        ("${V/a}", "missing '/'"),
        ("${V", "unsupported modifier"),
        ("${V#\\x}", "invalid escape"),
    ],
)
def test_errors(word: str, message: str) -> None:
    with pytest.raises(DockerfileError, match=message):
        process_word(word, {"V": "abc", "E": ""})


def test_backtick_escape() -> None:
    assert process_word("a`$b c\\d", {"b": "X"}, escape="`") == "a$b c\\d"
    assert process_words("a` b c", {}, escape="`") == ["a b", "c"]


def test_expand_reports_used_and_undefined() -> None:
    res = expand("$A ${B:-$C} '$D' \"$E\"", {"A": "1", "C": "3"})
    assert res.text == "1 3 $D "
    assert res.used == {"A", "B", "C", "E"}
    assert res.undefined == {"B", "E"}


def test_skip_unset_env_leaves_references() -> None:
    lexer = Lexer(skip_unset_env=True)
    assert lexer.process("$A ${B} ${C:-x} $D", {"D": "d"}).text == "$A ${B} ${C:-x} d"


def test_raw_quotes_and_escapes() -> None:
    lexer = Lexer(raw_quotes=True, raw_escapes=True)
    assert lexer.process("a\\ b 'c d'", {}).words == ("a\\ b", "'c d'")


def test_invalid_escape_token() -> None:
    with pytest.raises(DockerfileError, match="escape"):
        process_word("x", {}, escape="x")
