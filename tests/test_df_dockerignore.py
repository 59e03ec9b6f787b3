""".dockerignore parsing and matching (moby/patternmatcher semantics)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ociworker.errors import DockerfileError
from ociworker.fs.ignore import IgnoreMatcher, parse_ignore
from ociworker.session.context import read_ignore_file


def test_parse_ignore_normalises() -> None:
    text = (
        "\ufeff# comment\n"
        "\n"
        "   \n"
        "  spaced  \n"
        " # not a comment once indented\n"
        "/abs\n"
        "./rel/../x\n"
        "dir/\n"
        "! keep\n"
        "!/rooted\n"
        "/\n"
    )
    assert parse_ignore(text) == (
        "spaced",
        "# not a comment once indented",
        "abs",
        "x",
        "dir",
        "!keep",
        "!rooted",
        "/",
    )


@pytest.mark.parametrize(
    ("patterns", "path", "excluded"),
    [
        # last match wins, exceptions re-include
        (["*.md", "!README.md"], "notes.md", True),
        (["*.md", "!README.md"], "README.md", False),
        (["*.md", "!README.md"], "docs/notes.md", False),  # * stays in one element
        (["!README.md", "*.md"], "README.md", True),
        # ** spans directories, also zero of them
        (["**/*.go"], "main.go", True),
        (["**/*.go"], "a/b/c.go", True),
        (["**/*.go"], "a/b/c.gox", False),
        (["a/**/z"], "a/z", True),
        (["a/**/z"], "a/b/c/z", True),
        (["**"], "anything/at/all", True),
        (["**/node_modules"], "node_modules", True),
        (["**/node_modules"], "x/node_modules/y", True),
        (["**/node_modules"], "x/my_node_modules", False),
        (["build/**"], "build/out.o", True),
        (["build/**"], "build", False),
        # excluded directories take their contents along
        (["dir"], "dir/sub/file", True),
        (["dir", "!dir/keep"], "dir/keep", False),
        (["dir", "!dir/keep"], "dir/keep/inner", False),
        (["dir", "!dir/keep"], "dir/other", True),
        # ? and classes never match "/"
        (["?.txt"], "a.txt", True),
        (["?.txt"], "ab.txt", False),
        (["[a-c]*"], "beta", True),
        (["[a-c]*"], "delta", False),
        (["[^a-c]*"], "delta", True),
        (["a?b"], "a/b", False),
        # escapes and regex metacharacters are literal
        (["\\*.txt"], "*.txt", True),
        (["\\*.txt"], "a.txt", False),
        (["a+b(c).txt"], "a+b(c).txt", True),
        (["a.b"], "axb", False),
        # leading slash and ./ are stripped (via parse_ignore)
        (list(parse_ignore("/abs\n")), "abs/f", True),
        (list(parse_ignore("./x/../y\n")), "y", True),
    ],
)
def test_excluded(patterns: list[str], path: str, excluded: bool) -> None:
    assert IgnoreMatcher(patterns).excluded(path) is excluded


def test_path_forms_are_normalised() -> None:
    m = IgnoreMatcher(["a/b"])
    assert m.excluded("./a/b")
    assert m.excluded("/a/b/")
    assert not m.excluded(".")


def test_can_skip_dir() -> None:
    m = IgnoreMatcher(["dir", "!dir/keep", "other", "logs"])
    assert not m.can_skip_dir("dir")  # an exception reaches inside
    assert m.can_skip_dir("other")
    assert not m.can_skip_dir("src")  # not excluded at all

    wild = IgnoreMatcher(["vendor", "!**/*.go"])
    assert wild.excluded("vendor/x.txt")
    assert not wild.excluded("vendor/x.go")
    assert not wild.can_skip_dir("vendor")

    plain = IgnoreMatcher(["vendor"])
    assert plain.can_skip_dir("vendor")
    assert plain.can_skip_dir("vendor/deep")


def test_can_skip_dir_is_never_wrong() -> None:
    # exhaustive check on a small tree: when a dir may be skipped, nothing
    # below it may be included
    patterns = ["a", "!a/b/c", "x/*", "!x/y*", "**/tmp", "!**/tmp/keep"]
    m = IgnoreMatcher(patterns)
    names = ["a", "b", "c", "x", "y", "yz", "tmp", "keep"]
    paths = [f"{p}/{q}/{r}" for p in names for q in names for r in names]
    for path in paths:
        parts = path.split("/")
        for depth in (1, 2):
            d = "/".join(parts[:depth])
            if m.can_skip_dir(d):
                assert m.excluded(path), (d, path)


@pytest.mark.parametrize("bad", ["[", "a[b", "x\\", "[]", "!", "[?-/]", "[b-a]"])
def test_invalid_patterns(bad: str) -> None:
    with pytest.raises(DockerfileError):
        IgnoreMatcher([bad])


def test_read_ignore_file_prefers_dockerfile_specific(tmp_path: Path) -> None:
    (tmp_path / ".dockerignore").write_text("generic\n")
    sub = tmp_path / "build"
    sub.mkdir()
    (sub / "app.Dockerfile").write_text("FROM a\n")
    (sub / "app.Dockerfile.dockerignore").write_text("# c\nspecific\n")

    assert read_ignore_file(tmp_path, Path("build/app.Dockerfile")) == ("specific",)
    assert read_ignore_file(tmp_path, sub / "app.Dockerfile") == ("specific",)
    assert read_ignore_file(tmp_path, Path("Dockerfile")) == ("generic",)
    assert read_ignore_file(tmp_path, None) == ("generic",)


def test_read_ignore_file_missing(tmp_path: Path) -> None:
    assert read_ignore_file(tmp_path, None) == ()
