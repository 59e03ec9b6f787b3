"""The local ssh agents provider: ``--ssh default`` and ``--ssh ID=SOCKET|KEYFILE[,KEYFILE]``.

An id backed by a socket (``$SSH_AUTH_SOCK`` for ``default``) forwards each
connection to that agent. An id backed by key files is served by ``KeyAgent``,
an agent of our own: it answers ``ssh-agent`` protocol requests
(draft-miller-ssh-agent) for listing identities and signing, and refuses
everything that would change it (add, remove, lock). The private keys stay in
this process; the build only ever sees signatures.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import stat
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from ociworker.core.session import Duplex
from ociworker.errors import ConfigError, NotFoundError

# message numbers of the agent protocol
SSH_AGENT_FAILURE = 5
SSH_AGENTC_REQUEST_IDENTITIES = 11
SSH_AGENT_IDENTITIES_ANSWER = 12
SSH_AGENTC_SIGN_REQUEST = 13
SSH_AGENT_SIGN_RESPONSE = 14
SSH_AGENT_RSA_SHA2_256 = 2
SSH_AGENT_RSA_SHA2_512 = 4

#: OpenSSH's own cap on one agent message
MAX_MESSAGE = 256 * 1024

PrivateKey = ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
_KEY_TYPES = (ed25519.Ed25519PrivateKey, ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey)

_CURVES: dict[str, tuple[str, hashes.HashAlgorithm]] = {
    "secp256r1": ("nistp256", hashes.SHA256()),
    "secp384r1": ("nistp384", hashes.SHA384()),
    "secp521r1": ("nistp521", hashes.SHA512()),
}


def _string(b: bytes) -> bytes:
    return struct.pack(">I", len(b)) + b


def _mpint(n: int) -> bytes:
    if n == 0:
        return _string(b"")
    raw = n.to_bytes((n.bit_length() + 8) // 8, "big")  # room for a clear sign bit
    return _string(raw)


class _Reader:
    def __init__(self, data: bytes) -> None:
        self._data = data
        self._pos = 0

    def string(self) -> bytes:
        (n,) = struct.unpack_from(">I", self._data, self._pos)
        start = self._pos + 4
        if start + n > len(self._data):
            raise ValueError("truncated string")
        self._pos = start + n
        return self._data[start : self._pos]

    def uint32(self) -> int:
        (n,) = struct.unpack_from(">I", self._data, self._pos)
        self._pos += 4
        return int(n)


@dataclass(frozen=True)
class Identity:
    key: PrivateKey
    blob: bytes  # the public key in SSH wire format
    comment: str


def load_identity(path: Path) -> Identity:
    """A private key file (OpenSSH or PEM); passphrase-protected keys are refused."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"ssh key {path}: {exc.strerror}") from None
    key: object
    try:
        if b"OPENSSH PRIVATE KEY" in data:
            key = serialization.load_ssh_private_key(data, password=None)
        else:
            key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise ConfigError(
            f"ssh key {path} is protected by a passphrase: load it into an ssh-agent "
            "and use --ssh default instead"
        ) from None
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise ConfigError(f"ssh key {path} cannot be parsed: {exc}") from None
    if not isinstance(key, _KEY_TYPES):
        raise ConfigError(f"ssh key {path}: unsupported key type {type(key).__name__}")
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name not in _CURVES:
        raise ConfigError(f"ssh key {path}: unsupported curve {key.curve.name}")
    openssh = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    return Identity(key, base64.b64decode(openssh.split()[1]), str(path))


def sign(key: PrivateKey, data: bytes, flags: int) -> bytes:
    """An SSH signature blob (``string algorithm, string signature``) of ``data``."""
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return _string(b"ssh-ed25519") + _string(key.sign(data))
    if isinstance(key, ec.EllipticCurvePrivateKey):
        nist, digest = _CURVES[key.curve.name]
        r, s = decode_dss_signature(key.sign(data, ec.ECDSA(digest)))
        return _string(f"ecdsa-sha2-{nist}".encode()) + _string(_mpint(r) + _mpint(s))
    algo: hashes.HashAlgorithm
    if flags & SSH_AGENT_RSA_SHA2_512:
        name, algo = b"rsa-sha2-512", hashes.SHA512()
    elif flags & SSH_AGENT_RSA_SHA2_256:
        name, algo = b"rsa-sha2-256", hashes.SHA256()
    else:
        name, algo = b"ssh-rsa", hashes.SHA1()  # what a request without flags means
    return _string(name) + _string(key.sign(data, padding.PKCS1v15(), algo))


