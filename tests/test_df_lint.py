"""``build --check``: BuildKit's default lint rules. The expected rule names,
messages and links are copied from BuildKit's build-checks reference
(https://docs.docker.com/reference/build-checks/, one page per rule), never
from the code under test."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from ociworker.errors import DockerfileError
from ociworker.frontend.dockerfile.lint import BaseImage, BaseRef, base_images, lint, report
from ociworker.frontend.dockerfile.parser import parse
from ociworker.fs.ignore import IgnoreMatcher


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
        # $NOPE is empty with the defaults: no image name (BuildKit's
        # validateBaseImagesWithDefaultArgs, before the ARG check)
        (
            "InvalidDefaultArgInFrom",
            "Default value for ARG $NOPE results in empty or invalid base image name",
            3,
        ),
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
            # the earlier CMD: "Report the location of the previous invocation because
            # it is the one that will be ignored" (BuildKit validations.go validateUsedOnce)
            5,
        ),
        ("NoEmptyContinuation", "Empty continuation line", 7),
    ]


def test_links_are_the_rules_reference_pages() -> None:
    (w,) = lint(parse("FROM busybox\nCMD app\n"))
    assert w.url == "https://docs.docker.com/go/dockerfile/rule/json-args-recommended/"


def test_check_flag_prints_the_report_and_builds_nothing(tmp_path: Path) -> None:
    # FROM scratch: no base image to resolve, so no worker and no state dir
    # (integration/test_buildx_flags.py checks the resolving kind)
    (tmp_path / "Dockerfile").write_text("FROM scratch as base\nCMD app\n")
    root = tmp_path / "state"
    proc = subprocess.run(
        [sys.executable, "-m", "ociworker", "build", "--root", str(root), "--check", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1, proc.stderr
    assert not root.exists()
    assert proc.stdout.startswith("Check complete, 2 warnings have been found!\n")
    assert (
        "WARNING: FromAsCasing - https://docs.docker.com/go/dockerfile/rule/from-as-casing/\n"
        "'as' and 'FROM' keywords' casing do not match\nDockerfile:1\n" in proc.stdout
    )
    assert "   2 | >>> CMD app" in proc.stdout
    (tmp_path / "Dockerfile").write_text('FROM scratch AS base\nCMD ["app"]\n')
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


# -- the rules that need the base images, and the newer default rules ------------------
# Expected messages: BuildKit's frontend/dockerfile/linter/ruleset.go and the rule pages
# (frontend/dockerfile/docs/rules/*.md); when each fires: dockerfile2llb/validations.go.

_PY = BaseRef("python", "linux/amd64")
_PYTHON = BaseImage(("PATH=/usr/local/bin:/usr/bin", "PYTHON_VERSION=3.12.4"), "linux/amd64")


def _checked(text: str, **kw: Any) -> list[tuple[str, str, int]]:
    kw.setdefault("platform", "linux/amd64")
    return [(w.rule, w.detail, w.line) for w in lint(parse(text), source=text, **kw)]


def test_undefined_var_follows_the_stage_environment() -> None:
    # the undefined-var.md examples, then BuildKit's suggestion ("did you mean")
    text = (
        "FROM python AS base\n"
        "ARG VERSION=$PYTHON_VERSION\n"  # the base image defines it
        "COPY $foo .\n"  # undefined
        "ARG foo\n"
        "COPY $foo .\n"  # declared (no value): not reported
        "ENV A=$PYTON_VERSION\n"  # a typo of the base's variable
        "RUN echo $nothing\n"  # RUN is left to the shell
        "FROM base AS child\n"
        "COPY $foo $VERSION $A /\n"  # all inherited from the parent stage
        "FROM scratch\n"
        "WORKDIR $PATH\n"  # scratch has PATH
        "USER $who\n"
    )
    want_bases = [_PY]
    assert base_images(parse(text), platform="linux/amd64") == want_bases
    assert _checked(text, bases={_PY: _PYTHON}) == [
        ("UndefinedVar", "Usage of undefined variable '$foo'", 3),
        (
            "UndefinedVar",
            "Usage of undefined variable '$PYTON_VERSION' (did you mean $PYTHON_VERSION?)",
            6,
        ),
        ("UndefinedVar", "Usage of undefined variable '$who'", 12),
    ]
    # an unresolved base hides its variables: nothing is reported for its stages
    assert _checked(text) == [("UndefinedVar", "Usage of undefined variable '$who'", 12)]


def test_undefined_var_in_copy_flags_mounts_and_heredocs() -> None:
    text = (
        "FROM scratch\n"
        "COPY --chown=$owner a /a\n"
        "RUN --mount=type=cache,target=$cachedir true\n"
        "COPY <<EOF /x\n$inbody\nEOF\n"
        "COPY <<'EOF' /y\n$quoted\nEOF\n"
        'ENV K="$PATH" K2=$K\n'  # $K is not set yet when the line expands
    )
    assert _checked(text) == [
        ("UndefinedVar", "Usage of undefined variable '$owner'", 2),
        ("UndefinedVar", "Usage of undefined variable '$cachedir'", 3),
        ("UndefinedVar", "Usage of undefined variable '$inbody'", 4),
        ("UndefinedVar", "Usage of undefined variable '$K'", 10),
    ]


def test_invalid_base_image_platform_has_no_link() -> None:
    text = "FROM python\nFROM --platform=$BUILDPLATFORM python AS b\n"
    s390x = BaseImage(_PYTHON.env, "linux/s390x")
    bases = {_PY: s390x}
    warnings = lint(parse(text), bases, platform="linux/amd64")
    msg = (
        'Base image python was pulled with platform "linux/s390x", expected "linux/amd64" '
        "for current build"
    )
    assert [(w.rule, w.detail, w.line) for w in warnings] == [
        ("InvalidBaseImagePlatform", msg, 1),
        ("InvalidBaseImagePlatform", msg, 2),
    ]
    # ruleset.go gives the rule no URL: lint.Warning.PrintTo prints the name alone
    assert f"\nWARNING: InvalidBaseImagePlatform\n{msg}\nDockerfile:1\n" in report(
        warnings, text, "Dockerfile"
    )
    # the image's own platform: nothing; an image without layers is scratch to BuildKit
    assert _checked(text, bases={_PY: _PYTHON}) == []
    assert _checked(text, bases={_PY: BaseImage((), "linux/s390x", layers=False)}) == []


def test_invalid_default_arg_in_from() -> None:
    # the invalid-default-arg-in-from.md examples: one bad, three good
    assert _checked("ARG TAG\nFROM busybox:${TAG}\n") == [
        (
            "InvalidDefaultArgInFrom",
            "Default value for ARG busybox:${TAG} results in empty or invalid base image name",
            2,
        )
    ]
    for good in (
        "ARG TAG=latest\nFROM busybox:${TAG}\n",
        "ARG VARIANT\nFROM busybox:stable${VARIANT}\n",
        "ARG TAG\nFROM alpine:${TAG:-3.14}\n",
    ):
        assert _checked(good) == [], good


def test_expose_rules() -> None:
    text = "FROM scratch\nEXPOSE 80/TcP\nEXPOSE 127.0.0.1:80:80\nEXPOSE 80:80\nEXPOSE 80/tcp 81\n"
    bad_format = "EXPOSE instruction should not define an IP address or host-port mapping"
    assert _checked(text) == [
        (
            "ExposeProtoCasing",
            "Defined protocol '80/TcP' in EXPOSE instruction should be lowercase",
            2,
        ),
        ("ExposeInvalidFormat", f"{bad_format}, found '127.0.0.1:80:80'", 3),
        ("ExposeInvalidFormat", f"{bad_format}, found '80:80'", 4),
    ]


def test_copy_ignored_file_and_secret_allow_list() -> None:
    text = (
        "FROM scratch\n"
        "COPY ./tmp/helloworld.txt /helloworld.txt\n"
        "COPY ./forever/helloworld.txt /helloworld.txt\n"
        "ADD tmp/x /x\n"
        "COPY --from=other tmp/y /y\n"  # not the context
        "ARG PUBLIC_KEY\n"  # "public" marks it as no secret (secretsAllowRegexp)
        "ARG API_KEY\n"
    )
    assert _checked(text, ignore=IgnoreMatcher(["tmp"])) == [
        (
            "CopyIgnoredFile",
            'Attempting to Copy file "tmp/helloworld.txt" that is excluded by .dockerignore',
            2,
        ),
        ("CopyIgnoredFile", 'Attempting to Add file "tmp/x" that is excluded by .dockerignore', 4),
        (
            "SecretsUsedInArgOrEnv",
            'Do not use ARG or ENV instructions for sensitive data (ARG "API_KEY")',
            7,
        ),
    ]
    # an exception in the file: BuildKit does not try to decide
    assert [r for r, _, _ in _checked(text, ignore=IgnoreMatcher(["tmp", "!tmp/x"]))] == [
        "SecretsUsedInArgOrEnv"
    ]


def test_check_directive_and_build_arg_skip_rules() -> None:
    # BuildKit's dockerfile_check_test.go (testLintSkip...): the build arg
    # BUILDKIT_DOCKERFILE_CHECK replaces the "# check=" directive
    text = "#check=skip=all\nFROM scratch as base\ncopy Dockerfile .\n"
    assert _checked(text) == []
    args = {"BUILDKIT_DOCKERFILE_CHECK": "skip=ConsistentInstructionCasing;error=true"}
    assert _checked(text, build_args=args) == [
        ("FromAsCasing", "'as' and 'FROM' keywords' casing do not match", 2)
    ]
    text = "#check=error=true\nFROM scratch as base\ncopy Dockerfile .\n"
    assert _checked(text, build_args={"BUILDKIT_DOCKERFILE_CHECK": "skip=all"}) == []
    assert [r for r, _, _ in _checked(text)] == ["FromAsCasing", "ConsistentInstructionCasing"]
    with pytest.raises(DockerfileError, match="invalid check option"):
        _checked("#check=nope=1\nFROM scratch\n")


# -- cases of BuildKit's own frontend/dockerfile/dockerfile_check_test.go --------------
# (its Dockerfiles and expected rule/detail/line; "alpine" stands for a base image
# whose config sets PATH only, as the test's alpine does)

_ALPINE = BaseRef("alpine", "linux/amd64")
_ALPINE_IMG = BaseImage(
    ("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",), "linux/amd64"
)


def _bk(text: str, **kw: Any) -> list[tuple[str, str, int]]:
    return _checked(text, bases={_ALPINE: _ALPINE_IMG}, **kw)


def test_buildkit_unmatched_vars() -> None:
    assert _bk("\nFROM scratch\nARG foo\nCOPY Dockerfile${foo} .\n") == []
    assert _bk("\nFROM alpine AS base\nARG foo=Dockerfile\n\nFROM base\nCOPY $foo .\n") == []
    assert _bk("\nFROM alpine\nRUN echo $PATH\n") == []
    assert _bk("\nFROM alpine\nCOPY $foo .\nARG foo=bar\nRUN echo $foo\n") == [
        ("UndefinedVar", "Usage of undefined variable '$foo'", 3)
    ]
    text = (
        "\nFROM alpine\nARG DIR_BINARIES=binaries/\nARG DIR_ASSETS=assets/\n"
        "ARG DIR_CONFIG=config/\nCOPY $DIR_ASSET .\n\t"
    )
    assert _bk(text) == [
        ("UndefinedVar", "Usage of undefined variable '$DIR_ASSET' (did you mean $DIR_ASSETS?)", 6)
    ]
    assert _bk("\nFROM alpine\nENV PATH=$PAHT:/tmp/bin\n\t\t") == [
        ("UndefinedVar", "Usage of undefined variable '$PAHT' (did you mean $PATH?)", 3)
    ]


def test_buildkit_multiple_instructions_and_workdir() -> None:
    multiple = (
        "Multiple {} instructions should not be used in the same stage because only the "
        "last one will be used"
    )
    text = (
        '\nFROM scratch\nENTRYPOINT ["/myapp"]\nENTRYPOINT ["/myotherapp"]\nCMD ["/myapp"]\n'
        'CMD ["/myotherapp"]\nHEALTHCHECK CMD ["/myapp"]\nHEALTHCHECK CMD ["/myotherapp"]\n'
    )
    assert _bk(text) == [
        ("MultipleInstructionsDisallowed", multiple.format("ENTRYPOINT"), 3),
        ("MultipleInstructionsDisallowed", multiple.format("CMD"), 5),
        ("MultipleInstructionsDisallowed", multiple.format("HEALTHCHECK"), 7),
    ]
    text = (
        '\nFROM scratch AS a\nENTRYPOINT ["/myapp"]\nCMD ["/myapp"]\nHEALTHCHECK CMD ["/myapp"]\n'
        '\nFROM a AS b\nENTRYPOINT ["/myotherapp"]\nCMD ["/myotherapp"]\n'
        'HEALTHCHECK CMD ["/myotherapp"]\n'
    )
    assert _bk(text) == []
    assert _bk("\nFROM scratch\nWORKDIR app/\n") == [
        (
            "WorkdirRelativePath",
            'Relative workdir "app/" can have unexpected results if the base image changes',
            3,
        )
    ]
    assert _bk("\nFROM scratch AS a\nWORKDIR /app\n\nFROM a AS b\nWORKDIR subdir/\n") == []


def test_buildkit_copy_ignored_files() -> None:
    text = "\nFROM scratch\nCOPY Dockerfile .\nADD Dockerfile /windy\n"
    assert _bk(text, ignore=IgnoreMatcher(["Dockerfile"])) == [
        (
            "CopyIgnoredFile",
            'Attempting to Copy file "Dockerfile" that is excluded by .dockerignore',
            3,
        ),
        (
            "CopyIgnoredFile",
            'Attempting to Add file "Dockerfile" that is excluded by .dockerignore',
            4,
        ),
    ]
    text = (
        "\nFROM scratch AS base\nCOPY Dockerfile /foobar\nADD Dockerfile /windy\n\n"
        "FROM base\nCOPY --from=base /foobar /Dockerfile\n"
    )
    assert _bk(text, ignore=IgnoreMatcher(["foobar"])) == []
    exceptions = IgnoreMatcher(["**", "!Dockerfile"])
    assert _bk("\nFROM scratch\nCOPY ./Dockerfile .\n", ignore=exceptions) == []
    assert _bk("\nFROM scratch\nCOPY . .\n\t", ignore=exceptions) == []
    assert _bk("\nFROM scratch\nCOPY . .\n", ignore=IgnoreMatcher([".*"])) == []
    assert _bk("\nFROM scratch\nCOPY . .\n", ignore=IgnoreMatcher(["*"])) == [
        ("CopyIgnoredFile", 'Attempting to Copy file "." that is excluded by .dockerignore', 3)
    ]


def test_buildkit_undeclared_arg() -> None:
    for good in (
        "\nARG base=scratch\nFROM $base\nCOPY Dockerfile .\n",
        "\nARG BUILDPLATFORM=linux/amd64\nFROM --platform=$BUILDPLATFORM scratch\n"
        "COPY Dockerfile .\n",
        "\nFROM --platform=$BUILDPLATFORM scratch\nCOPY Dockerfile .\n",
        "\nARG DEBUG\nFROM scratch${DEBUG}\nCOPY Dockerfile .\n",
        "\nARG DEBUG\nFROM scra${DEBUG:-tch}\nCOPY Dockerfile .\n",
        '\nARG DEBUG=""\nFROM scratch${DEBUG-@bogus}\nCOPY Dockerfile .\n',
    ):
        assert _bk(good) == [], good
    assert _bk("\nFROM --platform=$BULIDPLATFORM scratch\nCOPY Dockerfile .\n") == [
        (
            "UndefinedArgInFrom",
            "FROM argument 'BULIDPLATFORM' is not declared (did you mean BUILDPLATFORM?)",
            2,
        )
    ]
    text = (
        "\nARG MY_OS=linux\nARG MY_ARCH=amd64\nFROM --platform=linux/${MYARCH} busybox\n"
        "COPY Dockerfile .\n\t"
    )
    assert _bk(text) == [
        ("UndefinedArgInFrom", "FROM argument 'MYARCH' is not declared (did you mean MY_ARCH?)", 4)
    ]
    assert _bk("\nARG tag=latest\nFROM busybox:${tag}${version} AS b\nCOPY Dockerfile .\n") == [
        ("UndefinedArgInFrom", "FROM argument 'version' is not declared", 3)
    ]


def test_buildkit_secrets_and_check_comments() -> None:
    text = """# check=skip=InvalidDefinitionDescription

