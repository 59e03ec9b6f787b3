"""Build contexts from a tarball: an http(s) URL (``ociworker build URL``) the
worker fetches, and ``-`` (a tar, or a lone Dockerfile, on stdin) as ``docker
build -`` reads it."""

from __future__ import annotations

import bz2
import gzip
import io
import json
import lzma
import os
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import assert_lists_steps, buildkit_steps
from gitserve import GitHTTPServer
from ociworker.testing.daemon import spawn_daemon
from test_add_http import (
    FileServer,
    server,  # noqa: F401  (the counting file server, a fixture)
)
from test_build import ow

FILES = {"a.txt": b"alpha\n", "dir/b.txt": b"beta\n", "dir/deep/c.bin": bytes(range(256))}


def _tar(files: dict[str, bytes], *, extra: list[tarfile.TarInfo] | None = None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            tf.addfile(info, io.BytesIO(data))
        for info in extra or []:
            tf.addfile(info, io.BytesIO(b"x" * info.size))
    return buf.getvalue()


COMPRESS = {
    "tar": lambda b: b,
    "tar.gz": gzip.compress,
    "tar.bz2": bz2.compress,
    "tar.xz": lzma.compress,
}


@pytest.fixture
def http(tmp_path: Path) -> Iterator[GitHTTPServer]:
    git_http = GitHTTPServer(tmp_path)
    yield git_http
    git_http.close()


def _context_files(base_image: str) -> dict[str, bytes]:
    return {"Dockerfile": f"FROM {base_image}\nCOPY . /ctx\n".encode(), **FILES}


def _tree(root: Path) -> dict[str, bytes]:
    return {
        str(Path(d, f).relative_to(root)): Path(d, f).read_bytes()
        for d, _, files in os.walk(root)
        for f in files
    }


@pytest.mark.parametrize("kind", list(COMPRESS))
def test_tarball_url_context_builds_its_files(
    kind: str, http: GitHTTPServer, tmp_path: Path, base_image: str, require_root: None
) -> None:
    files = _context_files(base_image)
    http.files[f"ctx.{kind}"] = COMPRESS[kind](_tar(files))
    out = tmp_path / "out"
    ow(
        tmp_path / "root",
        "build",
        "--progress=plain",
        "-o",
        f"type=local,dest={out}",
        http.url(f"files/ctx.{kind}"),
    )
    assert _tree(out / "ctx") == files


def test_url_to_a_dockerfile_builds_with_an_empty_context(
    http: GitHTTPServer, tmp_path: Path, base_image: str, require_root: None
) -> None:
    http.files["Dockerfile"] = f"FROM {base_image}\nCOPY . /ctx\nRUN echo hi > /hi\n".encode()
    out = tmp_path / "out"
    ow(tmp_path / "root", "build", "-o", f"type=local,dest={out}", http.url("files/Dockerfile"))
    assert (out / "hi").read_text() == "hi\n"
    assert list((out / "ctx").iterdir()) == []


def test_missing_url_and_escaping_tar_fail_clearly(
    http: GitHTTPServer, tmp_path: Path, base_image: str, require_root: None
) -> None:
    missing = ow(tmp_path / "root", "build", http.url("files/nope.tar"), check=False)
    assert missing.returncode != 0
    assert http.url("files/nope.tar") in missing.stderr and "404" in missing.stderr
    assert "Traceback" not in missing.stderr

    evil = tarfile.TarInfo("../../escaped.txt")
    evil.size = 3
    http.files["evil.tar.gz"] = gzip.compress(_tar(_context_files(base_image), extra=[evil]))
    proc = ow(tmp_path / "root", "build", http.url("files/evil.tar.gz"), check=False)
    assert proc.returncode != 0
    assert "outside the extraction root" in proc.stderr, proc.stderr
    assert http.url("files/evil.tar.gz") in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not list(tmp_path.rglob("escaped.txt"))


def _stdin_build(
    root: Path | None, data: bytes, *args: str, cwd: Path
) -> subprocess.CompletedProcess[bytes]:
    where = ["--root", str(root)] if root is not None else []
    return subprocess.run(
        [sys.executable, "-m", "ociworker", "build", *where, *args, "-"],
        input=data,
        capture_output=True,
        cwd=cwd,
        timeout=600,
    )


def test_stdin_tar_and_stdin_dockerfile(
    tmp_path: Path, base_image: str, require_root: None
) -> None:
    files = _context_files(base_image)
    out = tmp_path / "out"
    done = _stdin_build(
        tmp_path / "root", gzip.compress(_tar(files)), "-o", f"type=local,dest={out}", cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr.decode()
    assert _tree(out / "ctx") == files

    out2 = tmp_path / "out2"
    dockerfile = f"FROM {base_image}\nCOPY . /ctx\nRUN echo from-stdin > /s\n".encode()
    done = _stdin_build(
        tmp_path / "root", dockerfile, "-o", f"type=local,dest={out2}", cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr.decode()
    assert (out2 / "s").read_text() == "from-stdin\n"
    assert list((out2 / "ctx").iterdir()) == []

    evil = tarfile.TarInfo("../escaped.txt")
    evil.size = 3
    bad = _stdin_build(tmp_path / "root", _tar(files, extra=[evil]), cwd=tmp_path)
    assert bad.returncode != 0
    assert b"outside the extraction root" in bad.stderr and b"Traceback" not in bad.stderr
    assert not list(tmp_path.rglob("escaped.txt"))

    both = _stdin_build(tmp_path / "root", dockerfile, "-f", "-", cwd=tmp_path)
    assert both.returncode != 0
    assert b"can't use stdin for both build context and dockerfile" in both.stderr


def test_daemon_fetches_a_tarball_url_and_takes_a_stdin_tar(
    http: GitHTTPServer, tmp_path: Path, base_image: str, require_root: None
) -> None:
    files = _context_files(base_image)
    http.files["ctx.tar.gz"] = gzip.compress(_tar(files))
    sock = tmp_path / "d.sock"
    proc = spawn_daemon(
        ["--addr", f"unix://{sock}", "--root", str(tmp_path / "droot")], tmp_path / "daemon.log"
    )
    try:
        meta = tmp_path / "meta.json"
        out = tmp_path / "out"
        done = subprocess.run(
            [
                *(sys.executable, "-m", "ociworker", "build", "--addr", f"unix://{sock}"),
                *("--metadata-file", str(meta), "-o", f"type=local,dest={out}"),
                http.url("files/ctx.tar.gz"),
            ],
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert done.returncode == 0, done.stderr
        assert _tree(out / "ctx") == files
        assert json.loads(meta.read_text())["ociworker.context.bytes_sent"] == 0

        out2 = tmp_path / "out2"
        sent = _stdin_build(
            None,
            _tar(files),
            "--addr",
            f"unix://{sock}",
            "-o",
            f"type=local,dest={out2}",
            cwd=tmp_path,
        )
        assert sent.returncode == 0, sent.stderr.decode()
        assert _tree(out2 / "ctx") == files
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def test_tarball_url_rebuild_asks_conditionally_and_is_all_cached(
    server: FileServer,  # noqa: F811  (the fixture imported above)
    tmp_path: Path,
    base_image: str,
    require_root: None,
) -> None:
    """As ADD URL: the first build records the ETag; the rebuild sends
    If-None-Match, the server answers 304 with no body, and every step is
    CACHED; a changed tarball is downloaded again and re-runs what it reaches."""
    files = {
        **_context_files(base_image),
        "Dockerfile": (f"FROM {base_image}\nCOPY . /ctx\nRUN cat /ctx/a.txt > /a.run\n").encode(),
    }
    server.put("/ctx.tar.gz", gzip.compress(_tar(files), mtime=0))
    url = server.url("/ctx.tar.gz")
    root = tmp_path / "root"
    first = ow(root, "build", "--progress=plain", "-o", f"type=local,dest={tmp_path / 'one'}", url)
    assert _tree(tmp_path / "one" / "ctx") == files
    assert [e[2] for e in server.log] == [200]
    assert "DONE" in first.stderr

    server.log.clear()
    again = ow(root, "build", "--progress=plain", "-o", f"type=local,dest={tmp_path / 'two'}", url)
    # one conditional request, naming the ETag the server gave, answered 304
    assert server.log == [("GET", "/ctx.tar.gz", 304, server.files["/ctx.tar.gz"].etag)]
    assert_lists_steps(again.stderr, buildkit_steps(files["Dockerfile"].decode()), {})
    assert _tree(tmp_path / "two" / "ctx") == files

    changed = {**files, "a.txt": b"alpha two\n"}
    server.put("/ctx.tar.gz", gzip.compress(_tar(changed), mtime=0))
    server.log.clear()
    third = ow(
        root, "build", "--progress=plain", "-o", f"type=local,dest={tmp_path / 'three'}", url
    )
    assert [e[2] for e in server.log] == [200]
    assert (tmp_path / "three" / "a.run").read_bytes() == b"alpha two\n"
    assert "DONE" in third.stderr
