"""An in-memory OCI distribution registry for ``httpx.MockTransport``.

Used by the unit tests of the registry client and the image puller; the real
registry (Debian's ``docker-registry``) is exercised in
``integration/test_registry_distribution.py``. It speaks the parts of the
distribution API the client uses, with optional bearer or basic auth, and
records every request so tests can count round trips.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import urllib.parse
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx

AuthMode = Literal["none", "bearer", "basic"]
REALM = "https://auth.test/token"


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _err(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> httpx.Response:
    body = {"errors": [{"code": code, "message": message}]}
    return httpx.Response(status, json=body, headers=headers)


@dataclass
class FakeRegistry:
    auth: AuthMode = "none"
    users: dict[str, str] = field(default_factory=dict)  # required creds, if any
    blobs: dict[str, bytes] = field(default_factory=dict)
    links: set[tuple[str, str]] = field(default_factory=set)  # (repo, digest)
    manifests: dict[tuple[str, str], tuple[str, bytes]] = field(default_factory=dict)
    uploads: dict[str, bytearray] = field(default_factory=dict)
    log: list[tuple[str, str]] = field(default_factory=list)  # (method, url)
    token_requests: list[httpx.Request] = field(default_factory=list)
    lie_about_digest: bool = False  # send a wrong Docker-Content-Digest
    #: user ("" = anonymous) -> repositories its tokens may cover; None: all.
    #: Lets tests tell one client's access from another's.
    acl: dict[str, set[str]] | None = None
    #: identity (OAuth2 refresh) token -> user, for POSTs to the token realm
    refresh_tokens: dict[str, str] = field(default_factory=dict)

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handle)

    # -- seeding -------------------------------------------------------------

    def put_blob(self, repo: str, data: bytes) -> str:
        d = sha(data)
        self.blobs[d] = data
        self.links.add((repo, d))
        return d

    def put_manifest(self, repo: str, tag: str | None, media_type: str, data: bytes) -> str:
        d = sha(data)
        self.manifests[(repo, d)] = (media_type, data)
        if tag:
            self.manifests[(repo, tag)] = (media_type, data)
        return d

    def requests(self, method: str, part: str = "") -> list[str]:
        return [u for m, u in self.log if m == method and part in u]

    # -- HTTP ----------------------------------------------------------------

    def handle(self, request: httpx.Request) -> httpx.Response:
        self.log.append((request.method, str(request.url)))
        if request.url.host == "auth.test":
            return self._token(request)
        path = request.url.path
        if not path.startswith("/v2/"):
            return _err(404, "NOT_FOUND", "not found")
        m = re.match(r"^/v2/(.+?)/(manifests|blobs/uploads|blobs)/?(.*)$", path)
        if m is None:
            return _err(404, "NOT_FOUND", "not found")
        repo, kind, rest = m.groups()
        push = request.method in ("POST", "PUT", "PATCH")
        denied = self._check_auth(request, repo, "push" if push else "pull")
        if denied is not None:
            return denied
        if kind == "manifests":
            return self._manifest(request, repo, rest)
        if kind == "blobs":
            return self._blob(request, repo, rest)
        return self._upload(request, repo, rest)

    def _check_auth(self, request: httpx.Request, repo: str, action: str) -> httpx.Response | None:
        header = request.headers.get("authorization", "")
        if self.auth == "bearer":
            challenge = (
                f'Bearer realm="{REALM}",service="fake",'
                f'scope="repository:{repo}:{"pull,push" if action == "push" else "pull"}"'
            )
            granted = header.removeprefix("Bearer ").split("|") if header else []
            want = f"repository:{repo}:"
            ok = any(g.startswith(want) and action in g[len(want) :].split(",") for g in granted)
            if not ok:
                return _err(
                    401, "UNAUTHORIZED", "authentication required", {"WWW-Authenticate": challenge}
                )
        elif self.auth == "basic" and (not header or not self._basic_ok(header)):
            challenge = 'Basic realm="fake"'
            return _err(401, "UNAUTHORIZED", "basic auth", {"WWW-Authenticate": challenge})
        return None

    def _basic_ok(self, header: str) -> bool:
        if not self.users:
            return True
        if not header.startswith("Basic "):
            return False
        user, _, pw = base64.b64decode(header[6:]).decode().partition(":")
        return self.users.get(user) == pw

    def _basic_user(self, header: str) -> str:
        if not header.startswith("Basic "):
            return ""
        return base64.b64decode(header[6:]).decode().partition(":")[0]

    def _token(self, request: httpx.Request) -> httpx.Response:
        self.token_requests.append(request)
        if request.method == "POST":
            # OAuth2 refresh-token grant, as docker's identity tokens use
            form = dict(urllib.parse.parse_qsl(request.content.decode()))
            service, scopes = form.get("service"), form.get("scope", "").split()
            user = self.refresh_tokens.get(form.get("refresh_token", ""))
            if form.get("grant_type") != "refresh_token" or user is None:
                return _err(401, "DENIED", "bad refresh token")
        else:
            service, scopes = (
                request.url.params.get("service"),
                request.url.params.get_list("scope"),
            )
            header = request.headers.get("authorization", "")
            # With an acl, anonymous callers get tokens too (for what "" may see).
            if (header or self.acl is None) and not self._basic_ok(header):
                return _err(401, "DENIED", "bad credentials")
            user = self._basic_user(header)
        if service != "fake":
            return _err(400, "DENIED", "bad service")
        if self.acl is not None:
            allowed = self.acl.get(user, set())
            scopes = [s for s in scopes if s.split(":")[1] in allowed]
        # The token is who asked and the scopes granted: lets _check_auth verify
        # them (a token granting nothing is still a token, as real registries do).
        token = "|".join([f"user:{user}", *scopes])
        key = "access_token" if request.method == "POST" else "token"
        return httpx.Response(200, json={key: token})

    def _manifest(self, request: httpx.Request, repo: str, ref: str) -> httpx.Response:
        if request.method in ("GET", "HEAD"):
            found = self.manifests.get((repo, ref))
            if found is None:
                return _err(404, "MANIFEST_UNKNOWN", f"manifest unknown: {ref}")
            media_type, data = found
            digest = sha(b"lie") if self.lie_about_digest else sha(data)
            headers = {"Content-Type": media_type, "Docker-Content-Digest": digest}
            return httpx.Response(200, content=data, headers=headers)
        if request.method == "PUT":
            data = request.content
            media_type = request.headers["content-type"]
            self.put_manifest(repo, None if ref.startswith("sha256:") else ref, media_type, data)
            return httpx.Response(201, headers={"Docker-Content-Digest": sha(data)})
        return _err(405, "UNSUPPORTED", "method")

    def _blob(self, request: httpx.Request, repo: str, digest: str) -> httpx.Response:
        if (repo, digest) not in self.links:
            return _err(404, "BLOB_UNKNOWN", f"blob unknown: {digest}")
        data = self.blobs[digest]
        if request.method == "HEAD":
            return httpx.Response(200, headers={"Content-Length": str(len(data))})
        return httpx.Response(200, content=data)

    def _upload(self, request: httpx.Request, repo: str, session: str) -> httpx.Response:
        if request.method == "POST":
            mount = request.url.params.get("mount")
            src = request.url.params.get("from")
            if mount and src and (src, mount) in self.links:
                self.links.add((repo, mount))
                return httpx.Response(201)
            sid = uuid.uuid4().hex
            self.uploads[sid] = bytearray()
            return httpx.Response(
                202, headers={"Location": f"/v2/{repo}/blobs/uploads/{sid}?_state=s0"}
            )
        buf = self.uploads.get(session)
        if buf is None:
            return _err(404, "BLOB_UPLOAD_UNKNOWN", "no such upload")
        if request.method == "PATCH":
            start, _, _end = request.headers.get("content-range", f"{len(buf)}-").partition("-")
            if int(start) != len(buf):
                return _err(416, "BLOB_UPLOAD_INVALID", "bad range")
            buf += request.content
            loc = f"/v2/{repo}/blobs/uploads/{session}?_state=s{len(buf)}"
            return httpx.Response(202, headers={"Location": loc, "Range": f"0-{len(buf) - 1}"})
        if request.method == "PUT":
            if not request.url.params.get("_state"):
                return _err(400, "BLOB_UPLOAD_INVALID", "lost _state")
            buf += request.content
            digest = request.url.params.get("digest", "")
            if sha(bytes(buf)) != digest:
                return _err(400, "DIGEST_INVALID", "provided digest did not match uploaded content")
            del self.uploads[session]
            self.put_blob(repo, bytes(buf))
            return httpx.Response(201, headers={"Docker-Content-Digest": digest})
        return _err(405, "UNSUPPORTED", "method")


def image(
    layers: list[bytes], *, arch: str = "amd64", variant: str = "", docker: bool = False
) -> tuple[bytes, bytes, list[str]]:
    """(manifest, config) JSON for uncompressed ``layers`` and the layer digests."""
    config: dict[str, Any] = {
        "architecture": arch,
        "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [sha(x) for x in layers]},
        "config": {"Env": ["PATH=/bin"]},
    }
    if variant:
        config["variant"] = variant
    config_json = json.dumps(config).encode()
    layer_type = (
        "application/vnd.docker.image.rootfs.diff.tar"
        if docker
        else "application/vnd.oci.image.layer.v1.tar"
    )
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.docker.distribution.manifest.v2+json"
        if docker
        else "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.docker.container.image.v1+json"
            if docker
            else "application/vnd.oci.image.config.v1+json",
            "digest": sha(config_json),
            "size": len(config_json),
        },
        "layers": [{"mediaType": layer_type, "digest": sha(x), "size": len(x)} for x in layers],
    }
    return json.dumps(manifest).encode(), config_json, [sha(x) for x in layers]


def seed_image(
    reg: FakeRegistry,
    repo: str,
    tag: str | None,
    layers: list[bytes],
    **kw: Any,
) -> tuple[str, bytes, bytes]:
    manifest, config, _ = image(layers, **kw)
    reg.put_blob(repo, config)
    for layer in layers:
        reg.put_blob(repo, layer)
    media_type = json.loads(manifest)["mediaType"]
    return reg.put_manifest(repo, tag, media_type, manifest), manifest, config
