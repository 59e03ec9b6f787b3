"""Dockerfile parser: BuildKit conformance dumps plus heredoc/ONBUILD/error cases."""

from __future__ import annotations

from pathlib import Path

import pytest

from ociworker.errors import DockerfileError
from ociworker.frontend.dockerfile.parser import Heredoc, go_quote, parse

CONFORMANCE = Path(__file__).resolve().parents[2] / "shared" / "conformance"


def _cases(kind: str) -> list[Path]:
    root = CONFORMANCE / kind
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if (p / "Dockerfile").is_file())


_POSITIVE = _cases("dockerfile-parser")
_NEGATIVE = _cases("dockerfile-parser-negative")
_NO_DATA = f"conformance data not found under {CONFORMANCE}"


@pytest.mark.skipif(not _POSITIVE, reason=_NO_DATA)
@pytest.mark.parametrize("case", _POSITIVE, ids=lambda p: p.name)
def test_conformance_dump(case: Path) -> None:
    text = (case / "Dockerfile").read_text(encoding="utf-8")
    expected = (case / "result").read_text(encoding="utf-8")
    assert parse(text).dump() == expected


@pytest.mark.skipif(not _NEGATIVE, reason=_NO_DATA)
@pytest.mark.parametrize("case", _NEGATIVE, ids=lambda p: p.name)
def test_conformance_negative(case: Path) -> None:
    text = (case / "Dockerfile").read_text(encoding="utf-8")
    with pytest.raises(DockerfileError):
        parse(text)


# --- heredocs -------------------------------------------------------------------


def test_heredoc_run() -> None:
    r = parse("FROM a\nRUN <<EOF\necho hi\necho $HOME\nEOF\n")
    run = r.instructions[1]
    assert run.cmd == "run"
    assert run.args == ("<<EOF",)
    assert run.heredocs == (Heredoc(name="EOF", content="echo hi\necho $HOME\n"),)
    assert run.start_line == 2 and run.end_line == 5


def test_heredoc_chomp_keeps_raw_content_and_strips_in_body() -> None:
    r = parse("FROM a\nRUN <<-EOT\n\techo a\n\t\tb\n\tEOT\n")
    (doc,) = r.instructions[1].heredocs
    assert doc.chomp and doc.expand
    assert doc.content == "\techo a\n\t\tb\n"
    assert doc.body() == "echo a\nb\n"


@pytest.mark.parametrize(
    ("delim", "name", "expand"),
    [
        ('"EOF"', "EOF", False),
        ("'EOF'", "EOF", False),
        ('E"O"F', "EOF", False),
        ("EOF", "EOF", True),
    ],
)
def test_heredoc_quoted_delimiter_disables_expansion(delim: str, name: str, expand: bool) -> None:
    r = parse(f"FROM a\nRUN <<{delim}\n$X\n{name}\n")
    (doc,) = r.instructions[1].heredocs
    assert (doc.name, doc.expand, doc.content) == (name, expand, "$X\n")


def test_several_heredocs_on_one_line() -> None:
    r = parse("FROM a\nRUN <<A cat - <<-'B' 3<<C\nfirst\nA\n\tsecond\n\tB\nthird\nC\nRUN x\n")
    run = r.instructions[1]
    assert [(d.name, d.content, d.expand, d.chomp, d.fd) for d in run.heredocs] == [
        ("A", "first\n", True, False, 0),
        ("B", "\tsecond\n", False, True, 0),
        ("C", "third\n", True, False, 3),
    ]
    assert r.instructions[2].start_line == 9


def test_copy_heredoc_to_destination() -> None:
    r = parse("FROM a\nCOPY --chmod=644 <<EOF /dest/file\nhello\nEOF\n")
    cp = r.instructions[1]
    assert cp.flags == ("--chmod=644",)
    assert cp.args == ("<<EOF", "/dest/file")
    assert cp.heredocs == (Heredoc(name="EOF", content="hello\n"),)
    assert cp.dump() == '(copy ["--chmod=644"] "<<EOF" "/dest/file")'


