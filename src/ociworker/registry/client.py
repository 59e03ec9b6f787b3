"""OCI distribution client: resolve, pull and push over HTTP(S) with httpx.

Everything read from a registry is verified against the digest that named it
before anyone sees it: manifests in memory, blobs by the content store's
ingest. Errors are mapped once, here, at the HTTP boundary: a registry's
refusal or an unreachable host is a ``RegistryError`` carrying the URL and the
registry's own message; a missing image is a ``NotFoundError``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import ipaddress
import json
import ssl
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx

from ociworker.content.store import ContentStore
from ociworker.core.digest import Digest, is_digest, sha256_bytes
from ociworker.core.oci import (
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    INDEX_TYPES,
    MANIFEST_TYPES,
    OCI_INDEX,
    OCI_MANIFEST,
    Descriptor,
    Platform,
)
from ociworker.core.reference import DEFAULT_DOMAIN, Reference, parse_reference
from ociworker.core.session import Credentials
from ociworker.errors import (
    ConfigError,
    DigestMismatchError,
    NotFoundError,
    RegistryAuthError,
    RegistryError,
    UnsupportedError,
    UserError,
)
from ociworker.registry.auth import Challenge, parse_www_authenticate
from ociworker.registry.neterrors import describe, invalid_reason

DEFAULT_USER_AGENT = "ociworker/0.1"
#: containerd's limit too: a manifest bigger than this is not a manifest
MAX_MANIFEST_SIZE = 4 << 20
MAX_CONFIG_SIZE = 32 << 20
DEFAULT_CHUNK_SIZE = 16 << 20
#: waits before the 2nd and 3rd try of a blob upload a network error cut
#: short (BuildKit's pusher retries too; three tries in all)
DEFAULT_RETRY_DELAYS = (1.0, 2.0)
#: what ``upload_blob`` did: the registry had it, mounted it, or got it from us
BlobPush = Literal["exists", "mounted", "uploaded"]

_MANIFEST_ACCEPT = ", ".join((OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_MANIFEST_LIST))
_SCHEMA1_TYPES = (
    "application/vnd.docker.distribution.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v1+prettyjws",
)
#: Docker Hub's API does not live at the name people use for it
_API_HOSTS = {DEFAULT_DOMAIN: "registry-1.docker.io"}


@dataclass(frozen=True)
class ResolvedImage:
    ref: Reference
    manifest: Descriptor  # the platform-specific manifest, with its platform when known
    manifest_json: bytes
    config_json: bytes
    index_digest: Digest | None  # set when ``ref`` named an index / manifest list

    @property
    def config_descriptor(self) -> Descriptor:
        return Descriptor.from_json(json.loads(self.manifest_json)["config"])

    @property
    def layer_descriptors(self) -> tuple[Descriptor, ...]:
        return tuple(Descriptor.from_json(d) for d in json.loads(self.manifest_json)["layers"])


# --- pure helpers --------------------------------------------------------------


def _host_of(domain: str) -> str:
    if domain.startswith("["):
        return domain[1 : domain.index("]")]
    return domain.rsplit(":", 1)[0]


def is_loopback(domain: str) -> bool:
    host = _host_of(domain)
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _matches_insecure(domain: str, entry: str) -> bool:
    if entry in (domain, _host_of(domain)):
        return True
    if "/" in entry:  # a CIDR, as Docker's insecure-registries accepts
        try:
            net = ipaddress.ip_network(entry, strict=False)
            return ipaddress.ip_address(_host_of(domain)) in net
        except ValueError:
            return False
    return False


def _normalize_platform(p: Platform) -> Platform:
    arch = {"x86_64": "amd64", "x86-64": "amd64", "aarch64": "arm64"}.get(
        p.architecture, p.architecture
    )
    variant = p.variant
    # Same defaults as containerd: arm64 means v8, arm means v7, amd64 means v1.
    if (arch == "arm64" and variant == "v8") or (arch == "amd64" and variant == "v1"):
        variant = ""
    if arch == "arm" and variant == "":
        variant = "v7"
    return Platform(os=p.os, architecture=arch, variant=variant)


def platform_matches(have: Platform, want: Platform) -> bool:
    """Whether an image built for ``have`` is what a caller asking for ``want``
    gets; a request without a variant accepts any variant."""
    h, w = _normalize_platform(have), _normalize_platform(want)
    if h == w:
        return True
    return w.variant == "" and (h.os, h.architecture) == (w.os, w.architecture)


def select_platform(index: dict[str, Any], want: Platform, name: str) -> Descriptor:
    """The manifest in ``index`` that runs on ``want``, or ``NotFoundError``
    naming the platforms that are there."""
    try:
        entries = [Descriptor.from_json(d) for d in index.get("manifests") or []]
    except (TypeError, ValueError, KeyError, UserError) as exc:
        raise RegistryError(f"invalid manifest list for {name}: {invalid_reason(exc)}") from None
    candidates = [
        (d, _normalize_platform(d.platform))
        for d in entries
        if d.platform is not None and d.media_type in MANIFEST_TYPES and d.platform.os != "unknown"
    ]
    target = _normalize_platform(want)
    wanted = [target]
    if target.architecture == "arm" and target.variant in ("v7", "v6"):
        # An armv7 machine runs armv6 and armv5 binaries; prefer the closest.
        for v in ("v6", "v5"):
            if v < target.variant:
                wanted.append(Platform(target.os, "arm", v))
    for w in wanted:
        for desc, plat in candidates:
            if plat == w:
                return desc
    if target.variant == "":
        for desc, plat in candidates:
            if (plat.os, plat.architecture) == (target.os, target.architecture):
                return desc
    available = ", ".join(sorted({str(p) for _, p in candidates})) or "none"
    raise NotFoundError(
        f"no image for platform {want} in manifest list of {name} (available: {available})"
    )


def _manifest_media_type(data: dict[str, Any], header_type: str) -> str:
    declared = data.get("mediaType")
    if isinstance(declared, str) and declared:
        return declared
    if header_type in MANIFEST_TYPES + INDEX_TYPES + _SCHEMA1_TYPES:
        return header_type
    # An OCI manifest may omit mediaType; its shape says what it is.
    if "manifests" in data:
        return OCI_INDEX
    if "config" in data and "layers" in data:
        return OCI_MANIFEST
    return header_type


def _registry_message(resp: httpx.Response) -> str:
    try:
        body = resp.json()
    except httpx.ResponseNotRead:
        return ""  # an unread streamed body: the status line has to do
    except (ValueError, UnicodeDecodeError):
        # one line: the message ends up in a progress line and an ERROR line
        return " ".join(resp.text.split())[:200]
    errors = body.get("errors") if isinstance(body, dict) else None
    if not isinstance(errors, list):
        return ""
    parts = []
    for e in errors:
        if isinstance(e, dict):
            code = e.get("code", "")
            msg = e.get("message", "")
            parts.append(f"{code}: {msg}" if code else str(msg))
    return " ".join("; ".join(parts).split())


def _error(resp: httpx.Response, what: str = "") -> RegistryError:
    req = resp.request
    msg = _registry_message(resp)
    if not msg and resp.status_code in _AUTH_WORDS:
        # a HEAD's answer has no body: say it in docker's words
        msg = _AUTH_WORDS[resp.status_code]
    if resp.status_code == 400 and req.url.scheme == "http" and (not msg or "HTTPS" in msg):
        # what a TLS server answers plain HTTP with (Go's words, or none to a HEAD)
        msg = (
            "the registry may speak only HTTPS (plain HTTP is tried for loopback and "
            f"--insecure-registry hosts): trust its CA with --registry-ca "
            f'{req.url.netloc.decode()}=FILE, or [registry."HOST"] ca in a daemon\'s config'
            + (f" ({msg})" if msg else "")
        )
    text = f"{req.method} {req.url}: {resp.status_code} {resp.reason_phrase}"
    if msg:
        text += f": {msg}"
    if what:
        text = f"{what}: {text}"
    if resp.status_code in (401, 403):
        return RegistryAuthError(text)
    return RegistryError(text)


def _denied(resp: httpx.Response, ref: Reference) -> RegistryError:
    """A 401/403 that authenticating did not cure. Registries (Docker Hub
    first) answer so for a repository that does not exist as well as for one
    that needs other credentials, so the message says both, as docker does."""
    return _error(
        resp,
        f"pull access denied for {ref.repository}, repository does not exist or "
        "may require authorization",
    )


def _retryable(exc: RegistryError) -> bool:
    """A failure worth another try: the connection broke (a socket error under
    the RegistryError) or the registry said it is briefly unable (5xx)."""
    cause = exc.__cause__
    if isinstance(cause, httpx.TransportError):
        return True
    return isinstance(exc, _ServerError)


_AUTH_WORDS = {
    401: "unauthorized: authentication required",
    403: "denied: requested access to the resource is denied",
}


class _ServerError(RegistryError):
    """A 5xx answer to an upload request: the registry may be restarting."""


def ca_domains(ca: Mapping[str, Sequence[str]], domain: str) -> Sequence[str] | None:
    """The CA files configured for ``domain`` (``host:port``, else ``host``), as
    buildkitd's ``[registry."host"] ca`` keys match; None when none are."""
    if domain in ca:
        return ca[domain]
    return ca.get(_host_of(domain))


