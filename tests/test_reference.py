from __future__ import annotations

import pytest

from ociworker.core.digest import Digest
from ociworker.core.reference import Reference, parse_reference
from ociworker.errors import UserError

D = Digest("sha256:" + "ab" * 32)


@pytest.mark.parametrize(
    ("text", "domain", "path", "tag", "digest"),
    [
        ("busybox", "docker.io", "library/busybox", "latest", None),
        ("library/busybox", "docker.io", "library/busybox", "latest", None),
        ("docker.io/busybox", "docker.io", "library/busybox", "latest", None),
        ("index.docker.io/library/busybox:1", "docker.io", "library/busybox", "1", None),
        ("user/app:1.0", "docker.io", "user/app", "1.0", None),
        ("127.0.0.1:5000/x", "127.0.0.1:5000", "x", "latest", None),
        ("localhost/x", "localhost", "x", "latest", None),
        ("localhost:5000/a/b:v_2-rc.1", "localhost:5000", "a/b", "v_2-rc.1", None),
        ("ghcr.io/o/r/s:t", "ghcr.io", "o/r/s", "t", None),
        ("[::1]:5000/img:v1", "[::1]:5000", "img", "v1", None),
        # Upper case marks a domain: repository names are lower case by grammar.
        ("Foo/bar", "Foo", "bar", "latest", None),
        ("localhost:5000", "docker.io", "library/localhost", "5000", None),
        ("a__b-c---d/e_f.g", "docker.io", "a__b-c---d/e_f.g", "latest", None),
        (f"busybox@{D}", "docker.io", "library/busybox", None, D),
        (f"reg.io:443/x/y:tag@{D}", "reg.io:443", "x/y", "tag", D),
    ],
)
def test_parse_normalizes(
    text: str, domain: str, path: str, tag: str | None, digest: Digest | None
) -> None:
    ref = parse_reference(text)
    assert (ref.domain, ref.path, ref.tag, ref.digest) == (domain, path, tag, digest)
    assert parse_reference(str(ref)) == ref


@pytest.mark.parametrize(
    ("text", "full", "familiar"),
    [
        ("busybox", "docker.io/library/busybox:latest", "busybox:latest"),
        ("user/app:1", "docker.io/user/app:1", "user/app:1"),
        ("docker.io/library/a/b", "docker.io/library/a/b:latest", "library/a/b:latest"),
        ("127.0.0.1:5000/x:t", "127.0.0.1:5000/x:t", "127.0.0.1:5000/x:t"),
        (f"busybox@{D}", f"docker.io/library/busybox@{D}", f"busybox@{D}"),
        (f"busybox:1@{D}", f"docker.io/library/busybox:1@{D}", f"busybox:1@{D}"),
    ],
)
def test_str_and_familiar(text: str, full: str, familiar: str) -> None:
    ref = parse_reference(text)
    assert str(ref) == full
    assert ref.familiar() == familiar


def test_repository_and_api_reference() -> None:
    ref = parse_reference("127.0.0.1:5000/a/b:t")
    assert ref.repository == "127.0.0.1:5000/a/b"
    assert ref.api_reference == "t"
    assert ref.with_digest(D).api_reference == D  # the digest wins over the tag
    assert parse_reference("x", default_tag=False).tag is None


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("", "empty"),
        ("UPPER", "lowercase"),
        ("reg.io/Upper/x", "lowercase"),
        ("a:b:c", "bad repository name"),
        ("x:", "bad tag"),
        ("x:-bad", "bad tag"),
        ("x:" + "t" * 129, "bad tag"),
        ("x@sha256:abc", "bad digest"),
        ("x@sha512:" + "a" * 128, "only sha256"),
        (f"x@{D.upper()}", "only sha256"),
        ("a/../b", "bad repository name"),
        ("a//b", "bad repository name"),
        ("-a.io/x", "bad registry domain"),
        ("a_/b", "bad repository name"),
        ("ab" * 32, "64-byte hexadecimal"),
        ("reg.io/" + "a" * 250, "longer than 255"),
    ],
)
def test_invalid_references(text: str, needle: str) -> None:
    with pytest.raises(UserError, match=needle):
        parse_reference(text)


def test_reference_is_a_hashable_value() -> None:
    assert {parse_reference("busybox"), parse_reference("docker.io/library/busybox:latest")} == {
        Reference("docker.io", "library/busybox", "latest")
    }