def test_heredoc_is_not_recognised_in_exec_form() -> None:
    r = parse('FROM a\nRUN ["cat", "<<EOF"]\n')
    assert r.instructions[1].heredocs == ()


def test_unterminated_heredoc_is_an_error() -> None:
    with pytest.raises(DockerfileError, match="unterminated heredoc"):
        parse("FROM a\nRUN <<EOF\necho\n")


def test_onbuild_heredoc_body_is_recovered() -> None:
    r = parse("FROM a\nONBUILD RUN <<EOF\necho hi\nEOF\nRUN after\n")
    onbuild = r.instructions[1]
    assert onbuild.sub is not None
    assert onbuild.sub.heredocs == (Heredoc(name="EOF", content="echo hi\n"),)
    assert r.instructions[2].args == ("after",)


# --- ONBUILD, flags, ENV -------------------------------------------------------------


def test_onbuild_keeps_trigger_flags_apart() -> None:
    r = parse("FROM a\nONBUILD COPY --from=build /x /y\n")
    onbuild = r.instructions[1]
    assert onbuild.cmd == "onbuild" and onbuild.flags == () and onbuild.args == ()
    assert onbuild.sub is not None
    assert onbuild.sub.cmd == "copy"
    assert onbuild.sub.flags == ("--from=build",)
    assert onbuild.sub.args == ("/x", "/y")
    assert onbuild.sub.original == "COPY --from=build /x /y"
    assert onbuild.dump() == '(onbuild (copy ["--from=build"] "/x" "/y"))'


@pytest.mark.parametrize("trigger", ["ONBUILD RUN x", "FROM x", "MAINTAINER me"])
def test_onbuild_forbidden_triggers(trigger: str) -> None:
    with pytest.raises(DockerfileError, match="ONBUILD") as info:
        parse(f"FROM a\nONBUILD {trigger}\n")
    assert info.value.line == 2


def test_env_forms_and_dump() -> None:
    r = parse('FROM a\nENV A b c\nENV A=1 B="two words"\nLABEL x=y\n')
    legacy, modern, label = r.instructions[1:]
    assert legacy.args == ("A", "b c") and legacy.kv_legacy
    assert modern.args == ("A", "1", "B", '"two words"') and not modern.kv_legacy
    assert legacy.dump() == '(env "A" "b c" "")'
    assert modern.dump() == '(env "A" "1" "=" "B" "\\"two words\\"" "=")'
    assert label.dump() == '(label "x" "y" "=")'
    assert any("legacy" in w and ":2:" in w for w in r.warnings)


def test_exec_form_keeps_nul_escapes() -> None:
    r = parse('FROM a\nCMD ["a\\u0000b", "c"]\n')
    assert r.instructions[1].args == ("a\x00b", "c")
    assert r.instructions[1].dump() == '(cmd "a\\x00b" "c")'


def test_go_quote() -> None:
    assert go_quote('a"b\\c') == '"a\\"b\\\\c"'
    assert go_quote("\x00\x7f\t♥") == '"\\x00\\x7f\\t♥"'
    assert go_quote("\u200b") == '"\\u200b"'


# --- directives and warnings --------------------------------------------------------


def test_directives() -> None:
    r = parse("# syntax=docker/dockerfile:1\n# escape=`\nFROM a\nRUN echo \\\n")
    assert r.syntax == "docker/dockerfile:1"
    assert r.escape == "`"
    # with ` as escape, a trailing backslash is just text
    assert r.instructions[1].args == ("echo \\",)


def test_directive_after_comment_is_ignored() -> None:
    r = parse("# hello\n# escape=`\nFROM a\n")
    assert r.escape == "\\"