def _ssl_context(domain: str, files: Sequence[str]) -> ssl.SSLContext:
    """The system's CAs plus ``files`` (buildkitd adds them to the pool too)."""
    ctx = ssl.create_default_context()
    for f in files:
        try:
            ctx.load_verify_locations(cafile=f)
        except (OSError, ssl.SSLError) as exc:
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise ConfigError(f"registry {domain}: cannot load CA certificate {f}: {why}") from None
    return ctx


def _as_ref(ref: Reference | str) -> Reference:
    return ref if isinstance(ref, Reference) else parse_reference(ref)


def _scope(path: str, actions: str) -> str:
    return f"repository:{path}:{actions}"


# --- the client ----------------------------------------------------------------


@dataclass
class _Shared:
    """What every view of one client shares: connections, and tokens keyed by
    whose credentials obtained them."""

    http: httpx.AsyncClient
    insecure: tuple[str, ...]
    chunk_size: int
    #: domain -> CA files trusted for it, and the clients made for them
    ca: Mapping[str, Sequence[str]] = field(default_factory=dict)
    ca_clients: dict[str, httpx.AsyncClient] = field(default_factory=dict)
    make_client: Callable[[ssl.SSLContext | None], httpx.AsyncClient] | None = None
    retry_delays: tuple[float, ...] = DEFAULT_RETRY_DELAYS
    #: (domain, scopes, credential identity) -> Authorization header
    tokens: dict[tuple[str, str, str], str] = field(default_factory=dict)
    challenges: dict[str, Challenge] = field(default_factory=dict)  # domain -> last bearer
    locks: dict[tuple[str, str, str], asyncio.Lock] = field(default_factory=dict)