FROM scratch
ARG SECRET_PASSPHRASE
ENV SUPER_Secret=foo
ENV password=bar secret=baz
ARG super_duper_secret_token=foo auth=bar
ENV apikey=bar sunflower=foo
ENV git_key=
ENV PUBLIC_KEY=
ARG public_token
ARG SECRET_PASSPHRASE_FILE
ENV password_file=bar secret_File=baz
ARG AUTH_MODULE_VERSION
# check=skip=SecretsUsedInArgOrEnv // allow secret in environment
ENV password=bar
# check=skip=SecretsUsedInArgOrEnv // allow secret in arg
ARG password
# check=skip=all // is local to only this instruction
ENV alternate_password=bar
# check=skip=all // is local to only this instruction
ARG alternate_password
"""
    secret = "Do not use ARG or ENV instructions for sensitive data ({})"
    found = _bk(text)
    # BuildKit's test lists same-line warnings sorted by detail
    assert sorted(found, key=lambda f: (f[2], f[1])) == [
        ("SecretsUsedInArgOrEnv", secret.format(d), line)
        for d, line in [
            ('ARG "SECRET_PASSPHRASE"', 4),
            ('ENV "SUPER_Secret"', 5),
            ('ENV "password"', 6),
            ('ENV "secret"', 6),
            ('ARG "auth"', 7),
            ('ARG "super_duper_secret_token"', 7),
            ('ENV "apikey"', 8),
            ('ENV "git_key"', 9),
        ]
    ]
    # a comment above an instruction skips its rules there only (testWorkdirRelativePath)
    assert _bk("\nFROM scratch\n# check=skip=WorkdirRelativePath\nWORKDIR app/\n") == []
    assert [r for r, _, _ in _bk("\nFROM scratch\n# check=skip=all\n#\nWORKDIR app/\n")] == [
        "WorkdirRelativePath"
    ]
