"""A real OCI registry for the pytest plugin: Debian's ``docker-registry`` on a
free loopback port, with the few distribution API calls a test needs
(push and pull a whole image, list tags, read a manifest) over plain HTTP.

The port is the kernel's pick (bind to port 0), handed to the registry; if
another process takes it in between (parallel xdist workers), the start is
tried again on a new port instead of failing the session.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ociworker.errors import DigestMismatchError, HostError, NotFoundError
from ociworker.testing.image import BuiltImage, load_layout, read_blob, write_image_layout

REGISTRY_BIN = "/usr/bin/docker-registry"
_ACCEPT = ", ".join(
    (
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.docker.distribution.manifest.v2+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
    )
)
_START_TRIES = 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _config(storage: Path, port: int) -> str:
    return "\n".join(
        [
            "version: 0.1",
            "log: {level: warn}",
            f"storage: {{filesystem: {{rootdirectory: {storage}}}, delete: {{enabled: true}}}}",
            "http:",
            f"  addr: 127.0.0.1:{port}",
            # a fixed secret only silences the "generated random secret" warning
            "  secret: ociworker-pytest-only",
            "",
        ]
    )


def split_ref(ref: str) -> tuple[str, str, str]:
    """``host:port/name:tag`` (or ``@sha256:...``) -> (host:port, name, tag or digest)."""
    host, _, rest = ref.partition("/")
    if "@" in rest:
        name, _, ident = rest.partition("@")
    else:
        name, sep, ident = rest.rpartition(":")
        if not sep or "/" in ident:
            name, ident = rest, "latest"
    return host, name, ident


@dataclass
class RegistryServer:
    """A running ``docker-registry``; ``stop`` ends it."""

    addr: str
    dir: Path
    proc: subprocess.Popen[bytes] = field(repr=False)

    @classmethod
    def start(
        cls, directory: Path, *, binary: str = REGISTRY_BIN, timeout: float = 30
    ) -> RegistryServer:
        directory.mkdir(parents=True, exist_ok=True)
        log = directory / "registry.log"
        for _ in range(_START_TRIES):
            port = _free_port()
            config = directory / "registry.yml"
            config.write_text(_config(directory / "storage", port))
            with log.open("ab") as out:
                proc = subprocess.Popen(
                    [binary, "serve", str(config)],
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                )
            server = cls(f"127.0.0.1:{port}", directory, proc)
            deadline = time.monotonic() + timeout
            while proc.poll() is None and time.monotonic() < deadline:
                if server._up():
                    return server
                time.sleep(0.05)
            server.stop()
            if "address already in use" not in log.read_text(errors="replace"):
                break
        tail = log.read_text(errors="replace")[-2000:]
        raise HostError(f"docker-registry did not start (log {log}):\n{tail}")

    def _up(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.addr}/v2/", timeout=1):
                return True
        except (OSError, urllib.error.HTTPError):
            return False

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    # -- what tests call --------------------------------------------------------

    def ref(self, name: str, tag: str = "latest") -> str:
        """``127.0.0.1:PORT/name:tag`` in this registry."""
        return f"{self.addr}/{name}:{tag}"

    def unique_ref(self, name: str = "pytest") -> str:
        """A tag no other test of the session uses."""
        return self.ref(name, secrets.token_hex(6))

    def _url(self, ref: str, kind: str) -> tuple[str, str]:
        host, name, ident = split_ref(ref)
        if host != self.addr:
            raise NotFoundError(f"{ref} is not in this registry ({self.addr})")
        return f"http://{self.addr}/v2/{name}/{kind}/", ident

    def _request(
        self,
        method: str,
        url: str,
        data: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, bytes, dict[str, str]]:
        req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                return resp.status, resp.read(), dict(resp.headers)
        except urllib.error.HTTPError as exc:
            body = exc.read()
            if exc.code == 404:
                raise NotFoundError(f"{method} {url}: not found ({body[:200]!r})") from None
            raise HostError(f"{method} {url}: HTTP {exc.code} {body[:500]!r}") from None

    def manifest(self, ref: str) -> dict[str, Any]:
        """The manifest (or index) the registry serves for ``ref``, as JSON."""
        return dict(json.loads(self._manifest_bytes(ref)[0]))

    def _manifest_bytes(self, ref: str) -> tuple[bytes, str]:
        base, ident = self._url(ref, "manifests")
        _, body, headers = self._request("GET", base + ident, headers={"Accept": _ACCEPT})
        return body, headers.get("Docker-Content-Digest", "")

    def tags(self, name: str) -> list[str]:
        """The tags of repository ``name`` (none: [])."""
        try:
            _, body, _ = self._request("GET", f"http://{self.addr}/v2/{name}/tags/list")
        except NotFoundError:
            return []
        return sorted(json.loads(body).get("tags") or [])

    def push(self, image: BuiltImage, ref: str) -> str:
        """Upload ``image`` (its blobs, then its manifest) as ``ref``; the manifest
        digest the registry answers with."""
        base, ident = self._url(ref, "blobs")
        manifest_bytes = read_blob(image.layout, image.digest)
        manifest = json.loads(manifest_bytes)
        for desc in [manifest["config"], *manifest["layers"]]:
            digest = desc["digest"]
            try:
                self._request("HEAD", base + digest)
                continue  # there already
            except NotFoundError:
                pass
            _, _, headers = self._request("POST", base + "uploads/", data=b"")
            location = headers["Location"]
            if location.startswith("/"):
                location = f"http://{self.addr}{location}"
            sep = "&" if "?" in location else "?"
            self._request(
                "PUT",
                f"{location}{sep}digest={digest}",
                data=read_blob(image.layout, digest),
                headers={"Content-Type": "application/octet-stream"},
            )
        murl, _ = self._url(ref, "manifests")
        media = manifest.get("mediaType", "application/vnd.oci.image.manifest.v1+json")
        _, _, headers = self._request(
            "PUT", murl + ident, data=manifest_bytes, headers={"Content-Type": media}
        )
        return headers.get("Docker-Content-Digest", image.digest)

    def pull(self, ref: str, layout: Path) -> BuiltImage:
        """Download the image ``ref`` into OCI layout ``layout`` and read it."""
        body, _ = self._manifest_bytes(ref)
        manifest = json.loads(body)
        if "manifests" in manifest:
            raise NotFoundError(f"{ref} is an index; pull one of its manifests by digest")
        # the digest of the bytes served, not the registry's header: what is pulled is checked
        digest = "sha256:" + hashlib.sha256(body).hexdigest()
        base, _ = self._url(ref, "blobs")
        blobs = {digest: body}
        for desc in [manifest["config"], *manifest["layers"]]:
            _, data, _ = self._request("GET", base + desc["digest"])
            if "sha256:" + hashlib.sha256(data).hexdigest() != desc["digest"]:
                raise DigestMismatchError(f"{ref}: blob {desc['digest']} does not match its digest")
            blobs[desc["digest"]] = data
        write_image_layout(layout, blobs, digest)
        return load_layout(layout)