def _identity(creds: tuple[str, str] | None) -> str:
    """Names whose credentials a token was obtained with, without keeping them:
    a token one job earned must never authorize another job's requests."""
    if creds is None:
        return ""
    return hashlib.sha256(f"{creds[0]}\0{creds[1]}".encode()).hexdigest()


class RegistryClient:
    """One client per process is enough: it keeps connections and tokens.

    Credentials are per job: ``with_credentials`` gives a view that shares the
    connections and the token cache but asks its own ``Credentials`` (the
    daemon serves many clients, each lending its own). Cached tokens are keyed
    by a hash of the credentials that obtained them, so views never borrow
    each other's access. ``transport`` exists so unit tests can hand in
    ``httpx.MockTransport``.
    """

    def __init__(
        self,
        *,
        insecure: Sequence[str] = (),
        credentials: Credentials | None = None,
        user_agent: str = DEFAULT_USER_AGENT,
        timeout: float = 60.0,
        connect_timeout: float = 10.0,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        transport: httpx.AsyncBaseTransport | None = None,
        ca: Mapping[str, Sequence[str]] | None = None,
        retry_delays: Sequence[float] = DEFAULT_RETRY_DELAYS,
        _shared: _Shared | None = None,
    ) -> None:
        self._owner = _shared is None

        def make_client(verify: ssl.SSLContext | None) -> httpx.AsyncClient:
            return httpx.AsyncClient(
                transport=transport,
                timeout=httpx.Timeout(timeout, connect=connect_timeout),
                follow_redirects=True,  # httpx drops Authorization on cross-origin redirects
                headers={"User-Agent": user_agent},
                verify=verify if verify is not None else True,
            )

        self._shared = _shared or _Shared(
            http=make_client(None),
            insecure=tuple(insecure),
            chunk_size=chunk_size,
            ca=dict(ca or {}),
            make_client=make_client,
            retry_delays=tuple(retry_delays),
        )
        self._http = self._shared.http
        self._insecure = self._shared.insecure
        self._chunk_size = self._shared.chunk_size
        self._credentials = credentials
        self._creds: dict[str, tuple[str, str] | None] = {}
        self._basic: dict[str, str] = {}  # domain -> header, from this view's credentials

    def with_credentials(self, credentials: Credentials | None) -> RegistryClient:
        """A view for one job: same connections, that job's credentials."""
        return RegistryClient(credentials=credentials, _shared=self._shared)

    async def aclose(self) -> None:
        if self._owner:  # a view does not own the connections
            await self._http.aclose()
            for c in self._shared.ca_clients.values():
                await c.aclose()

    async def __aenter__(self) -> RegistryClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- URLs --------------------------------------------------------------------

    def scheme_for(self, domain: str) -> str:
        # Like Docker, loopback registries are insecure by definition: no TLS try,
        # unless a CA is configured for it: that says it speaks TLS.
        if any(_matches_insecure(domain, e) for e in self._insecure):
            return "http"
        if is_loopback(domain) and ca_domains(self._shared.ca, domain) is None:
            return "http"
        return "https"

    def _http_for(self, url: str | httpx.URL) -> httpx.AsyncClient:
        """The client whose TLS trust fits ``url``'s host: the shared one, or
        one that also trusts the CA configured for that host."""
        shared = self._shared
        if not shared.ca:
            return self._http
        u = httpx.URL(str(url))
        if u.scheme != "https":
            return self._http
        domain = f"{u.host}:{u.port}" if u.port else u.host
        files = ca_domains(shared.ca, domain)
        if files is None:
            return self._http
        key = "\0".join(files)
        client = shared.ca_clients.get(key)
        if client is None:
            assert shared.make_client is not None
            client = shared.ca_clients[key] = shared.make_client(_ssl_context(domain, files))
        return client

    def _url(self, ref: Reference, tail: str) -> str:
        host = _API_HOSTS.get(ref.domain, ref.domain)
        return f"{self.scheme_for(ref.domain)}://{host}/v2/{ref.path}/{tail}"

    # -- auth --------------------------------------------------------------------

    async def _creds_for(self, domain: str) -> tuple[str, str] | None:
        if self._credentials is None:
            return None
        if domain not in self._creds:
            self._creds[domain] = await self._credentials.credentials(domain)
        return self._creds[domain]

    async def _token_key(self, domain: str, scopes: str) -> tuple[str, str, str]:
        return domain, scopes, _identity(await self._creds_for(domain))

    async def _auth_header(self, domain: str, scopes: str) -> str | None:
        # Credentials are asked for only once a registry has asked for auth: an
        # open registry never runs a credential helper or reads a docker config.
        if domain in self._basic:
            return self._basic[domain]
        if domain not in self._shared.challenges:
            return None
        return self._shared.tokens.get(await self._token_key(domain, scopes))

    async def _fetch_token(
        self, domain: str, challenge: Challenge, scopes: str, *, from_401: bool = True
    ) -> str:
        realm = challenge.get("realm")
        if not realm:
            raise RegistryError(f"registry {domain} sent a bearer challenge without a realm")
        params: list[tuple[str, str | int | float | bool | None]] = []
        service = challenge.get("service")
        if service:
            params.append(("service", service))
        wanted = scopes.split(" ")
        # The scope of a fresh 401 is what this request needs; a remembered
        # challenge's scope belongs to an earlier request.
        extra = challenge.get("scope") if from_401 else None
        if extra:
            wanted += [s for s in extra.split(" ") if s not in wanted]
        params += [("scope", s) for s in wanted]
        creds = await self._creds_for(domain)
        try:
            if creds is not None and not creds[0] and creds[1]:
                # An identity token (docker login with OAuth): exchange it as an
                # OAuth2 refresh token, in the body, as containerd does.
                form = dict(params)
                form.update(
                    grant_type="refresh_token",
                    refresh_token=creds[1],
                    client_id="ociworker",
                    scope=" ".join(wanted),
                )
                resp = await self._http_for(realm).post(realm, data=form)
            else:
                auth = httpx.BasicAuth(*creds) if creds else None
                resp = await self._http_for(realm).get(realm, params=params, auth=auth)
        except httpx.HTTPError as exc:
            method = "POST" if creds is not None and not creds[0] and creds[1] else "GET"
            raise RegistryError(
                f"failed to authorize to {domain}: {describe(exc, method, realm)}"
            ) from exc
        if resp.status_code != 200:
            raise _error(resp, f"authentication to {domain} failed")
        try:
            body = resp.json()
            token = body.get("token") or body.get("access_token")
        except (ValueError, AttributeError):
            token = None
        if not isinstance(token, str) or not token:
            raise RegistryError(f"{realm}: token response without a token")
        return f"Bearer {token}"

    async def _authenticate(self, resp: httpx.Response, domain: str, scopes: str) -> None:
        """Learn from a 401 how to authenticate and get what it takes, or raise."""
        challenges = parse_www_authenticate(", ".join(resp.headers.get_list("www-authenticate")))
        shared = self._shared
        for ch in challenges:
            if ch.scheme == "bearer":
                shared.challenges[domain] = ch
                key = await self._token_key(domain, scopes)
                lock = shared.locks.setdefault(key, asyncio.Lock())
                stale = shared.tokens.get(key)
                async with lock:
                    # Concurrent layer fetches all see the first 401; fetch once.
                    if shared.tokens.get(key) == stale:
                        shared.tokens[key] = await self._fetch_token(domain, ch, scopes)
                return
        for ch in challenges:
            if ch.scheme == "basic":
                creds = await self._creds_for(domain)
                if creds is None:
                    raise _error(resp, f"registry {domain} requires credentials; none configured")
                raw = base64.b64encode(f"{creds[0]}:{creds[1]}".encode()).decode()
                self._basic[domain] = f"Basic {raw}"
                return
        raise _error(resp, f"registry {domain} refused access")

    async def _send(
        self,
        method: str,
        url: str | httpx.URL,
        ref: Reference,
        scopes: str,
        *,
        headers: dict[str, str] | None = None,
        content: bytes | None = None,
        params: dict[str, str] | None = None,
        stream: bool = False,
    ) -> httpx.Response:
        """Send with auth; on 401 authenticate and retry once. A streamed
        response must be closed by the caller. Status codes are not checked."""
        domain = ref.domain
        shared = self._shared
        if domain in shared.challenges and domain not in self._basic:
            key = await self._token_key(domain, scopes)
            if key not in shared.tokens:
                # We know this registry wants tokens: get one before the request
                # instead of paying for a 401 on every new scope.
                await self._authenticate_with(key)
        for attempt in (0, 1):
            http = self._http_for(url)
            request = http.build_request(
                method, url, headers=headers, content=content, params=params
            )
            auth = await self._auth_header(domain, scopes)
            if auth:
                request.headers["Authorization"] = auth
            try:
                resp = await http.send(request, stream=True)
            except httpx.HTTPError as exc:
                raise RegistryError(describe(exc, method, request.url)) from exc
            if resp.status_code == 401 and attempt == 0:
                await _drain(resp)
                await self._authenticate(resp, domain, scopes)
                continue
            if not stream or not resp.is_success:
                # Error bodies are small and carry the registry's message.
                await _drain(resp)
            return resp
        raise AssertionError("unreachable")

    async def _authenticate_with(self, key: tuple[str, str, str]) -> None:
        domain, scopes, _ = key
        ch = self._shared.challenges[domain]
        async with self._shared.locks.setdefault(key, asyncio.Lock()):
            if key not in self._shared.tokens:
                self._shared.tokens[key] = await self._fetch_token(
                    domain, ch, scopes, from_401=False
                )

    # -- manifests ---------------------------------------------------------------

    async def fetch_manifest(
        self, ref: Reference | str, expected: Descriptor | None = None
    ) -> tuple[Descriptor, bytes]:
        """The manifest or index ``ref`` names (or ``expected`` names, in ``ref``'s
        repository), verified against its digest."""
        ref = _as_ref(ref)
        target = expected.digest if expected is not None else ref.api_reference
        url = self._url(ref, f"manifests/{target}")
        resp = await self._send(
            "GET",
            url,
            ref,
            _scope(ref.path, "pull"),
            headers={"Accept": _MANIFEST_ACCEPT},
            stream=True,
        )
        if resp.status_code == 404:
            if expected is not None:
                raise NotFoundError(f"manifest {expected.digest} of image {ref} not found")
            raise NotFoundError(f"image {ref} not found")
        if resp.status_code != 200:
            await resp.aclose()
            if resp.status_code in (401, 403):
                raise _denied(resp, ref)
            raise _error(resp)
        try:
            data = await _read_limited(resp, MAX_MANIFEST_SIZE, f"manifest of {ref}")
        finally:
            await resp.aclose()
        digest = sha256_bytes(data)
        if is_digest(target) and digest != target:
            raise DigestMismatchError(
                f"manifest of {ref} from {url}: want digest {target}, got {digest}"
            )
        header_digest = resp.headers.get("docker-content-digest", "")
        if is_digest(header_digest) and header_digest != digest:
            raise DigestMismatchError(
                f"manifest of {ref} from {url}: registry says {header_digest}, content is {digest}"
            )
        if expected is not None and expected.size != len(data):
            raise DigestMismatchError(
                f"manifest {digest} of {ref}: want {expected.size} bytes, got {len(data)}"
            )
        try:
            parsed = json.loads(data)
        except ValueError as exc:
            raise RegistryError(f"manifest of {ref} from {url} is not JSON: {exc}") from None
        if not isinstance(parsed, dict):
            raise RegistryError(f"manifest of {ref} from {url} is not a JSON object")
        header_type = resp.headers.get("content-type", "").split(";", 1)[0].strip()
        media_type = _manifest_media_type(parsed, header_type)
        if media_type in _SCHEMA1_TYPES:
            raise UnsupportedError(
                f"image {ref} uses the deprecated Docker schema 1 manifest format; "
                "push it again with a current client"
            )
        if media_type not in MANIFEST_TYPES + INDEX_TYPES:
            raise UnsupportedError(f"image {ref}: unsupported manifest media type {media_type!r}")
        platform = expected.platform if expected is not None else None
        return Descriptor(media_type, digest, len(data), platform=platform), data

    async def resolve(
        self,
        ref: Reference | str,
        platform: Platform,
        *,
        store: ContentStore | None = None,
    ) -> ResolvedImage:
        """Find the manifest of ``ref`` for ``platform`` and its config.

        With ``store`` the config blob is read from / written to it, so a
        cached image costs manifest requests only.
        """
        ref = _as_ref(ref)
        desc, data = await self.fetch_manifest(ref)
        index_digest: Digest | None = None
        if desc.media_type in INDEX_TYPES:
            index_digest = desc.digest
            chosen = select_platform(json.loads(data), platform, str(ref))
            desc, data = await self.fetch_manifest(ref, expected=chosen)
            if desc.media_type not in MANIFEST_TYPES:
                raise UnsupportedError(f"image {ref}: nested manifest lists are not supported")
        try:
            manifest = json.loads(data)
            config_desc = Descriptor.from_json(manifest["config"])
            for layer in manifest.get("layers") or []:
                Descriptor.from_json(layer)
        except (TypeError, ValueError, KeyError, UserError) as exc:
            raise RegistryError(
                f"invalid manifest {desc.digest} of {ref}: {invalid_reason(exc)}"
            ) from None
        config_json = await self._config(ref, config_desc, store)
        if index_digest is None:
            desc = self._check_single_platform(ref, desc, config_json, platform)
        return ResolvedImage(
            ref=ref,
            manifest=desc,
            manifest_json=data,
            config_json=config_json,
            index_digest=index_digest,
        )

    @staticmethod
    def _check_single_platform(
        ref: Reference, desc: Descriptor, config_json: bytes, want: Platform
    ) -> Descriptor:
        try:
            config = json.loads(config_json)
        except ValueError as exc:
            raise RegistryError(f"image config of {ref} is not JSON: {exc}") from None
        if not isinstance(config, dict) or not config.get("os") or not config.get("architecture"):
            return desc  # nothing to check against: trust the caller
        have = Platform.from_json(config)
        if not platform_matches(have, want):
            raise NotFoundError(f"image {ref} is for platform {have}, not {want}")
        return Descriptor(desc.media_type, desc.digest, desc.size, platform=have)

    async def _config(self, ref: Reference, desc: Descriptor, store: ContentStore | None) -> bytes:
        if store is not None:
            if not store.has(desc.digest):
                await self.fetch_blob(ref, desc, store)
            return store.read(desc.digest)
        if desc.size > MAX_CONFIG_SIZE:
            raise RegistryError(f"image config of {ref} is {desc.size} bytes; refusing")
        resp = await self._blob_response(ref, desc)
        try:
            data = await _read_limited(resp, desc.size, f"blob {desc.digest}")
        finally:
            await resp.aclose()
        got = sha256_bytes(data)
        if got != desc.digest or len(data) != desc.size:
            raise DigestMismatchError(
                f"blob from {resp.request.url}: want {desc.digest} ({desc.size} bytes), "
                f"got {got} ({len(data)} bytes)"
            )
        return data

    async def push_manifest(self, ref: Reference | str, media_type: str, data: bytes) -> Digest:
        """PUT a manifest or index under ``ref``'s tag (or digest); its digest."""
        ref = _as_ref(ref)
        digest = sha256_bytes(data)
        if ref.digest is not None and ref.digest != digest:
            raise DigestMismatchError(f"cannot push to {ref}: the manifest's digest is {digest}")
        target = ref.tag if ref.tag is not None else digest
        url = self._url(ref, f"manifests/{target}")
        resp = await self._send(
            "PUT",
            url,
            ref,
            _scope(ref.path, "pull,push"),
            headers={"Content-Type": media_type},
            content=data,
        )
        if resp.status_code not in (200, 201):
            raise _error(resp, f"push of manifest to {ref} failed")
        header = resp.headers.get("docker-content-digest", "")
        if is_digest(header) and header != digest:
            raise DigestMismatchError(f"registry stored manifest {ref} as {header}, not {digest}")
        return digest

    # -- blobs -------------------------------------------------------------------

    async def _blob_response(self, ref: Reference, desc: Descriptor) -> httpx.Response:
        url = self._url(ref, f"blobs/{desc.digest}")
        resp = await self._send("GET", url, ref, _scope(ref.path, "pull"), stream=True)
        if resp.status_code == 404:
            raise NotFoundError(f"blob {desc.digest} not found in {ref.repository}")
        if resp.status_code != 200:
            await resp.aclose()
            if resp.status_code in (401, 403):
                raise _denied(resp, ref)
            raise _error(resp)
        return resp

    async def fetch_blob(self, ref: Reference | str, desc: Descriptor, store: ContentStore) -> None:
        """Stream blob ``desc`` of ``ref``'s repository into ``store`` (no-op when
        present); the store verifies digest and size before it commits."""
        ref = _as_ref(ref)
        if store.has(desc.digest):
            return
        resp = await self._blob_response(ref, desc)
        try:
            with store.ingest(expected=desc.digest, expected_size=desc.size) as ingest:
                async for chunk in resp.aiter_bytes():
                    ingest.write(chunk)
                    if ingest.size > desc.size:
                        raise DigestMismatchError(
                            f"blob {desc.digest} from {resp.request.url}: "
                            f"more than the expected {desc.size} bytes"
                        )
                try:
                    await asyncio.to_thread(ingest.commit)
                except DigestMismatchError as exc:
                    raise DigestMismatchError(f"blob from {resp.request.url}: {exc}") from None
        except httpx.HTTPError as exc:
            raise RegistryError(describe(exc, "GET", resp.request.url)) from exc
        finally:
            await resp.aclose()

    async def has_blob(self, ref: Reference | str, digest: Digest) -> bool:
        ref = _as_ref(ref)
        url = self._url(ref, f"blobs/{digest}")
        resp = await self._send("HEAD", url, ref, _scope(ref.path, "pull"))
        if resp.status_code == 200:
            return True
        if resp.status_code == 404:
            return False
        raise _error(resp)

    async def push_blob(
        self,
        ref: Reference | str,
        desc: Descriptor,
        store: ContentStore,
        *,
        mount_from: Reference | str | None = None,
    ) -> None:
        """Upload blob ``desc`` from ``store`` unless the registry has it; with
        ``mount_from`` (a repository on the same registry) try a cross-repo mount."""
        await self.upload_blob(ref, desc, store, mount_from=mount_from)

    async def upload_blob(
        self,
        ref: Reference | str,
        desc: Descriptor,
        store: ContentStore,
        *,
        mount_from: Reference | str | None = None,
    ) -> BlobPush:
        """``push_blob``, saying what happened. An upload cut short by the
        network (or a 5xx) starts again, up to three tries in all, then fails
        naming the blob."""
        ref = _as_ref(ref)
        size = store.size(desc.digest)
        if size != desc.size:
            raise DigestMismatchError(
                f"blob {desc.digest} in the content store is {size} bytes, descriptor says "
                f"{desc.size}"
            )
        delays = self._shared.retry_delays
        for attempt in range(len(delays) + 1):
            try:
                return await self._upload_once(ref, desc, store, mount_from)
            except RegistryError as exc:
                if not _retryable(exc):
                    raise
                if attempt == len(delays):
                    raise RegistryError(
                        f"failed to push blob {desc.digest} to {ref.repository} "
                        f"after {attempt + 1} tries: {exc}"
                    ) from exc
                await asyncio.sleep(delays[attempt])
        raise AssertionError("unreachable")

    async def mount_blob(
        self, ref: Reference | str, desc: Descriptor, mount_from: Reference | str | None
    ) -> BlobPush | None:
        """Put ``desc`` in ``ref``'s repository without sending its bytes: "exists"
        when it is there, "mounted" when the registry mounts it from
        ``mount_from`` (same registry); None when neither (the upload the
        registry opened instead is cancelled)."""
        ref = _as_ref(ref)
        src = _as_ref(mount_from) if mount_from is not None else None
        if src is None or src.domain != ref.domain or src.path == ref.path:
            return "exists" if await self.has_blob(ref, desc.digest) else None
        begun, scopes = await self._start_upload(ref, desc, src)
        if isinstance(begun, str):
            return begun
        with contextlib.suppress(RegistryError, httpx.HTTPError):
            await self._send("DELETE", begun, ref, scopes)
        return None

    async def _start_upload(
        self, ref: Reference, desc: Descriptor, mount_from: Reference | str | None
    ) -> tuple[BlobPush | httpx.URL, str]:
        """HEAD, then open an upload (a cross-repository mount when
        ``mount_from`` is another repository of the same registry): "exists" or
        "mounted", or the upload's location; and the token scopes it used."""
        scopes = _scope(ref.path, "pull,push")
        if await self.has_blob(ref, desc.digest):
            return "exists", scopes
        params: dict[str, str] = {}
        src = _as_ref(mount_from) if mount_from is not None else None
        if src is not None and src.domain == ref.domain and src.path != ref.path:
            params = {"mount": desc.digest, "from": src.path}
            scopes += " " + _scope(src.path, "pull")
        start_url = self._url(ref, "blobs/uploads/")
        resp = await self._send("POST", start_url, ref, scopes, params=params)
        if resp.status_code == 201 and params:
            return "mounted", scopes
        if resp.status_code != 202:
            raise _upload_error(resp, desc, ref)
        return _location(resp), scopes

    async def _upload_once(
        self,
        ref: Reference,
        desc: Descriptor,
        store: ContentStore,
        mount_from: Reference | str | None,
    ) -> BlobPush:
        begun, scopes = await self._start_upload(ref, desc, mount_from)
        if isinstance(begun, str):
            return begun
        location = begun
        if desc.size <= self._chunk_size:
            data = await asyncio.to_thread(store.read, desc.digest)
            put_url = location.copy_merge_params({"digest": desc.digest})
            resp = await self._send(
                "PUT",
                put_url,
                ref,
                scopes,
                headers={"Content-Type": "application/octet-stream"},
                content=data,
            )
        else:
            location = await self._upload_chunks(ref, desc, store, location, scopes)
            put_url = location.copy_merge_params({"digest": desc.digest})
            resp = await self._send("PUT", put_url, ref, scopes, content=b"")
        if resp.status_code not in (201, 204):
            raise _upload_error(resp, desc, ref)
        return "uploaded"

    async def _upload_chunks(
        self,
        ref: Reference,
        desc: Descriptor,
        store: ContentStore,
        location: httpx.URL,
        scopes: str,
    ) -> httpx.URL:
        offset = 0
        with store.open(desc.digest) as f:
            while True:
                chunk = await asyncio.to_thread(f.read, self._chunk_size)
                if not chunk:
                    return location
                end = offset + len(chunk) - 1
                resp = await self._send(
                    "PATCH",
                    location,
                    ref,
                    scopes,
                    headers={
                        "Content-Type": "application/octet-stream",
                        "Content-Range": f"{offset}-{end}",
                    },
                    content=chunk,
                )
                if resp.status_code != 202:
                    raise _upload_error(resp, desc, ref)
                location = _location(resp)
                offset = end + 1


