"""Registry failures read as one line in BuildKit's words, naming what failed.

The network failures are real (a closed port, an unresolvable name, a server
that never answers, a self-signed TLS server, a plain-HTTP server spoken to
in TLS) so the causes httpx wraps are the ones a user meets; the expected
words are Go's (``dial tcp HOST:PORT: connect: connection refused``, ``no such
host``, ``i/o timeout``, ``x509``), not derived from the code under test.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import re
import socket
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from ociworker.core.oci import OCI_MANIFEST, Platform
from ociworker.errors import NotFoundError, RegistryError
from ociworker.registry.client import RegistryClient
from ociworker.testing.fake_registry import FakeRegistry, seed_image

AMD64 = Platform("linux", "amd64")

#: what must never reach a user: Python's names for things
_PYTHON_WORDS = re.compile(
    r"ConnectError|ConnectTimeout|ReadTimeout|OSError|gaierror|SSLError|SSLCert|Errno|"
    r"Traceback|httpx|httpcore|_ssl\.c|KeyError|\('|\)\)$"
)


def _assert_one_clean_line(msg: str) -> None:
    assert "\n" not in msg, msg
    assert not _PYTHON_WORDS.search(msg), msg


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _resolve_error(client: RegistryClient, ref: str) -> str:
    with pytest.raises(RegistryError) as info:
        await client.resolve(ref, AMD64)
    msg = str(info.value)
    _assert_one_clean_line(msg)
    return msg


async def test_connection_refused_names_host_and_port() -> None:
    port = _free_port()
    async with RegistryClient() as c:
        msg = await _resolve_error(c, f"127.0.0.1:{port}/x:latest")
    assert msg == (
        f'failed to do request: Get "http://127.0.0.1:{port}/v2/x/manifests/latest": '
        f"dial tcp 127.0.0.1:{port}: connect: connection refused"
    )


async def test_unknown_host_is_no_such_host() -> None:
    # .invalid never resolves (RFC 6761)
    async with RegistryClient() as c:
        msg = await _resolve_error(c, "nosuch.invalid/x:latest")
    assert msg.startswith(
        'failed to do request: Get "https://nosuch.invalid/v2/x/manifests/latest"'
    )
    assert msg.endswith("dial tcp: lookup nosuch.invalid: no such host")


@pytest.fixture
async def silent_server() -> AsyncIterator[int]:
    """A port that accepts connections and never answers."""
    held: list[asyncio.StreamWriter] = []

    async def hold(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    yield server.sockets[0].getsockname()[1]
    for w in held:
        w.close()
    server.close()
    await server.wait_closed()


async def test_no_answer_is_an_io_timeout(silent_server: int) -> None:
    async with RegistryClient(timeout=0.3) as c:
        msg = await _resolve_error(c, f"127.0.0.1:{silent_server}/x:latest")
    assert msg == (
        f'failed to do request: Get "http://127.0.0.1:{silent_server}/v2/x/manifests/latest": '
        f"read tcp 127.0.0.1:{silent_server}: i/o timeout (no answer within 0.3s)"
    )


async def test_connect_timeout_is_a_dial_timeout() -> None:
    # A connect that times out needs a black-holed address; httpx's own
    # exception stands in for it.
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectTimeout("timed out", request=request)

    async with RegistryClient(connect_timeout=2.5, transport=httpx.MockTransport(handler)) as c:
        msg = await _resolve_error(c, "reg.example:5000/x:latest")
    assert msg.endswith("dial tcp reg.example:5000: i/o timeout (no answer within 2.5s)")


class _ToLoopback(httpx.AsyncBaseTransport):
    """Sends every request to 127.0.0.1:``port`` over the real network, keeping
    its scheme: lets an https registry name (the client speaks TLS to
    non-loopback names) reach a local test server."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.inner = httpx.AsyncHTTPTransport()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        copy = httpx.Request(
            request.method,
            request.url.copy_with(host="127.0.0.1", port=self.port),
            headers=request.headers,
            stream=request.stream,
            extensions=request.extensions,
        )
        return await self.inner.handle_async_request(copy)

    async def aclose(self) -> None:
        await self.inner.aclose()


def _self_signed(tmp: Path) -> ssl.SSLContext:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    (tmp / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp / "key.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(tmp / "cert.pem", tmp / "key.pem")
    return ctx


async def _http_404(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        await reader.read(1)
        writer.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()
    except (ConnectionError, ssl.SSLError):
        pass  # the client hung up on a certificate it does not trust
    finally:
        writer.close()


async def test_untrusted_certificate_is_an_x509_error(tmp_path: Path) -> None:
    server = await asyncio.start_server(_http_404, "127.0.0.1", 0, ssl=_self_signed(tmp_path))
    port = server.sockets[0].getsockname()[1]
    try:
        async with RegistryClient(transport=_ToLoopback(port)) as c:
            msg = await _resolve_error(c, "tls.example/x:latest")
    finally:
        server.close()
        await server.wait_closed()
    assert msg.startswith('failed to do request: Get "https://tls.example/v2/x/manifests/latest"')
    # Go's words (what to do: trust the CA), then OpenSSL's reason
    assert (
        "tls: failed to verify certificate: x509: certificate signed by unknown authority "
        "(self-signed certificate)" in msg
    )


async def test_https_to_a_plain_http_server_says_so() -> None:
    server = await asyncio.start_server(_http_404, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with RegistryClient(transport=_ToLoopback(port)) as c:
            msg = await _resolve_error(c, "plain.example/x:latest")
    finally:
        server.close()
        await server.wait_closed()
    assert msg.endswith("http: server gave HTTP response to HTTPS client")


async def test_access_denied_after_authenticating() -> None:
    # Anonymous callers get a token that grants nothing, as Docker Hub does
    # for a private (or missing) repository.
    reg = FakeRegistry(auth="bearer", acl={"": set()})
    seed_image(reg, "private", "v1", [b"layer"])
    async with RegistryClient(transport=reg.transport()) as c:
        msg = await _resolve_error(c, "reg.test/private:v1")
    assert msg.startswith(
        "pull access denied for reg.test/private, repository does not exist or may require "
        "authorization: "
    )
    assert "401 Unauthorized" in msg
    assert "UNAUTHORIZED: authentication required" in msg


async def test_missing_image_is_not_found() -> None:
    async with RegistryClient(transport=FakeRegistry().transport()) as c:
        with pytest.raises(NotFoundError) as info:
            await c.resolve("reg.test/nothing:v1", AMD64)
    assert str(info.value) == "image reg.test/nothing:v1 not found"


async def test_a_registry_error_page_becomes_one_line() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(502, text="<html>\n<body>\nBad gateway\n</body>\n</html>\n")

    async with RegistryClient(transport=httpx.MockTransport(handler)) as c:
        msg = await _resolve_error(c, "reg.example/x:v1")
    assert msg.endswith("502 Bad Gateway: <html> <body> Bad gateway </body> </html>")


async def test_invalid_manifest_names_the_missing_field() -> None:
    reg = FakeRegistry()
    reg.put_manifest("app", "v1", OCI_MANIFEST, json.dumps({"schemaVersion": 2}).encode())
    async with RegistryClient(transport=reg.transport()) as c:
        msg = await _resolve_error(c, "reg.test/app:v1")
    assert msg.endswith("missing field 'config'")
