"""The README's CLI synopsis lists exactly the flags the parser has (issue 19).

A flag added to ``ociworker build`` (or to the top level) without a line in the synopsis
fails here, and so does a synopsis line for a flag that is gone. A flag with fixed choices
must name every choice in its option column (``--network host|none|default``).
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from ociworker.cli import make_parser

README = Path(__file__).resolve().parent.parent / "README.md"
_FLAG = re.compile(r"(?<![\w-])--?[A-Za-z][\w-]*")


def _synopsis() -> list[str]:
    """The lines of the README's text block that starts with the top-level usage line."""
    text = README.read_text(encoding="utf-8")
    for block in re.findall(r"^```text\n(.*?)^```$", text, flags=re.M | re.S):
        lines = str(block).splitlines()
        if lines and lines[0].startswith("ociworker [") and len(lines) > 1:
            return lines
    raise AssertionError("README.md has no ```text block starting 'ociworker [...] COMMAND'")


def _documented() -> tuple[str, dict[str, str]]:
    """The top-level line, and each build option string -> its option column."""
    lines = _synopsis()
    assert lines[1].startswith("ociworker build [OPTIONS] PATH | URL | -"), lines[1]
    build: dict[str, str] = {}
    for line in lines[2:]:
        assert line.startswith("  -"), f"not an option line: {line!r}"
        column = _column(line)
        for flag in _FLAG.findall(column):
            build[flag] = column
    return lines[0], build


def _column(line: str) -> str:
    """A synopsis line's option column: up to the first run of two spaces (the rest
    describes the option, and may say "default" without it being a choice)."""
    return re.split(r" {2,}", line.strip(), maxsplit=1)[0]


def _options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {
        s: a
        for a in parser._actions
        for s in a.option_strings
        if not isinstance(a, argparse._HelpAction)
    }


def _build_parser() -> argparse.ArgumentParser:
    for action in make_parser()._actions:
        if isinstance(action, argparse._SubParsersAction):
            sub: argparse.ArgumentParser = action.choices["build"]
            return sub
    raise AssertionError("make_parser() has no subcommands")


def _words(line: str) -> set[str]:
    return set(re.findall(r"[\w.-]+", line))


def test_build_flags_match_the_parser() -> None:
    _, documented = _documented()
    assert set(documented) == set(_options(_build_parser()))


def test_top_level_flags_match_the_parser() -> None:
    top, _ = _documented()
    documented = set(_FLAG.findall(top.removeprefix("ociworker")))
    assert documented == set(_options(make_parser()))


def test_choices_are_listed() -> None:
    top, documented = _documented()
    where = [(make_parser(), {f: top for f in _FLAG.findall(top)}), (_build_parser(), documented)]
    missing = [
        f"{flag} {choice}"
        for parser, lines in where
        for flag, action in _options(parser).items()
        if action.choices is not None and flag in lines
        for choice in action.choices
        if str(choice) not in _words(lines[flag])
    ]
    assert not missing, f"the README's synopsis does not name these choices: {missing}"


def test_a_missing_choice_is_noticed() -> None:
    # The check above reads the option column only: a description that says "default"
    # must not stand in for the choice.
    column = _column("  --network host|none   network (default is host)")
    assert _words(column) == {"--network", "host", "none"}