class KeyAgent:
    """An ssh agent holding a fixed set of identities."""

    def __init__(self, identities: Sequence[Identity]) -> None:
        self.identities = tuple(identities)

    def handle(self, msg: bytes) -> bytes:
        """One request (type byte + payload) -> one framed response."""
        if not msg:
            return _frame(bytes([SSH_AGENT_FAILURE]))
        kind, body = msg[0], msg[1:]
        if kind == SSH_AGENTC_REQUEST_IDENTITIES:
            out = bytes([SSH_AGENT_IDENTITIES_ANSWER]) + struct.pack(">I", len(self.identities))
            for ident in self.identities:
                out += _string(ident.blob) + _string(ident.comment.encode())
            return _frame(out)
        if kind == SSH_AGENTC_SIGN_REQUEST:
            try:
                r = _Reader(body)
                blob, data, flags = r.string(), r.string(), r.uint32()
            except (ValueError, struct.error):
                return _frame(bytes([SSH_AGENT_FAILURE]))
            for ident in self.identities:
                if ident.blob == blob:
                    sig = sign(ident.key, data, flags)
                    return _frame(bytes([SSH_AGENT_SIGN_RESPONSE]) + _string(sig))
        # add / remove / lock / extensions: this agent is read-only
        return _frame(bytes([SSH_AGENT_FAILURE]))

    def connect(self) -> Duplex:
        return _AgentConnection(self)


def _frame(payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + payload


class _AgentConnection:
    """A Duplex talking to a ``KeyAgent`` in memory: requests in, responses out."""

    def __init__(self, agent: KeyAgent) -> None:
        self._agent = agent
        self._in = bytearray()
        self._out = bytearray()
        self._closed = False
        self._ready = asyncio.Event()

    async def write(self, data: bytes) -> None:
        if self._closed:
            raise ConnectionResetError("agent connection closed")
        self._in += data
        while len(self._in) >= 4:
            (n,) = struct.unpack_from(">I", self._in)
            if n > MAX_MESSAGE:
                await self.close()
                return
            if len(self._in) < 4 + n:
                break
            msg = bytes(self._in[4 : 4 + n])
            del self._in[: 4 + n]
            self._out += self._agent.handle(msg)
            self._ready.set()

    async def read(self, n: int) -> bytes:
        while not self._out and not self._closed:
            self._ready.clear()
            await self._ready.wait()
        chunk = bytes(self._out[:n])
        del self._out[:n]
        return chunk

    async def close(self) -> None:
        self._closed = True
        self._ready.set()


class _SocketConnection:
    """A Duplex over a unix socket connection to a real agent."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer

    async def read(self, n: int) -> bytes:
        return await self._reader.read(n)

    async def write(self, data: bytes) -> None:
        self._writer.write(data)
        await self._writer.drain()

    async def close(self) -> None:
        self._writer.close()
        with contextlib.suppress(OSError):
            await self._writer.wait_closed()


@dataclass(frozen=True)
class SSHSource:
    """One ``--ssh`` flag: an id and the sockets or key files behind it."""

    id: str
    paths: tuple[str, ...] = ()

    @classmethod
    def parse(cls, text: str) -> SSHSource:
        agent_id, eq, rest = text.partition("=")
        agent_id = agent_id.strip()
        if not agent_id:
            raise ConfigError(f"invalid --ssh {text!r}: want ID[=SOCKET|KEY[,KEY]]")
        paths = tuple(p for p in rest.split(",") if p) if eq else ()
        return cls(agent_id, paths)


class LocalSSHAgents:
    """``core.session.SSHAgents`` served from this process (sockets and key files)."""

    def __init__(
        self, sources: Sequence[SSHSource], environ: Mapping[str, str] | None = None
    ) -> None:
        env = os.environ if environ is None else environ
        self._sockets: dict[str, str] = {}
        self._agents: dict[str, KeyAgent] = {}
        for src in sources:
            paths = list(src.paths)
            if not paths:
                sock = env.get("SSH_AUTH_SOCK", "")
                if not sock:
                    raise ConfigError(
                        f"--ssh {src.id}: invalid empty ssh agent socket: "
                        "make sure SSH_AUTH_SOCK is set"
                    )
                paths = [sock]
            sockets: list[Path] = []
            keys: list[Path] = []
            for p in paths:
                path = Path(p).expanduser()
                try:
                    st = path.stat()
                except OSError as exc:
                    raise ConfigError(f"--ssh {src.id}: {p}: {exc.strerror}") from None
                (sockets if stat.S_ISSOCK(st.st_mode) else keys).append(path)
            if sockets and (keys or len(sockets) > 1):
                raise ConfigError(f"--ssh {src.id}: give one agent socket, or key files")
            if sockets:
                self._sockets[src.id] = str(sockets[0].absolute())
            else:
                self._agents[src.id] = KeyAgent([load_identity(k) for k in keys])

    def has_agent(self, agent_id: str) -> bool:
        return agent_id in self._sockets or agent_id in self._agents

    async def connect_agent(self, agent_id: str) -> Duplex:
        agent = self._agents.get(agent_id)
        if agent is not None:
            return agent.connect()
        sock = self._sockets.get(agent_id)
        if sock is None:
            raise NotFoundError(f"no ssh agent named {agent_id!r} in this session")
        reader, writer = await asyncio.open_unix_connection(sock)
        return _SocketConnection(reader, writer)