def _upload_error(resp: httpx.Response, desc: Descriptor, ref: Reference) -> RegistryError:
    err = _error(resp, f"push of blob {desc.digest} to {ref.repository} failed")
    if resp.status_code >= 500:
        return _ServerError(str(err))
    return err


async def _drain(resp: httpx.Response) -> None:
    try:
        await resp.aread()
    except httpx.HTTPError as exc:
        req = resp.request
        raise RegistryError(describe(exc, req.method, req.url)) from exc
    finally:
        await resp.aclose()


def _location(resp: httpx.Response) -> httpx.URL:
    loc = resp.headers.get("location")
    if not loc:
        raise RegistryError(
            f"{resp.request.method} {resp.request.url}: {resp.status_code} without a Location"
        )
    # Registries may answer with a path only; it is relative to the request.
    return resp.request.url.join(loc)


async def _read_limited(resp: httpx.Response, limit: int, what: str) -> bytes:
    buf = bytearray()
    try:
        async for chunk in resp.aiter_bytes():
            buf += chunk
            if len(buf) > limit:
                raise DigestMismatchError(
                    f"{what} from {resp.request.url}: more than {limit} bytes"
                )
    except httpx.HTTPError as exc:
        raise RegistryError(describe(exc, "GET", resp.request.url)) from exc
    return bytes(buf)
