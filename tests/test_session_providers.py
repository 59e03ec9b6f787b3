"""The local secret and ssh providers: buildx's flag rules, and our own ssh agent
checked against ``cryptography``'s verifiers (no ssh binary needed)."""

from __future__ import annotations

import asyncio
import base64
import struct
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from ociworker.errors import ConfigError
from ociworker.session.secrets import MAX_SECRET_SIZE, LocalSecrets, SecretSource
from ociworker.session.sshagent import (
    SSH_AGENT_FAILURE,
    SSH_AGENT_IDENTITIES_ANSWER,
    SSH_AGENT_RSA_SHA2_256,
    SSH_AGENT_RSA_SHA2_512,
    SSH_AGENT_SIGN_RESPONSE,
    SSH_AGENTC_REQUEST_IDENTITIES,
    SSH_AGENTC_SIGN_REQUEST,
    KeyAgent,
    LocalSSHAgents,
    SSHSource,
    load_identity,
)

# -- secrets ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("id=a,src=/f", SecretSource("a", file="/f")),
        ("id=a,source=/f", SecretSource("a", file="/f")),
        ("id=a,env=VAR", SecretSource("a", env="VAR")),
        ("type=env,id=a,src=VAR", SecretSource("a", env="VAR")),
        ("type=file,id=a,src=/f", SecretSource("a", file="/f")),
        ("id=a", SecretSource("a")),
    ],
)
def test_secret_flags_parse_as_buildx_does(text: str, want: SecretSource) -> None:
    assert SecretSource.parse(text) == want


