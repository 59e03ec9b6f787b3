"""Servers the git and tarball context tests start on loopback: ``git daemon``
(git://), and ``git http-backend`` behind a small HTTP server (http://, the
smart protocol) that also serves plain files, may require a token as basic
auth, and counts the requests that transfer pack data."""

from __future__ import annotations

import base64
import gzip
import os
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _any_owner_config() -> dict[str, str]:
    # git's own check refuses a repository another user owns: a test's repos are handed to
    # the test user in a rootless leg (conftest's CLI.hand_over) while root goes on serving
    # and pushing to them, as a forge serves its users' repositories. A global config file,
    # not GIT_CONFIG_COUNT, which git's local transport drops before receive-pack runs.
    path = Path(tempfile.gettempdir()) / f"ociw-gitserve-{os.getuid()}.gitconfig"
    if not path.exists():  # written whole or not at all: other sessions read it meanwhile
        part = path.with_name(f"{path.name}.{os.getpid()}")
        part.write_text("[safe]\n\tdirectory = *\n")
        os.replace(part, path)
    return {"GIT_CONFIG_GLOBAL": str(path)}


ANY_OWNER = _any_owner_config()


def git(*args: str, cwd: Path | None = None) -> str:
    env = {
        **os.environ,
        **ANY_OWNER,
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@example.com",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@example.com",
        "GIT_CONFIG_NOSYSTEM": "1",
    }
    out = subprocess.run(
        ["git", *args], cwd=cwd, env=env, capture_output=True, text=True, check=True
    )
    return out.stdout


class GitHTTPServer:
    """``git http-backend`` for the repositories under ``project_root`` at
    ``/NAME.git``, and ``files[NAME]`` at ``/files/NAME``."""

    def __init__(self, project_root: Path, token: str | None = None) -> None:
        self.project_root = project_root
        self.token = token
        self.files: dict[str, bytes] = {}
        #: upload-pack requests that asked for objects ("want" lines): pack transfers
        self.pack_requests = 0
        #: every request's path and Authorization header (to check what came)
        self.seen: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                owner._serve(self)

            def do_POST(self) -> None:
                owner._serve(self)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self._thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}/{path}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def _body(self, h: BaseHTTPRequestHandler) -> bytes:
        if h.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = b""
            while True:
                size = int(h.rfile.readline().strip().split(b";")[0], 16)
                if size == 0:
                    h.rfile.readline()
                    return out
                out += h.rfile.read(size)
                h.rfile.readline()
        length = int(h.headers.get("Content-Length") or 0)
        return h.rfile.read(length) if length else b""

    def _serve(self, h: BaseHTTPRequestHandler) -> None:
        path, _, query = h.path.partition("?")
        auth = h.headers.get("Authorization") or ""
        with self._lock:
            self.seen.append((h.path, auth))
        body = self._body(h) if h.command == "POST" else b""
        if path.startswith("/files/"):
            data = self.files.get(path.removeprefix("/files/"))
            if data is None:
                h.send_error(404)
                return
            h.send_response(200)
            h.send_header("Content-Length", str(len(data)))
            h.end_headers()
            h.wfile.write(data)
            return
        if self.token is not None:
            want = "Basic " + base64.b64encode(f"x-access-token:{self.token}".encode()).decode()
            if auth != want:
                h.send_response(401)
                h.send_header("WWW-Authenticate", 'Basic realm="git"')
                h.send_header("Content-Length", "0")
                h.end_headers()
                return
        if h.command == "POST" and path.endswith("/git-upload-pack"):
            raw = body
            if h.headers.get("Content-Encoding") == "gzip":
                raw = gzip.decompress(body)
            if b"want " in raw:
                with self._lock:
                    self.pack_requests += 1
        env = {
            "PATH": os.environ["PATH"],
            "GIT_PROJECT_ROOT": str(self.project_root),
            "GIT_HTTP_EXPORT_ALL": "1",
            "REQUEST_METHOD": h.command,
            "PATH_INFO": path,
            "QUERY_STRING": query,
            "CONTENT_TYPE": h.headers.get("Content-Type") or "",
            "CONTENT_LENGTH": str(len(body)),
            "REMOTE_ADDR": "127.0.0.1",
            "GIT_PROTOCOL": h.headers.get("Git-Protocol") or "",
            "HTTP_CONTENT_ENCODING": h.headers.get("Content-Encoding") or "",
            "GIT_CONFIG_NOSYSTEM": "1",
            **ANY_OWNER,
        }
        proc = subprocess.run(
            ["git", "http-backend"], input=body, env=env, capture_output=True, check=False
        )
        out = proc.stdout
        sep = b"\r\n\r\n" if b"\r\n\r\n" in out else b"\n\n"
        head, _, payload = out.partition(sep)
        status = 200
        headers: list[tuple[str, str]] = []
        for line in head.decode("latin-1").splitlines():
            name, _, value = line.partition(":")
            if name.lower() == "status":
                status = int(value.strip().split()[0])
            elif name:
                headers.append((name, value.strip()))
        h.send_response(status)
        for name, value in headers:
            h.send_header(name, value)
        h.send_header("Content-Length", str(len(payload)))
        h.end_headers()
        h.wfile.write(payload)


@contextmanager
def git_daemon(base: Path) -> Iterator[int]:
    """``git daemon`` serving every repository under ``base``; its port."""
    port = free_port()
    proc = subprocess.Popen(
        [
            "git",
            "daemon",
            "--reuseaddr",
            "--export-all",
            f"--base-path={base}",
            "--listen=127.0.0.1",
            f"--port={port}",
            str(base),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, **ANY_OWNER},
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("git daemon did not start")
            time.sleep(0.05)
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=30)
