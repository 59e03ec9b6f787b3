"""A failed HTTP exchange with a registry, told in one line as BuildKit tells it.

httpx reports ``ConnectError('All connection attempts failed')`` for a refused
port and ``[Errno -2] Name or service not known`` for a bad host name: neither
names the host, and both read as Python internals. BuildKit (Go's net/http)
says ``failed to do request: Head "URL": dial tcp 127.0.0.1:9: connect:
connection refused``. ``describe`` finds the real cause in the exception's
chain (the socket, resolver or TLS error httpx wraps) and words it that way:
one line, the URL and ``host:port`` named, never an exception class name.
"""

from __future__ import annotations

import errno
import os
import socket
import ssl

import httpx

#: getaddrinfo codes meaning "that name does not exist" (Go: "no such host")
_NO_SUCH_HOST = {
    getattr(socket, name)
    for name in ("EAI_NONAME", "EAI_NODATA", "EAI_ADDRFAMILY")
    if hasattr(socket, name)
}


#: OpenSSL's X509_V_ERR_* codes for a chain that ends at no trusted CA
_UNKNOWN_CA = frozenset({18, 19, 20, 21})  # self-signed leaf / in chain, unknown issuer


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and everything it was raised from, outermost first (groups
    flattened: anyio raises one error per address it tried)."""
    out: list[BaseException] = []
    todo: list[BaseException] = [exc]
    seen: set[int] = set()
    while todo:
        e = todo.pop(0)
        if id(e) in seen:
            continue
        seen.add(id(e))
        out.append(e)
        if isinstance(e, BaseExceptionGroup):
            todo.extend(e.exceptions)
        nxt = e.__cause__ or e.__context__
        if nxt is not None:
            todo.append(nxt)
    return out


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _host_port(url: httpx.URL) -> str:
    port = url.port or (443 if url.scheme == "https" else 80)
    host = f"[{url.host}]" if ":" in url.host else url.host
    return f"{host}:{port}"


def _timeout(exc: httpx.HTTPError, key: str) -> str:
    try:
        value = exc.request.extensions.get("timeout", {}).get(key)
    except RuntimeError:  # an exception built without its request
        return ""
    return f" (no answer within {value:g}s)" if isinstance(value, int | float) else ""


def _tls(err: ssl.SSLError) -> str:
    if isinstance(err, ssl.SSLCertVerificationError):
        why = _one_line(str(err.verify_message or err.reason or "certificate rejected"))
        if err.verify_code in _UNKNOWN_CA:
            # Go's words, which say what to do about it: trust the CA
            why = f"certificate signed by unknown authority ({why})"
        return f"tls: failed to verify certificate: x509: {why}"
    if err.reason == "WRONG_VERSION_NUMBER":
        # what a TLS handshake meets when the server speaks plain HTTP
        return "http: server gave HTTP response to HTTPS client"
    why = err.reason or err.strerror or "handshake failed"
    return f"tls: {_one_line(str(why)).lower().replace('_', ' ')}"


def reason(exc: httpx.HTTPError, url: httpx.URL) -> str:
    """Why the exchange with ``url`` failed, in Go's words where Go has them."""
    hp = _host_port(url)
    chain = _chain(exc)
    for e in chain:
        if isinstance(e, ssl.SSLError):
            return _tls(e)
    if isinstance(exc, httpx.ConnectTimeout):
        return f"dial tcp {hp}: i/o timeout{_timeout(exc, 'connect')}"
    if isinstance(exc, httpx.ReadTimeout):
        return f"read tcp {hp}: i/o timeout{_timeout(exc, 'read')}"
    if isinstance(exc, httpx.WriteTimeout):
        return f"write tcp {hp}: i/o timeout{_timeout(exc, 'write')}"
    if isinstance(exc, httpx.PoolTimeout):
        return f"timed out waiting for a free connection to {hp}"
    for e in chain:
        if isinstance(e, socket.gaierror):
            if e.errno in _NO_SUCH_HOST:
                return f"dial tcp: lookup {url.host}: no such host"
            why = _one_line(e.strerror or "name resolution failed").lower()
            return f"dial tcp: lookup {url.host}: {why}"
    op = "dial" if isinstance(exc, httpx.ConnectError) else "read"
    for e in chain:
        if isinstance(e, OSError) and isinstance(e.errno, int) and e.errno > 0:
            what = "connect: " if op == "dial" else ""
            if e.errno == errno.ETIMEDOUT:
                return f"{op} tcp {hp}: {what}i/o timeout"
            return f"{op} tcp {hp}: {what}{os.strerror(e.errno).lower()}"
    if isinstance(exc, httpx.RemoteProtocolError):
        return f"{hp} closed the connection or sent no valid HTTP response (EOF)"
    # No socket error underneath: httpx's own words, which name no class.
    text = next((_one_line(str(e)) for e in chain if _one_line(str(e))), "")
    return text or f"request to {hp} failed"


def describe(exc: httpx.HTTPError, method: str, url: str | httpx.URL) -> str:
    """``failed to do request: Get "URL": <reason>``, as BuildKit's resolver says it."""
    u = httpx.URL(str(url))
    return f'failed to do request: {method.capitalize()} "{u}": {reason(exc, u)}'


def invalid_reason(exc: BaseException) -> str:
    """Why a document from a registry (manifest, config) did not parse, in
    words: ``missing field 'config'`` rather than ``KeyError('config')``."""
    if isinstance(exc, KeyError) and exc.args:
        return f"missing field {exc.args[0]!r}"
    if isinstance(exc, TypeError | AttributeError):
        return "a field has the wrong type"
    return _one_line(str(exc)) or "malformed"