def test_empty_continuation_warning() -> None:
    r = parse("FROM a\nRUN echo a \\\n\n    b\n")
    assert r.instructions[1].args == ("echo a     b",)
    assert len(r.warnings) == 1
    assert "empty continuation line" in r.warnings[0]
    clean = parse("FROM a\nRUN echo a \\\n# comment\n    b\n")
    assert clean.warnings == ()


def test_heredoc_blank_lines_are_not_empty_continuations() -> None:
    r = parse("FROM a\nRUN <<EOF\n\necho\n\nEOF\n")
    assert r.warnings == ()


def test_maintainer_warns() -> None:
    r = parse("FROM a\nMAINTAINER me\n")
    assert any("MAINTAINER" in w for w in r.warnings)


# --- errors ---------------------------------------------------------------------------


def test_unknown_instruction() -> None:
    with pytest.raises(DockerfileError, match="unknown instruction: RUNN") as info:
        parse("FROM a\nRUN ok\nRUNN x\n")
    err = info.value
    assert (err.filename, err.line, err.source_line) == ("Dockerfile", 3, "RUNN x")
    assert "did you mean RUN" in err.message


def test_unknown_onbuild_trigger() -> None:
    with pytest.raises(DockerfileError, match="unknown instruction: FOO"):
        parse("FROM a\nONBUILD FOO bar\n")


def test_error_carries_line_and_source() -> None:
    text = "FROM a\n" + "RUN x\n" * 5000 + "ENV \\\n  ONLYKEY\nRUN y\n"
    with pytest.raises(DockerfileError) as info:
        parse(text, filename="app.Dockerfile")
    err = info.value
    assert err.filename == "app.Dockerfile"
    assert err.line == 5002
    assert err.source_line == "ENV \\"
    assert "ENV must have two arguments" in str(err)


def test_env_syntax_error() -> None:
    with pytest.raises(DockerfileError, match="Must be of the form: name=value") as info:
        parse("FROM a\nENV a=b c\n")
    assert info.value.line == 2


def test_bad_escape_directive() -> None:
    with pytest.raises(DockerfileError, match="invalid escape token") as info:
        parse("# escape=x\nFROM a\n")
    assert info.value.line == 1


@pytest.mark.parametrize("size", [65536, 70000])
def test_line_over_64k_is_rejected(size: int) -> None:
    long = "RUN " + "x" * (size - 4)
    with pytest.raises(DockerfileError, match="65535") as info:
        parse(f"FROM a\n{long}\nRUN y\n")
    assert info.value.line == 2


def test_line_of_exactly_64k_minus_one_is_accepted() -> None:
    long = "RUN " + "x" * (65535 - 4)
    assert parse(f"FROM a\n{long}\n").instructions[1].args == (long[4:],)


def test_nul_is_rejected() -> None:
    with pytest.raises(DockerfileError, match="NUL") as info:
        parse("FROM a\nRUN a\x00b\n")
    assert info.value.line == 2


def test_empty_file() -> None:
    with pytest.raises(DockerfileError, match="no instructions"):
        parse("# only a comment\n\n")


def test_crlf_and_bom() -> None:
    r = parse("\ufeffFROM a\r\nRUN b \\\r\n  c\r\n")
    assert r.dump() == '(from "a")\n(run "b   c")\n'


def test_100k_lines_parse_fast() -> None:
    parts = ["FROM busybox AS base\n"]
    lines = 1
    i = 0
    while lines < 100_000:
        i += 1
        if i % 3 == 0:
            parts.append(f"RUN echo {i} && \\\n    true\n")
            lines += 2
        elif i % 3 == 1:
            parts.append(f'ENV K{i}=v{i} X="a b"\n')
            lines += 1
        else:
            parts.append(f"COPY --chown=1:1 src{i} /dst/\n")
            lines += 1
    text = "".join(parts)
    result = parse(text)
    # Behaviour only: the time it takes is measured by benchmarks/dockerfile_parse.py,
    # never asserted in a test.
    assert len(result.instructions) == i + 1