@pytest.mark.parametrize(
    ("text", "match"),
    [("src=/f", "missing ID"), ("id=a,type=ssm", "unsupported"), ("id=a,x=1", "unexpected key")],
)
def test_bad_secret_flags_are_refused(text: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        SecretSource.parse(text)


async def test_secrets_come_from_files_when_asked_and_from_the_environment(
    tmp_path: Path,
) -> None:
    f = tmp_path / "s"
    f.write_bytes(b"v1")
    named = tmp_path / "byid"
    named.write_bytes(b"file-by-id")
    store = LocalSecrets(
        [
            SecretSource("f", file=str(f)),
            SecretSource("e", env="E"),
            SecretSource("E2"),  # an env var of that name is set: env
            SecretSource(str(named)),  # none is: a file
        ],
        environ={"E": "from-env", "E2": "env2"},
    )
    f.write_bytes(b"v2")  # read when a step asks, not when the build starts
    assert await store.get_secret("f") == b"v2"
    assert await store.get_secret("e") == b"from-env"
    assert await store.get_secret("E2") == b"env2"
    assert await store.get_secret(str(named)) == b"file-by-id"
    assert await store.get_secret("other") is None


def test_a_missing_or_huge_secret_file_fails_at_startup(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="failed to stat"):
        LocalSecrets([SecretSource("x", file=str(tmp_path / "nope"))], environ={})
    big = tmp_path / "big"
    big.write_bytes(b"x" * (MAX_SECRET_SIZE + 1))
    with pytest.raises(ConfigError, match="too big"):
        LocalSecrets([SecretSource("x", file=str(big))], environ={})


# -- ssh agent ------------------------------------------------------------------------------


def _string(b: bytes) -> bytes:
    return struct.pack(">I", len(b)) + b


def _strings(data: bytes) -> list[bytes]:
    out, pos = [], 0
    while pos < len(data):
        (n,) = struct.unpack_from(">I", data, pos)
        out.append(data[pos + 4 : pos + 4 + n])
        pos += 4 + n
    return out


def _write_key(tmp: Path, name: str, key: object, fmt: str = "openssh") -> Path:
    assert isinstance(
        key, ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
    )
    encoding = serialization.Encoding.PEM
    pfmt = (
        serialization.PrivateFormat.OpenSSH
        if fmt == "openssh"
        else serialization.PrivateFormat.TraditionalOpenSSL
    )
    path = tmp / name
    path.write_bytes(key.private_bytes(encoding, pfmt, serialization.NoEncryption()))
    return path


async def _ask(agent: KeyAgent, kind: int, body: bytes = b"") -> tuple[int, bytes]:
    conn = agent.connect()
    msg = bytes([kind]) + body
    # split the request to check the framing reassembles it
    framed = struct.pack(">I", len(msg)) + msg
    await conn.write(framed[:3])
    await conn.write(framed[3:])
    head = await conn.read(4)
    (n,) = struct.unpack(">I", head)
    data = b""
    while len(data) < n:
        data += await conn.read(n - len(data))
    await conn.close()
    assert await conn.read(10) == b""
    return data[0], data[1:]


async def test_our_agent_lists_and_signs_with_ed25519_ecdsa_and_rsa(tmp_path: Path) -> None:
    keys = {
        "ed": ed25519.Ed25519PrivateKey.generate(),
        "ec": ec.generate_private_key(ec.SECP384R1()),
        "rsa": rsa.generate_private_key(public_exponent=65537, key_size=2048),
    }
    paths = [
        _write_key(tmp_path, n, k, "pem" if n == "rsa" else "openssh") for n, k in keys.items()
    ]
    agent = KeyAgent([load_identity(p) for p in paths])

    kind, body = await _ask(agent, SSH_AGENTC_REQUEST_IDENTITIES)
    assert kind == SSH_AGENT_IDENTITIES_ANSWER
    (count,) = struct.unpack_from(">I", body)
    blobs = _strings(body[4:])[::2]
    assert count == 3 and len(blobs) == 3

    data = b"session-id and request to sign"
    for (name, key), blob in zip(keys.items(), blobs, strict=True):
        pub = serialization.load_ssh_public_key(_strings(blob)[0] + b" " + base64.b64encode(blob))
        assert pub.public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        ) == key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
        flag_cases = [(0, None)]
        if name == "rsa":
            flag_cases = [
                (0, (b"ssh-rsa", hashes.SHA1())),
                (SSH_AGENT_RSA_SHA2_256, (b"rsa-sha2-256", hashes.SHA256())),
                (SSH_AGENT_RSA_SHA2_512, (b"rsa-sha2-512", hashes.SHA512())),
            ]
        for flags, rsa_algo in flag_cases:
            req = _string(blob) + _string(data) + struct.pack(">I", flags)
            kind, body = await _ask(agent, SSH_AGENTC_SIGN_REQUEST, req)
            assert kind == SSH_AGENT_SIGN_RESPONSE
            (sig_blob,) = _strings(body)
            algo, sig = _strings(sig_blob)
            if isinstance(pub, ed25519.Ed25519PublicKey):
                assert algo == b"ssh-ed25519"
                pub.verify(sig, data)
            elif isinstance(pub, ec.EllipticCurvePublicKey):
                assert algo == b"ecdsa-sha2-nistp384"
                r, s = (int.from_bytes(x, "big") for x in _strings(sig))
                pub.verify(encode_dss_signature(r, s), data, ec.ECDSA(hashes.SHA384()))
            else:
                assert isinstance(pub, rsa.RSAPublicKey) and rsa_algo is not None
                assert algo == rsa_algo[0]
                pub.verify(sig, data, padding.PKCS1v15(), rsa_algo[1])

    # an unknown key, and every request that would change the agent, fail
    other = ed25519.Ed25519PrivateKey.generate().public_key()
    blob = base64.b64decode(
        other.public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        ).split()[1]
    )
    req = _string(blob) + _string(data) + struct.pack(">I", 0)
    assert (await _ask(agent, SSH_AGENTC_SIGN_REQUEST, req))[0] == SSH_AGENT_FAILURE
    for kind in (17, 18, 19, 22, 25, 27):  # add, remove, remove all, lock, add constrained, ext
        assert (await _ask(agent, kind, b"\0\0\0\0"))[0] == SSH_AGENT_FAILURE


def test_passphrase_keys_and_bad_ssh_flags_are_refused(tmp_path: Path) -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    path = tmp_path / "enc"
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"pw"),
        )
    )
    with pytest.raises(ConfigError, match="passphrase"):
        LocalSSHAgents([SSHSource("k", (str(path),))])
    with pytest.raises(ConfigError, match="SSH_AUTH_SOCK"):
        LocalSSHAgents([SSHSource.parse("default")], environ={})
    with pytest.raises(ConfigError, match="No such file"):
        LocalSSHAgents([SSHSource.parse(f"k={tmp_path / 'nope'}")])
    assert SSHSource.parse("a=/x,/y") == SSHSource("a", ("/x", "/y"))


async def test_a_socket_id_forwards_to_that_agent(tmp_path: Path) -> None:
    # a stand-in agent that echoes, to see bytes go both ways through the Duplex
    path = tmp_path / "sock"

    async def echo(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(await r.read(100))
        await w.drain()
        w.close()
        await w.wait_closed()

    server = await asyncio.start_unix_server(echo, path=str(path))
    try:
        agents = LocalSSHAgents([SSHSource.parse("default")], environ={"SSH_AUTH_SOCK": str(path)})
        assert agents.has_agent("default") and not agents.has_agent("x")
        conn = await agents.connect_agent("default")
        await conn.write(b"ping")
        assert await conn.read(100) == b"ping"
        await conn.close()
    finally:
        server.close()
        await server.wait_closed()
