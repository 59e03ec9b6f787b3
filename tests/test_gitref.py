"""Git URLs read as BuildKit's ``gitutil.ParseGitRef`` reads them (its test
table's cases), and how a URL is shown with its credentials redacted."""

from __future__ import annotations

import pytest

from ociworker.core.gitref import is_git_url, is_remote_context, parse_git_ref, redact
from ociworker.errors import ConfigError, UnsafePathError


@pytest.mark.parametrize(
    ("text", "remote", "ref", "subdir"),
    [
        ("https://example.com/foo.git", "https://example.com/foo.git", "", ""),
        ("https://example.com/foo.git#deadbeef", "https://example.com/foo.git", "deadbeef", ""),
        (
            "https://example.com/foo.git#release/1.2",
            "https://example.com/foo.git",
            "release/1.2",
            "",
        ),
        ("https://example.com/foo.git#:subdir", "https://example.com/foo.git", "", "subdir"),
        ("https://example.com/foo.git#main:a/b", "https://example.com/foo.git", "main", "a/b"),
        ("github.com/moby/buildkit", "https://github.com/moby/buildkit", "", ""),
        ("git@github.com:moby/buildkit.git", "git@github.com:moby/buildkit.git", "", ""),
        ("git@github.com:moby/buildkit#v1", "git@github.com:moby/buildkit", "v1", ""),
        (
            "ssh://git@github.com/moby/buildkit.git",
            "ssh://git@github.com/moby/buildkit.git",
            "",
            "",
        ),
        ("git://github.com/user/repo.git#v1:sub", "git://github.com/user/repo.git", "v1", "sub"),
        ("file:///srv/repo.git#refs/pull/42/head", "file:///srv/repo.git", "refs/pull/42/head", ""),
    ],
)
def test_git_urls_as_buildkit_parses_them(text: str, remote: str, ref: str, subdir: str) -> None:
    got = parse_git_ref(text)
    assert (got.remote, got.ref, got.subdir) == (remote, ref, subdir)
    assert is_git_url(text) and is_remote_context(text)


@pytest.mark.parametrize(
    "text",
    [
        "https://example.com/",  # http(s) without .git: a tarball context, not git
        "https://example.com/ctx.tar.gz",
        "./foo.git",
        "../foo.git",
        "foo",
        "/abs/path/repo.git",
        "s3://bucket/repo.git",
    ],
)
def test_not_git_urls(text: str) -> None:
    assert not is_git_url(text)
    with pytest.raises(ConfigError):
        parse_git_ref(text)


def test_http_urls_are_remote_contexts_even_when_not_git() -> None:
    assert is_remote_context("https://example.com/ctx.tar.gz")
    assert not is_remote_context("ctx")


def test_credentials_are_taken_out_of_the_url_and_never_shown() -> None:
    ref = parse_git_ref("https://user:s3cret@example.com/repo.git#main")
    assert ref.remote == "https://example.com/repo.git"
    assert (ref.username, ref.password) == ("user", "s3cret")
    assert ref.shown == "https://user:xxxxx@example.com/repo.git#main"
    assert "s3cret" not in repr(ref)
    token = parse_git_ref("https://tok3n@example.com/repo.git")
    assert "tok3n" not in token.shown + repr(token)
    # an ssh user is no secret: it stays part of the remote
    assert parse_git_ref("ssh://git@host/r.git").remote == "ssh://git@host/r.git"


def test_redact_hides_passwords_and_given_secrets() -> None:
    text = "fatal: unable to access 'https://u:pw@h/r.git/': and tok-1 too"
    assert (
        redact(text, ["tok-1"])
        == "fatal: unable to access 'https://u:xxxxx@h/r.git/': and xxxxx too"
    )
    assert redact("ssh://git@host/r.git") == "ssh://git@host/r.git"
    # a password with an "@" in it is hidden whole, not up to its first "@"
    assert redact("https://u:p@ss@host/r.git") == "https://u:xxxxx@host/r.git"


@pytest.mark.parametrize("frag", ["#main:..", "#main:../x", "#main:a/../../b"])
def test_subdir_that_climbs_out_is_refused_naming_the_redacted_url(frag: str) -> None:
    with pytest.raises(UnsafePathError, match=r"https://u:xxxxx@h/r\.git.*outside the repository"):
        parse_git_ref("https://u:pw@h/r.git" + frag)


@pytest.mark.parametrize("ref", ["-upload-pack=touch x", "a..b", "a b", "x~1", "@{-1}"])
def test_refs_git_would_refuse_or_read_as_options(ref: str) -> None:
    with pytest.raises(ConfigError, match="invalid git ref"):
        parse_git_ref("https://h/r.git#" + ref)


def test_subdir_is_cleaned() -> None:
    assert parse_git_ref("https://h/r.git#main:/a/./b/").subdir == "a/b"
    assert parse_git_ref("https://h/r.git#main:.").subdir == ""
