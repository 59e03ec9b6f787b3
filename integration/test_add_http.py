"""``ADD URL`` against an HTTP file server the test starts on loopback: file
names (from the URL and from Content-Disposition), ``--checksum``, ``--chmod``
/ ``--chown``, archives left packed, a 404 with a credential in the URL, and the
conditional requests that keep an unchanged download (and the steps after it)
cached while a changed one re-runs them."""

from __future__ import annotations

import email.utils
import gzip
import hashlib
import io
import subprocess
import tarfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from conftest import LEGS_MARK, current_cli, plain_steps

pytestmark = [pytest.mark.usefixtures("require_root"), LEGS_MARK]

#: a fixed Last-Modified, so the file's expected mtime is known before the build
LAST_MODIFIED = 1_600_000_000


@dataclass
class Served:
    body: bytes
    etag: str
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class FileServer:
    port: int
    files: dict[str, Served]
    #: (method, path, status, If-None-Match) of every request, in order
    log: list[tuple[str, str, int, str]] = field(default_factory=list)

    def url(self, path: str, userinfo: str = "") -> str:
        return f"http://{userinfo}127.0.0.1:{self.port}{path}"

    def put(self, path: str, body: bytes, **headers: str) -> None:
        etag = '"' + hashlib.sha256(body).hexdigest()[:16] + '"'
        self.files[path] = Served(body, etag, headers)


