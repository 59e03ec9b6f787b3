"""ADD URL and --build-context, the pure parts: how the frontend turns them into
steps, how values are parsed, how credentials are masked; and the HTTP fetcher
against an in-process transport (conditional requests, checksum, errors)."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

import httpx
import pytest

from ociworker.content.store import ContentStore
from ociworker.core.build import NamedContext
from ociworker.core.filemode import apply_symbolic_mode, is_symbolic_mode
from ociworker.core.gitref import redact
from ociworker.core.graph import Copy, FileOp, HttpSourceOp, SourceOp
from ociworker.errors import ConfigError, DigestMismatchError, UserError
from ociworker.frontend.dockerfile.convert import ImageInfo, Options, convert
from ociworker.frontend.dockerfile.parser import parse
from ociworker.sources.http import HttpFetcher, disposition_filename

BASE = ImageInfo(
    ref="docker.io/library/busybox@sha256:" + "a" * 64,
    config={"config": {}, "rootfs": {"type": "layers", "diff_ids": ["sha256:" + "b" * 64]}},
)


def _plan(text: str, **opts: object):  # type: ignore[no-untyped-def]
    return convert(parse(text), Options(**opts), {"busybox": BASE})  # type: ignore[arg-type]


def test_redact_masks_passwords_and_lone_users() -> None:
    assert redact("https://u:pw@h/p?q") == "https://u:xxxxx@h/p?q"
    assert redact("https://tok@h/p") == "https://xxxxx@h/p"
    assert redact("https://h/p@x") == "https://h/p@x"  # an @ in the path is no userinfo


def test_add_url_is_an_http_source_copied_into_place() -> None:
    plan = _plan(
        "FROM busybox\nADD --chmod=0755 https://alice:pw@example.com/dl/tool.tgz /usr/bin/\n"
    )
    v = plan.target
    assert v is not None and isinstance(v.op, FileOp)
    (c,) = v.op.actions
    assert isinstance(c, Copy) and not c.unpack_archive and c.chmod == 0o755
    src = v.inputs[c.src_input]
    assert src is not None and src.op == HttpSourceOp(
        "https://alice:pw@example.com/dl/tool.tgz", "", "tool.tgz"
    )
    assert c.src == "/tool.tgz" and c.dest == "/usr/bin/"
    # the credential is in no name and no history entry
    assert "pw@" not in v.name and "pw@" not in (src.name or "")
    assert all("pw@" not in h.get("created_by", "") for h in plan.config["history"])


def test_add_url_checksum_rules() -> None:
    good = "sha256:" + "c" * 64
    plan = _plan(f"FROM busybox\nADD --checksum={good} https://h/f /f\n")
    assert plan.target is not None
    (src,) = [i for i in plan.target.inputs if i is not None and isinstance(i.op, HttpSourceOp)]
    assert isinstance(src.op, HttpSourceOp) and src.op.checksum == good
    with pytest.raises(UserError, match="invalid checksum digest format"):
        _plan("FROM busybox\nADD --checksum=md5:00 https://h/f /f\n")
    with pytest.raises(UserError, match="checksum requires HTTP"):
        _plan(f"FROM busybox\nADD --checksum={good} f /f\n")
    # a git URL is a git source, never downloaded as a file
    plan = _plan("FROM busybox\nADD https://github.com/x/y.git /src\n")
    assert plan.target is not None
    kinds = [type(v.op).__name__ for v in plan.target.walk()]  # type: ignore[union-attr]
    assert "HttpSourceOp" not in kinds
    assert any(
        isinstance(v.op, SourceOp) and v.op.identifier.startswith("git://")
        for v in plan.target.walk()  # type: ignore[union-attr]
    )


def test_named_contexts_parse() -> None:
    assert NamedContext.parse("a=docker-image://alpine:3") == NamedContext(
        "a", "docker-image", "alpine:3"
    )
    assert NamedContext.parse("a=oci-layout:///l") == NamedContext(
        "a", "oci-layout", "/l", "latest"
    )
    assert NamedContext.parse("a=oci-layout:///l:v1") == NamedContext("a", "oci-layout", "/l", "v1")
    d = "sha256:" + "d" * 64
    assert NamedContext.parse(f"a=oci-layout:///l@{d}") == NamedContext("a", "oci-layout", "/l", d)
    assert NamedContext.parse("a=https://h/r.git#main").kind == "git"
    assert NamedContext.parse("a=https://h/file").kind == "url"
    assert NamedContext.parse("a=./dir").kind == "local"
    for bad in ("noequals", "=x", "a=ftp://h/x", "a=oci-layout:///l@sha256:zz"):
        with pytest.raises(ConfigError):
            NamedContext.parse(bad)


def test_named_context_replaces_image_and_stage() -> None:
    text = (
        "FROM busybox AS base\nRUN true\nFROM alpine\nCOPY --from=base /x /x\n"
        "RUN --mount=from=extra,target=/m true\n"
    )
    ncs = {
        "alpine": NamedContext("alpine", "docker-image", "busybox"),
        "base": NamedContext("base", "local", "/somewhere"),
        "extra": NamedContext("extra", "url", "https://h/f.txt"),
    }
    plan = _plan(text, named_contexts=ncs)
    assert plan.missing == ()
    ids = {
        v.op.identifier if isinstance(v.op, SourceOp) else v.op.to_json().get("http", {}).get("url")
        for v in plan.target.walk()  # type: ignore[union-attr]
        if isinstance(v.op, SourceOp | HttpSourceOp)
    }
    # alpine -> the busybox image; the "base" stage -> the dir (its RUN gone)
    assert ids == {"docker-image://" + BASE.ref, "local://named:base", "https://h/f.txt"}
    # a git context is the repository's tree, fetched by the git source
    plan = _plan(text, named_contexts={"alpine": NamedContext("alpine", "git", "git@h:r.git#v1")})
    gits = [
        v.op.identifier
        for v in plan.target.walk()  # type: ignore[union-attr]
        if isinstance(v.op, SourceOp) and v.op.identifier.startswith("git://")
    ]
    assert gits and all("h" in g and "r.git" in g and "v1" in g for g in gits), gits


def test_symbolic_modes() -> None:
    assert apply_symbolic_mode("u+x,g-w", 0o664, False) == 0o744
    assert apply_symbolic_mode("a+X", 0o644, False) == 0o644
    assert apply_symbolic_mode("a+X", 0o644, True) == 0o755
    assert apply_symbolic_mode("go=", 0o777, False) == 0o700
    assert apply_symbolic_mode("+t", 0o755, True) == 0o1755
    assert is_symbolic_mode("u=rwx,go=rx") and not is_symbolic_mode("u+q")


def test_content_disposition_names() -> None:
    assert disposition_filename('attachment; filename="a b.txt"') == "a b.txt"
    assert disposition_filename("attachment; filename=../../etc/passwd") == "passwd"
    assert disposition_filename("inline") == ""


def test_fetcher_conditional_requests_and_errors(tmp_path: Path) -> None:
    body = {"v": b"one\n"}
    seen: list[tuple[str, str]] = []

    def handler(req: httpx.Request) -> httpx.Response:
        seen.append((req.url.path, req.headers.get("if-none-match", "")))
        if req.url.path == "/missing":
            return httpx.Response(404)
        etag = '"' + hashlib.sha256(body["v"]).hexdigest()[:8] + '"'
        if req.headers.get("if-none-match") == etag:
            return httpx.Response(304, headers={"ETag": etag})
        return httpx.Response(200, content=body["v"], headers={"ETag": etag})

    store = ContentStore(tmp_path / "content")
    fetcher = HttpFetcher(store, tmp_path / "http", httpx.MockTransport(handler))
    url = "http://u:secret@h/f.txt"

    first = asyncio.run(fetcher.fetch(url, "f.txt"))
    assert store.read(first.digest) == b"one\n" and not first.not_modified
    again = asyncio.run(fetcher.fetch(url, "f.txt"))
    assert again.digest == first.digest and again.not_modified
    assert seen[-1][1] != ""  # the second asked with If-None-Match
    body["v"] = b"two\n"
    changed = asyncio.run(fetcher.fetch(url, "f.txt"))
    assert store.read(changed.digest) == b"two\n"

    want = "sha256:" + hashlib.sha256(b"other").hexdigest()
    with pytest.raises(DigestMismatchError) as mm:
        asyncio.run(fetcher.fetch(url, "f.txt", checksum=want))
    assert str(mm.value) == (
        f"digest mismatch for http://u:xxxxx@h/f.txt: {changed.digest} (expected: {want})"
    )
    with pytest.raises(UserError) as nf:
        asyncio.run(fetcher.fetch("http://u:secret@h/missing"))
    assert "http://u:xxxxx@h/missing: invalid response status 404" in str(nf.value)
    assert all(b"secret" not in p.read_bytes() for p in (tmp_path / "http").iterdir())
