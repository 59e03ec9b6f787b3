"""``build --check``: BuildKit's default lint rules. The expected rule names,
messages and links are copied from BuildKit's build-checks reference
(https://docs.docker.com/reference/build-checks/, one page per rule), never
from the code under test."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from ociworker.frontend.dockerfile.lint import lint, report
from ociworker.frontend.dockerfile.parser import parse


def _found(text: str) -> list[tuple[str, str, int]]:
    return [(w.rule, w.detail, w.line) for w in lint(parse(text))]


def test_clean_dockerfile_has_no_warning() -> None:
    text = 'ARG B=busybox\nFROM $B AS build\nWORKDIR /src\nRUN make\nCMD ["app"]\n'
    assert _found(text) == []
    assert report([], text, "Dockerfile") == "Check complete, no warnings found.\n"


def test_stage_rules() -> None:
    text = "FROM busybox as Builder\nFROM busybox AS builder\nFROM busybox AS scratch\n"
    assert _found(text) == [
        ("FromAsCasing", "'as' and 'FROM' keywords' casing do not match", 1),
        ("StageNameCasing", "Stage name 'Builder' should be lowercase", 1),
        (
            "DuplicateStageName",
            'Duplicate stage name "builder", stage names should be unique',
            2,
        ),
        (
            "ReservedStageName",
            'Stage name should not use the same name as reserved stage "scratch"',
            3,
        ),
    ]


def test_casing_json_maintainer_legacy_and_secrets() -> None:
    text = (
        "FROM busybox\nrun true\nRUN true\nMAINTAINER me\nENV A b\n"
        "ARG GITHUB_TOKEN\nENTRYPOINT my-app\n"
    )
    assert _found(text) == [
        (
            "ConsistentInstructionCasing",
            "Command 'run' should match the case of the command majority (uppercase)",
            2,
        ),
        ("MaintainerDeprecated", "Maintainer instruction is deprecated in favor of using label", 4),
        (
            "LegacyKeyValueFormat",
            '"ENV key=value" should be used instead of legacy "ENV key value" format',
            5,
        ),
        (
            "SecretsUsedInArgOrEnv",
            'Do not use ARG or ENV instructions for sensitive data (ARG "GITHUB_TOKEN")',
            6,
        ),
        (
            "JSONArgsRecommended",
            "JSON arguments recommended for ENTRYPOINT to prevent unintended behavior "
            "related to OS signals",
            7,
        ),
    ]


def test_from_args_workdir_multiple_and_empty_continuation() -> None:
    text = (
        'ARG VERSION=1\nFROM alpine:$VERSION\nFROM $NOPE\nWORKDIR rel\nCMD ["a"]\n'
        'CMD ["b"]\nRUN echo a \\\n\n b\n'
    )
    assert _found(text) == [
        ("UndefinedArgInFrom", "FROM argument 'NOPE' is not declared", 3),
        (
            "WorkdirRelativePath",
            'Relative workdir "rel" can have unexpected results if the base image changes',
            4,
        ),
        (
            "MultipleInstructionsDisallowed",
            "Multiple CMD instructions should not be used in the same stage because only "
            "the last one will be used",
            6,
        ),
        ("NoEmptyContinuation", "Empty continuation line", 7),
    ]


def test_links_are_the_rules_reference_pages() -> None:
    (w,) = lint(parse("FROM busybox\nCMD app\n"))
    assert w.url == "https://docs.docker.com/go/dockerfile/rule/json-args-recommended/"


def test_check_flag_prints_the_report_and_builds_nothing(tmp_path: Path) -> None:
    (tmp_path / "Dockerfile").write_text("FROM busybox as base\nCMD app\n")
    proc = subprocess.run(
        [sys.executable, "-m", "ociworker", "build", "--check", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1, proc.stderr
    assert proc.stdout.startswith("Check complete, 2 warnings have been found!\n")
    assert (
        "WARNING: FromAsCasing - https://docs.docker.com/go/dockerfile/rule/from-as-casing/\n"
        "'as' and 'FROM' keywords' casing do not match\nDockerfile:1\n" in proc.stdout
    )
    assert "   2 | >>> CMD app" in proc.stdout
    (tmp_path / "Dockerfile").write_text('FROM busybox AS base\nCMD ["app"]\n')
    proc = subprocess.run(
        [sys.executable, "-m", "ociworker", "build", "--check", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (proc.returncode, proc.stdout) == (0, "Check complete, no warnings found.\n")


def test_report_is_printed_as_buildx_prints_it() -> None:
    # buildx printResult("lint") + BuildKit lint.Warning.PrintTo + errdefs.Source.Print:
    # a one-line instruction gets up to 2 lines of context each side
    text = "FROM busybox AS b\nRUN a\nRUN b\nCMD app\nRUN c\nRUN d\nRUN e\n"
    want = (
        "Check complete, 1 warning has been found!\n"
        "\n"
        "WARNING: JSONArgsRecommended - "
        "https://docs.docker.com/go/dockerfile/rule/json-args-recommended/\n"
        "JSON arguments recommended for CMD to prevent unintended behavior related to OS "
        "signals\n"
        "Dockerfile:4\n"
        "--------------------\n"
        "   2 |     RUN a\n"
        "   3 |     RUN b\n"
        "   4 | >>> CMD app\n"
        "   5 |     RUN c\n"
        "   6 |     RUN d\n"
        "--------------------\n"
    )
    assert report(lint(parse(text)), text, "Dockerfile") == want