@pytest.fixture
def server() -> Iterator[FileServer]:
    files: dict[str, Served] = {}
    fs = FileServer(0, files)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?")[0]
            f = files.get(path)
            inm = self.headers.get("If-None-Match", "")
            if f is None:
                fs.log.append(("GET", path, 404, inm))
                self.send_error(404)
                return
            if inm and f.etag in [t.strip() for t in inm.split(",")]:
                fs.log.append(("GET", path, 304, inm))
                self.send_response(304)
                self.send_header("ETag", f.etag)
                self.end_headers()
                return
            fs.log.append(("GET", path, 200, inm))
            self.send_response(200)
            self.send_header("Content-Length", str(len(f.body)))
            self.send_header("ETag", f.etag)
            self.send_header("Last-Modified", email.utils.formatdate(LAST_MODIFIED, usegmt=True))
            for k, v in f.headers.items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(f.body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    fs.port = httpd.server_address[1]
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    try:
        yield fs
    finally:
        httpd.shutdown()
        httpd.server_close()


def _build(
    tmp: Path, state: Path, dockerfile: str, name: str, *, ok: bool = True
) -> subprocess.CompletedProcess[str]:
    ctx = tmp / f"ctx-{name}"
    ctx.mkdir(exist_ok=True)
    (ctx / "Dockerfile").write_text(dockerfile)
    out = tmp / f"out-{name}"
    # as root, or as the test user in the rootless leg
    proc = current_cli().run(
        "build", "--root", str(state), "--progress", "plain", "--output",
        f"type=local,dest={out}", str(ctx), check=False,
    )  # fmt: skip
    if ok and proc.returncode != 0:
        raise AssertionError(f"build failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def _tar_gz() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        data = b"inside\n"
        info = tarfile.TarInfo("inner.txt")
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    return gzip.compress(buf.getvalue(), mtime=0)


def test_add_url_names_modes_checksum_and_archives(
    tmp_path: Path, state_dir: Path, server: FileServer, base_image: str
) -> None:
    hello = b"hello from http\n"
    archive = _tar_gz()
    server.put("/files/hello.txt", hello)
    server.put(
        "/dl/",
        b"named by the header\n",
        **{"Content-Disposition": 'attachment; filename="named.bin"'},
    )
    server.put("/files/arch.tar.gz", archive, **{"Content-Type": "application/gzip"})
    good = "sha256:" + hashlib.sha256(hello).hexdigest()
    df = f"""FROM {base_image}
ADD {server.url("/files/hello.txt")} /a/
ADD {server.url("/dl/")} /b/
ADD --chmod=0755 --chown=1234:5678 {server.url("/files/hello.txt")} /c/x
ADD {server.url("/files/arch.tar.gz")} /d/
ADD --checksum={good} {server.url("/files/hello.txt")} /e
RUN stat -c '%n %a %u %g %Y' /a/hello.txt /c/x /e > /stat.txt
"""
    _build(tmp_path, state_dir, df, "names")
    out = tmp_path / "out-names"
    assert (out / "a/hello.txt").read_bytes() == hello  # named by the URL's path
    assert (out / "b/named.bin").read_bytes() == b"named by the header\n"  # Content-Disposition
    # not extracted (as Docker: remote archives stay as they are)
    assert (out / "d/arch.tar.gz").read_bytes() == archive
    assert not (out / "d/inner.txt").exists()
    assert (out / "e").read_bytes() == hello
    # BuildKit's http source: mode 0600, root, mtime = Last-Modified; --chmod/--chown applied
    stat = (out / "stat.txt").read_text().splitlines()
    assert stat == [
        f"/a/hello.txt 600 0 0 {LAST_MODIFIED}",
        f"/c/x 755 1234 5678 {LAST_MODIFIED}",
        f"/e 600 0 0 {LAST_MODIFIED}",
    ]


def test_checksum_mismatch_names_both_digests(
    tmp_path: Path, state_dir: Path, server: FileServer, base_image: str
) -> None:
    body = b"the real content\n"
    server.put("/f.txt", body)
    wrong = "sha256:" + hashlib.sha256(b"something else").hexdigest()
    actual = "sha256:" + hashlib.sha256(body).hexdigest()
    proc = _build(
        tmp_path,
        state_dir,
        f"FROM {base_image}\nADD --checksum={wrong} {server.url('/f.txt')} /f\n",
        "mismatch",
        ok=False,
    )
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    # BuildKit: "digest mismatch for URL: GOT (expected: WANT)"
    assert f"digest mismatch for {server.url('/f.txt')}: {actual} (expected: {wrong})" in (
        proc.stderr
    ), proc.stderr


def test_404_is_a_clear_error_with_the_credential_redacted(
    tmp_path: Path, state_dir: Path, server: FileServer, base_image: str
) -> None:
    url = server.url("/missing.txt", "alice:s3cr3t-token@")
    proc = _build(tmp_path, state_dir, f"FROM {base_image}\nADD {url} /m\n", "404", ok=False)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert "s3cr3t-token" not in proc.stderr
    shown = server.url("/missing.txt", "alice:xxxxx@")
    assert f"{shown}: invalid response status 404" in proc.stderr, proc.stderr
    assert ("GET", "/missing.txt", 404, "") in server.log
    # nothing of the credential in the state either (records, cache db)
    for p in state_dir.rglob("*"):
        if p.is_file() and p.stat().st_size < 10 << 20 and "content" not in p.parts:
            assert b"s3cr3t-token" not in p.read_bytes(), p


def test_unreachable_host_is_a_clear_error(
    tmp_path: Path, state_dir: Path, base_image: str
) -> None:
    url = "http://bob:pw-secret@127.0.0.1:9/x.txt"
    proc = _build(tmp_path, state_dir, f"FROM {base_image}\nADD {url} /x\n", "down", ok=False)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert "pw-secret" not in proc.stderr
    assert "http://bob:xxxxx@127.0.0.1:9/x.txt" in proc.stderr
    assert "connection refused" in proc.stderr, proc.stderr


def _state_of(stderr: str, prefix: str) -> tuple[str, ...]:
    found = [s for s in plain_steps(stderr) if prefix in s.name]
    assert len(found) == 1, (prefix, stderr)
    return found[0].states


def test_unchanged_remote_stays_cached_changed_remote_reruns(
    tmp_path: Path, state_dir: Path, server: FileServer, base_image: str
) -> None:
    server.put("/v.txt", b"version 1\n")
    df = f"FROM {base_image}\nADD {server.url('/v.txt')} /v.txt\nRUN cat /v.txt > /copy.txt\n"
    first = _build(tmp_path, state_dir, df, "one")
    assert (tmp_path / "out-one/copy.txt").read_text() == "version 1\n"
    assert _state_of(first.stderr, "RUN cat") == ("DONE",)

    server.log.clear()
    second = _build(tmp_path, state_dir, df, "two")
    # a conditional request answered 304: nothing downloaded, every step cached
    assert [e[2] for e in server.log if e[1] == "/v.txt"] == [304], server.log
    assert server.log[0][3] == server.files["/v.txt"].etag
    assert _state_of(second.stderr, "RUN cat") == ("CACHED",)
    assert (tmp_path / "out-two/copy.txt").read_text() == "version 1\n"

    server.put("/v.txt", b"version 2\n")
    server.log.clear()
    third = _build(tmp_path, state_dir, df, "three")
    assert [e[2] for e in server.log if e[1] == "/v.txt"] == [200], server.log
    assert _state_of(third.stderr, "RUN cat") == ("DONE",)
    assert (tmp_path / "out-three/copy.txt").read_text() == "version 2\n"
