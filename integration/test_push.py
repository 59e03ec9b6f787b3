"""Pushing to a real registry: Debian's ``docker-registry`` started by these tests
(one plain-HTTP, one with htpasswd auth and TLS from a CA made here with
openssl), read back by skopeo and by a private Docker Engine.

What the registry received is read from its own access log, so "a second push
uploads nothing" is the registry's word, not our counters'.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import shutil
import socket
import ssl
import subprocess
import sys
import tarfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

import pytest

from dockerd import Dockerd, dockerd

__all__ = ["dockerd"]  # the fixture is used by name

pytestmark = pytest.mark.integration

REGISTRY_BIN = "/usr/bin/docker-registry"
MESSAGE = "pushed-and-pulled"
#: an access-log line of the registry: "METHOD URI HTTP/1.1" STATUS
_ACCESS = re.compile(r'"(GET|HEAD|PUT|POST|PATCH|DELETE) (\S+) HTTP/[\d.]+" (\d{3})')

OCI_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
OCI_TAR = "application/vnd.oci.image.layer.v1.tar"
DOCKER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Registry:
    addr: str
    log: Path
    proc: subprocess.Popen[bytes]
    ca: Path | None = None

    def requests(self) -> list[tuple[str, str, int]]:
        """(method, uri, status) of every request the registry has answered."""
        text = self.log.read_text(errors="replace")
        return [(m, u, int(s)) for m, u, s in _ACCESS.findall(text)]

    def requests_since(self, before: int, tag: str = "") -> list[tuple[str, str, int]]:
        """The requests after the first ``before``, up to the push's last one (its
        manifest PUT, of ``tag`` if given): the registry logs a request just
        after answering it."""
        deadline = time.monotonic() + 10
        while True:
            got = self.requests()[before:]
            puts = [u for m, u, _ in got if m == "PUT" and "/manifests/" in u]
            if any(u.endswith(f"/manifests/{tag}") for u in puts) if tag else puts:
                return got
            if time.monotonic() > deadline:
                raise AssertionError(f"no manifest PUT in the registry's log: {got}")
            time.sleep(0.05)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def start_registry(
    tmp: Path, *, tls: tuple[Path, Path, Path] | None = None, htpasswd: Path | None = None
) -> Registry:
    """A registry of our own on 127.0.0.1:<free port>; ``tls`` is (ca, cert, key)."""
    if not Path(REGISTRY_BIN).is_file():
        pytest.fail("needs docker-registry (run scripts/setup-host)")
    port = _free_port()
    cfg = [
        "version: 0.1",
        "log: {level: info}",
        f"storage: {{filesystem: {{rootdirectory: {tmp / 'storage'}}}}}",
        "http:",
        f"  addr: 127.0.0.1:{port}",
        "  secret: push-tests-only",
    ]
    if tls is not None:
        cfg += ["  tls:", f"    certificate: {tls[1]}", f"    key: {tls[2]}"]
    if htpasswd is not None:
        cfg += ["auth:", "  htpasswd:", "    realm: push-tests", f"    path: {htpasswd}"]
    config = tmp / "registry.yml"
    config.write_text("\n".join(cfg) + "\n")
    log = tmp / "registry.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([REGISTRY_BIN, "serve", str(config)], stdout=out, stderr=out)
    reg = Registry(f"127.0.0.1:{port}", log, proc, tls[0] if tls else None)
    scheme = "https" if tls else "http"
    ctx = ssl.create_default_context(cafile=str(tls[0])) if tls else None
    deadline = time.monotonic() + 20
    while True:
        try:
            urllib.request.urlopen(f"{scheme}://{reg.addr}/v2/", timeout=1, context=ctx)
            break
        except urllib.error.HTTPError as e:
            if e.code == 401:  # up, and asking for credentials
                break
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            reg.stop()
            pytest.fail(f"registry did not start:\n{log.read_text()[-2000:]}")
        time.sleep(0.1)
    return reg


@pytest.fixture(scope="module")
def plain_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    reg = start_registry(tmp_path_factory.mktemp("registry"))
    yield reg
    reg.stop()


@pytest.fixture
def docker_config(tmp_path: Path) -> Path:
    """An empty docker config: the host's own logins play no part."""
    d = tmp_path / "docker-config"
    d.mkdir()
    (d / "config.json").write_text("{}")
    return d


def ow(
    root: Path, *args: str, docker_config: Path, check: bool = True
) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "ociworker", "build", "--root", str(root), *args]
    env = {**os.environ, "DOCKER_CONFIG": str(docker_config)}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"ociworker build failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def write_context(tmp: Path, base: str, message: str = MESSAGE) -> Path:
    ctx = tmp / f"ctx-{uuid.uuid4().hex[:6]}"
    ctx.mkdir()
    (ctx / "Dockerfile").write_text(
        f'FROM {base}\nRUN echo {message} > /msg\nCMD ["cat", "/msg"]\n'
    )
    return ctx


def skopeo(*args: str) -> str:
    proc = subprocess.run(["skopeo", *args], capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise AssertionError(f"skopeo {' '.join(args)}: {proc.stderr}")
    return proc.stdout


def inspect(ref: str, *flags: str) -> dict[str, object]:
    out: dict[str, object] = json.loads(
        skopeo("inspect", "--tls-verify=false", *flags, f"docker://{ref}")
    )
    return out


def raw_manifest(ref: str) -> dict[str, object]:
    return inspect(ref, "--raw")


def build_digest(meta: Path) -> str:
    digest: str = json.loads(meta.read_text())["containerimage.digest"]
    return digest


def uploads(requests: list[tuple[str, str, int]]) -> list[tuple[str, str, int]]:
    """Requests that start or carry a blob upload (a mount is a POST too)."""
    return [r for r in requests if "/blobs/uploads/" in r[1] and r[0] in ("POST", "PATCH", "PUT")]


# --- the three spellings --------------------------------------------------------------


@pytest.mark.parametrize("spelling", ["push-flag", "image-push", "registry"])
def test_each_spelling_pushes_what_the_build_reports(
    spelling: str,
    plain_registry: Registry,
    base_image: str,
    state_dir: Path,
    tmp_path: Path,
    docker_config: Path,
    require_root: None,
) -> None:
    ref = f"{plain_registry.addr}/spell/{spelling}:v1"
    flags = {
        "push-flag": ["-t", ref, "--push"],
        "image-push": ["--output", f"type=image,name={ref},push=true"],
        "registry": ["--output", f"type=registry,name={ref}"],
    }[spelling]
    meta = tmp_path / "meta.json"
    ctx = write_context(tmp_path, base_image)
    proc = ow(
        state_dir,
        *flags,
        "--progress=plain",
        "--metadata-file",
        str(meta),
        str(ctx),
        docker_config=docker_config,
    )
    digest = build_digest(meta)
    # the registry serves, under the tag, the manifest the build reported
    assert inspect(ref)["Digest"] == digest
    assert json.loads(meta.read_text())["image.name"] == ref
    # BuildKit's progress: the blobs, then the manifest with its digest
    assert "pushing layers" in proc.stderr
    assert f"pushing manifest for {ref}@{digest}" in proc.stderr
    # every blob the manifest names got a line of its own
    raw = raw_manifest(ref)
    blobs = [raw["config"], *raw["layers"]]  # type: ignore[list-item]
    for b in blobs:
        assert re.search(rf"{b['digest']}: (pushed|already exists|mounted)", proc.stderr)


def test_docker_pulls_and_runs_the_pushed_image(
    plain_registry: Registry,
    base_image: str,
    state_dir: Path,
    tmp_path: Path,
    docker_config: Path,
    dockerd: Dockerd,
    require_root: None,
) -> None:
    ref = f"{plain_registry.addr}/docker/run:{uuid.uuid4().hex[:8]}"
    message = f"hello-{uuid.uuid4().hex[:8]}"
    meta = tmp_path / "meta.json"
    ctx = write_context(tmp_path, base_image, message)
    ow(
        state_dir,
        "-t",
        ref,
        "--push",
        "--metadata-file",
        str(meta),
        str(ctx),
        docker_config=docker_config,
    )
    pulled = dockerd.docker("pull", ref)
    assert build_digest(meta) in pulled.stdout  # docker prints the digest it pulled
    run = dockerd.docker("run", "--rm", "--network=none", ref)
    assert run.stdout == message + "\n"  # what the Dockerfile's RUN wrote and CMD prints
    dockerd.docker("rmi", ref)


def _blobs(ref: str) -> set[str]:
    raw = raw_manifest(ref)
    return {raw["config"]["digest"], *(la["digest"] for la in raw["layers"])}  # type: ignore[index, attr-defined]


def _uploaded_digests(reqs: list[tuple[str, str, int]]) -> set[str]:
    """Blobs whose upload the registry completed (the PUT naming the digest)."""
    out = set()
    for m, u, _ in uploads(reqs):
        found = re.search(r"digest=(sha256:[0-9a-f]{64})", unquote(u))
        if m == "PUT" and found:
            out.add(found.group(1))
    return out


def test_a_second_push_uploads_no_blob(
    plain_registry: Registry,
    base_image: str,
    state_dir: Path,
    tmp_path: Path,
    docker_config: Path,
    require_root: None,
) -> None:
    repo = f"{plain_registry.addr}/again/img"
    ctx = write_context(tmp_path, base_image, f"again-{uuid.uuid4().hex[:8]}")
    before = len(plain_registry.requests())
    # one image, pushed under two tags of one repository: the second push finds
    # every blob there
    proc = ow(
        state_dir,
        "-t",
        f"{repo}:1",
        "-t",
        f"{repo}:2",
        "--push",
        "--progress=plain",
        str(ctx),
        docker_config=docker_config,
    )
    reqs = plain_registry.requests_since(before, "2")
    first_put = next(i for i, (m, u, _) in enumerate(reqs) if u.endswith("/manifests/1"))
    second = reqs[first_put + 1 :]
    blobs = _blobs(f"{repo}:2")
    assert _blobs(f"{repo}:1") == blobs
    heads = {u.rsplit("/", 1)[1] for m, u, s in second if m == "HEAD" and "/blobs/" in u}
    assert heads == blobs and all(s == 200 for m, u, s in second if m == "HEAD"), second
    assert uploads(second) == []
    assert proc.stderr.count(": already exists") == len(blobs)
    # a cached rebuild is the same image (steps are dated by their layers, as in
    # BuildKit): nothing to upload
    before = len(plain_registry.requests())
    ow(state_dir, "-t", f"{repo}:3", "--push", str(ctx), docker_config=docker_config)
    rebuilt = plain_registry.requests_since(before)
    assert _blobs(f"{repo}:3") == blobs
    assert _uploaded_digests(rebuilt) == set()


def test_base_layers_are_mounted_from_the_repository_they_came_from(
    plain_registry: Registry,
    base_image: str,
    state_dir: Path,
    tmp_path: Path,
    docker_config: Path,
    require_root: None,
) -> None:
    tag = uuid.uuid4().hex[:8]
    first = f"{plain_registry.addr}/mount/base:{tag}"
    ow(
        state_dir,
        "-t",
        first,
        "--push",
        str(write_context(tmp_path, base_image, "base")),
        docker_config=docker_config,
    )
    base_layers = [d["digest"] for d in raw_manifest(first)["layers"]]  # type: ignore[attr-defined]
    # a fresh worker pulls `first` from this registry and builds on it
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    second = f"{plain_registry.addr}/mount/app:{tag}"
    before = len(plain_registry.requests())
    ow(
        fresh,
        "-t",
        second,
        "--push",
        str(write_context(tmp_path, first, "app")),
        docker_config=docker_config,
    )
    reqs = plain_registry.requests_since(before)
    for digest in base_layers:
        mounted = [
            (m, u, s)
            for m, u, s in uploads(reqs)
            if f"mount={digest}" in unquote(u) and "from=mount/base" in unquote(u)
        ]
        assert mounted and mounted[0][2] == 201, f"{digest} was not mounted: {uploads(reqs)}"
        assert not any(f"digest={digest}" in u for m, u, s in uploads(reqs) if m == "PUT")
    assert [d["digest"] for d in raw_manifest(second)["layers"]][: len(base_layers)] == base_layers
    # what the worker pushed itself is mounted too when it goes to another repository
    third = f"{plain_registry.addr}/mount/copy:{tag}"
    before = len(plain_registry.requests())
    ow(
        fresh,
        "--output",
        f"type=registry,name={third}",
        str(write_context(tmp_path, first, "app")),
        docker_config=docker_config,
    )
    reqs = plain_registry.requests_since(before)
    mounted = {
        unquote(u).split("mount=", 1)[1].split("&", 1)[0]
        for m, u, s in uploads(reqs)
        if m == "POST" and s == 201 and "mount=" in u
    }
    # every layer, the built one too, is mounted from where this worker put it;
    # only what no repository had yet is uploaded
    layers = {d["digest"] for d in raw_manifest(third)["layers"]}  # type: ignore[attr-defined]
    assert mounted >= layers
    assert _uploaded_digests(reqs) == _blobs(third) - mounted  # type: ignore[attr-defined]


# --- image options -----------------------------------------------------------------


def _base_layer_count(base_image: str) -> int:
    return len(raw_manifest(base_image)["layers"])  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("options", "manifest_type", "base_type", "own_type"),
    [
        ("compression=zstd", OCI_MANIFEST, OCI_GZIP, OCI_ZSTD),
        ("compression=zstd,force-compression=true", OCI_MANIFEST, OCI_ZSTD, OCI_ZSTD),
        ("compression=uncompressed", OCI_MANIFEST, OCI_GZIP, OCI_TAR),
        ("compression=uncompressed,force-compression=true", OCI_MANIFEST, OCI_TAR, OCI_TAR),
        ("oci-mediatypes=false", DOCKER_MANIFEST, DOCKER_GZIP, DOCKER_GZIP),
    ],
)
def test_image_options_show_in_the_pushed_manifest(
    options: str,
    manifest_type: str,
    base_type: str,
    own_type: str,
    plain_registry: Registry,
    base_image: str,
    state_dir: Path,
    tmp_path: Path,
    docker_config: Path,
    require_root: None,
) -> None:
    assert raw_manifest(base_image)["layers"][0]["mediaType"] == OCI_GZIP  # type: ignore[index]
    ref = f"{plain_registry.addr}/opts/img:{uuid.uuid4().hex[:8]}"
    ctx = write_context(tmp_path, base_image, f"opts-{uuid.uuid4().hex[:6]}")
    ow(
        state_dir,
        "--output",
        f"type=registry,name={ref},{options}",
        str(ctx),
        docker_config=docker_config,
    )
    raw = raw_manifest(ref)
    assert raw["mediaType"] == manifest_type
    types = [la["mediaType"] for la in raw["layers"]]  # type: ignore[attr-defined]
    n = _base_layer_count(base_image)
    assert types == [base_type] * n + [own_type]
    # whatever the codec, the layers hold the same tars: the config's diffIDs do not move
    config = inspect(ref, "--config")
    base_config = inspect(base_image, "--config")
    assert config["rootfs"]["diff_ids"][:n] == base_config["rootfs"]["diff_ids"]  # type: ignore[index]
    # and skopeo can copy it whole (every blob there, each matching its digest)
    skopeo("copy", "--src-tls-verify=false", f"docker://{ref}", f"oci:{tmp_path / 'copy'}:x")


def test_labels_and_annotations(
    plain_registry: Registry,
    base_image: str,
    state_dir: Path,
    tmp_path: Path,
    docker_config: Path,
    require_root: None,
) -> None:
    ref = f"{plain_registry.addr}/meta/img:{uuid.uuid4().hex[:8]}"
    ctx = write_context(tmp_path, base_image)
    (ctx / "Dockerfile").write_text(
        (ctx / "Dockerfile").read_text() + "LABEL from.dockerfile=df overridden=by-dockerfile\n"
    )
    ow(
        state_dir,
        "-t",
        ref,
        "--push",
        "--label",
        "com.example.team=builders",
        "--label",
        "overridden=by-flag",
        "--annotation",
        "org.opencontainers.image.title=demo",
        "--annotation",
        "manifest:com.example.note=a=b",
        str(ctx),
        docker_config=docker_config,
    )
    labels = inspect(ref, "--config")["config"]["Labels"]  # type: ignore[index]
    assert labels == {
        "from.dockerfile": "df",
        "overridden": "by-flag",  # --label wins over LABEL, as with docker build
        "com.example.team": "builders",
    }
    assert raw_manifest(ref)["annotations"] == {
        "org.opencontainers.image.title": "demo",
        "com.example.note": "a=b",
    }


def test_annotations_need_oci_media_types(
    plain_registry: Registry,
    base_image: str,
    state_dir: Path,
    tmp_path: Path,
    docker_config: Path,
    require_root: None,
) -> None:
    ref = f"{plain_registry.addr}/meta/docker:{uuid.uuid4().hex[:8]}"
    proc = ow(
        state_dir,
        "--output",
        f"type=registry,name={ref},oci-mediatypes=false",
        "--annotation",
        "k=v",
        str(write_context(tmp_path, base_image)),
        docker_config=docker_config,
        check=False,
    )
    assert proc.returncode == 1
    assert "annotations need OCI media types" in proc.stderr
    assert "Traceback" not in proc.stderr


# --- auth and TLS ------------------------------------------------------------------


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_ca(tmp: Path, name: str) -> tuple[Path, Path]:
    """A CA (cert, key) made with openssl."""
    key, cert = tmp / f"{name}.key", tmp / f"{name}.crt"
    _openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        f"/CN={name}",
        "-keyout",
        str(key),
        "-out",
        str(cert),
        cwd=tmp,
    )
    return cert, key


def make_server_cert(tmp: Path, ca: tuple[Path, Path]) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 signed by ``ca``."""
    key, csr, cert = tmp / "server.key", tmp / "server.csr", tmp / "server.crt"
    ext = tmp / "san.ext"
    ext.write_text("subjectAltName=IP:127.0.0.1\n")
    _openssl(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=127.0.0.1",
        "-keyout",
        str(key),
        "-out",
        str(csr),
        cwd=tmp,
    )
    _openssl(
        "x509",
        "-req",
        "-in",
        str(csr),
        "-CA",
        str(ca[0]),
        "-CAkey",
        str(ca[1]),
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        str(ext),
        "-out",
        str(cert),
        cwd=tmp,
    )
    return cert, key


USER, PASSWORD = "pusher", "s3cret-pass"


@pytest.fixture(scope="module")
def secure_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    if shutil.which("htpasswd") is None:
        pytest.fail("needs htpasswd (apache2-utils; run scripts/setup-host)")
    tmp = tmp_path_factory.mktemp("secure-registry")
    ca = make_ca(tmp, "push-test-ca")
    cert, key = make_server_cert(tmp, ca)
    htpasswd = tmp / "htpasswd"
    subprocess.run(
        ["htpasswd", "-Bbc", str(htpasswd), USER, PASSWORD], check=True, capture_output=True
    )
    reg = start_registry(tmp, tls=(ca[0], cert, key), htpasswd=htpasswd)
    yield reg
    reg.stop()


def login(tmp: Path, registry: str, user: str, password: str) -> Path:
    """A DOCKER_CONFIG holding what ``docker login`` writes."""
    d = tmp / f"docker-{uuid.uuid4().hex[:6]}"
    d.mkdir()
    auth = base64.b64encode(f"{user}:{password}".encode()).decode()
    (d / "config.json").write_text(json.dumps({"auths": {registry: {"auth": auth}}}))
    return d


def test_push_with_password_and_tls(
    secure_registry: Registry,
    base_image: str,
    state_dir: Path,
    tmp_path: Path,
    dockerd: Dockerd,
    require_root: None,
) -> None:
    assert secure_registry.ca is not None
    ref = f"{secure_registry.addr}/private/app:1"
    message = f"private-{uuid.uuid4().hex[:8]}"
    meta = tmp_path / "meta.json"
    ow(
        state_dir,
        "-t",
        ref,
        "--push",
        "--registry-ca",
        f"{secure_registry.addr}={secure_registry.ca}",
        "--metadata-file",
        str(meta),
        str(write_context(tmp_path, base_image, message)),
        docker_config=login(tmp_path, secure_registry.addr, USER, PASSWORD),
    )
    certs = tmp_path / "certs"
    certs.mkdir()
    shutil.copy(secure_registry.ca, certs / "ca.crt")
    got = json.loads(
        skopeo(
            "inspect", "--cert-dir", str(certs), "--creds", f"{USER}:{PASSWORD}", f"docker://{ref}"
        )
    )
    assert got["Digest"] == build_digest(meta)
    # and Docker Engine, logged in (127.0.0.0/8 is one of its insecure registries:
    # it speaks TLS without checking the CA), pulls and runs it
    docker_login = subprocess.run(
        [
            "/usr/bin/docker",
            "-H",
            f"unix://{dockerd.socket}",
            "login",
            "-u",
            USER,
            "--password-stdin",
            secure_registry.addr,
        ],
        input=PASSWORD,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "DOCKER_CONFIG": str(dockerd.client_config)},
    )
    assert docker_login.returncode == 0, docker_login.stderr
    try:
        assert build_digest(meta) in dockerd.docker("pull", ref).stdout
        assert dockerd.docker("run", "--rm", "--network=none", ref).stdout == message + "\n"
        dockerd.docker("rmi", ref)
    finally:
        dockerd.docker("logout", secure_registry.addr, check=False)


def test_wrong_password_fails_clearly_and_keeps_the_local_image(
    secure_registry: Registry,
    base_image: str,
    state_dir: Path,
    tmp_path: Path,
    require_root: None,
) -> None:
    assert secure_registry.ca is not None
    ref = f"{secure_registry.addr}/private/denied:1"
    message = f"kept-{uuid.uuid4().hex[:8]}"
    proc = ow(
        state_dir,
        "-t",
        ref,
        "--push",
        "--registry-ca",
        f"{secure_registry.addr}={secure_registry.ca}",
        str(write_context(tmp_path, base_image, message)),
        docker_config=login(tmp_path, secure_registry.addr, USER, "wrong-password"),
        check=False,
    )
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("ERROR: ") and f"failed to push {ref}" in last
    assert "401 Unauthorized" in last and "authentication required" in last
    # the image is still in the image store under its -t name: a build FROM it
    # needs no registry (it would be refused one) and sees the first build's file
    ctx = tmp_path / "from-local"
    ctx.mkdir()
    (ctx / "Dockerfile").write_text(f"FROM {ref}\nRUN cat /msg > /copy\n")
    ow(
        state_dir,
        "-o",
        f"type=local,dest={tmp_path / 'out'}",
        str(ctx),
        docker_config=login(tmp_path, secure_registry.addr, USER, "wrong-password"),
    )
    assert (tmp_path / "out" / "copy").read_text() == message + "\n"


@pytest.mark.parametrize("how", ["another-ca", "no-ca", "plain-http"])
def test_unknown_ca_fails_clearly(
    how: str,
    secure_registry: Registry,
    base_image: str,
    state_dir: Path,
    tmp_path: Path,
    require_root: None,
) -> None:
    ref = f"{secure_registry.addr}/private/untrusted:1"
    if how == "another-ca":
        other, _ = make_ca(tmp_path, "some-other-ca")
        flags = ["--registry-ca", f"{secure_registry.addr}={other}"]
    elif how == "no-ca":
        # over HTTPS (not loopback's plain HTTP) with only the system's CAs
        flags = ["--registry-ca", f"{secure_registry.addr}=/etc/ssl/certs/ca-certificates.crt"]
    else:
        flags = []  # loopback: plain HTTP, which a TLS registry refuses
    proc = ow(
        state_dir,
        "-t",
        ref,
        "--push",
        *flags,
        str(write_context(tmp_path, base_image)),
        docker_config=login(tmp_path, secure_registry.addr, USER, PASSWORD),
        check=False,
    )
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert f"failed to push {ref}" in last
    if how == "plain-http":
        assert "400 Bad Request: the registry may speak only HTTPS" in last
        assert f"--registry-ca {secure_registry.addr}=FILE" in last
    else:
        assert "x509: certificate signed by unknown authority" in last


# --- over the daemon ---------------------------------------------------------------


def test_push_over_a_daemon_with_its_config_ca_and_the_clients_login(
    secure_registry: Registry,
    base_image: str,
    tmp_path: Path,
    require_root: None,
) -> None:
    from ociworker.testing.daemon import spawn_daemon

    assert secure_registry.ca is not None
    config = tmp_path / "ociworker.toml"
    config.write_text(f'[registry."{secure_registry.addr}"]\nca = ["{secure_registry.ca}"]\n')
    sock = tmp_path / "d.sock"
    proc = spawn_daemon(
        ("--addr", f"unix://{sock}", "--root", str(tmp_path / "droot"), "--config", str(config)),
        tmp_path / "daemon.log",
    )
    try:
        ref = f"{secure_registry.addr}/private/via-daemon:1"
        meta = tmp_path / "meta.json"
        env = {
            **os.environ,
            # the login lives with the client; the daemon borrows it through the session
            "DOCKER_CONFIG": str(login(tmp_path, secure_registry.addr, USER, PASSWORD)),
        }
        cmd = [sys.executable, "-m", "ociworker", "build", "--addr", f"unix://{sock}"]
        ctx = write_context(tmp_path, base_image)
        build = subprocess.run(
            [
                *cmd,
                "-t",
                ref,
                "--push",
                "--progress=rawjson",
                "--metadata-file",
                str(meta),
                str(ctx),
            ],
            capture_output=True,
            text=True,
            timeout=300,
            env=env,
        )
        assert build.returncode == 0, build.stderr
        digest = build_digest(meta)
        statuses = [json.loads(line) for line in build.stderr.splitlines() if line.startswith("{")]
        names = {v["name"] for s in statuses for v in s.get("vertexes") or []}
        assert "pushing layers" in names
        assert f"pushing manifest for {ref}@{digest}" in names
        certs = tmp_path / "certs"
        certs.mkdir()
        shutil.copy(secure_registry.ca, certs / "ca.crt")
        got = json.loads(
            skopeo(
                "inspect",
                "--cert-dir",
                str(certs),
                "--creds",
                f"{USER}:{PASSWORD}",
                f"docker://{ref}",
            )
        )
        assert got["Digest"] == digest
        # a wrong login from this client is refused, with the registry's words
        env["DOCKER_CONFIG"] = str(login(tmp_path, secure_registry.addr, USER, "nope"))
        denied = subprocess.run(
            [*cmd, "-t", f"{secure_registry.addr}/private/via-daemon:2", "--push", str(ctx)],
            capture_output=True,
            text=True,
            timeout=300,
            env=env,
        )
        assert denied.returncode == 1
        assert "Traceback" not in denied.stderr
        assert "authentication required" in denied.stderr.strip().splitlines()[-1]
    finally:
        proc.terminate()
        assert proc.wait(timeout=60) == 0


# --- a network that breaks mid-upload ----------------------------------------------


class CuttingProxy:
    """A TCP proxy in front of a registry that drops the connection of the
    first ``cuts`` requests uploading a blob (a ``PUT``/``PATCH`` to
    ``/blobs/uploads/``) after part of the body went through: a network
    failure mid-upload, as the worker sees it."""

    def __init__(self, upstream: str, cuts: int) -> None:
        import threading

        self.cuts = cuts
        self.cut = 0
        self._upstream = upstream
        self._srv = socket.socket()
        self._srv.bind(("127.0.0.1", 0))
        self._srv.listen(16)
        self.addr = f"127.0.0.1:{self._srv.getsockname()[1]}"
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self._srv.close()

    def _accept(self) -> None:
        import threading

        while True:
            try:
                client, _ = self._srv.accept()
            except OSError:
                return
            host, port = self._upstream.rsplit(":", 1)
            up = socket.create_connection((host, int(port)))
            threading.Thread(target=self._pipe, args=(client, up, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(up, client, False), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, from_client: bool) -> None:
        try:
            while data := src.recv(65536):
                if from_client and re.match(rb"(PUT|PATCH) /v2/\S+/blobs/uploads/", data):
                    with self._lock:
                        cut = self.cut < self.cuts
                        self.cut += cut
                    if cut:
                        dst.sendall(data[: len(data) // 2])
                        break
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()


@pytest.mark.parametrize("cuts", [2, 99])
def test_an_upload_the_network_cuts_is_retried_then_fails_naming_the_blob(
    cuts: int,
    plain_registry: Registry,
    base_image: str,
    state_dir: Path,
    tmp_path: Path,
    docker_config: Path,
    require_root: None,
) -> None:
    proxy = CuttingProxy(plain_registry.addr, cuts)
    try:
        ref = f"{proxy.addr}/cut/img:{cuts}"
        message = f"cut-{uuid.uuid4().hex[:8]}"
        meta = tmp_path / "meta.json"
        archive = tmp_path / "image.tar"
        proc = ow(
            state_dir,
            "-t",
            ref,
            "--output",
            "type=registry",
            "--output",
            f"type=oci,dest={archive}",
            "--metadata-file",
            str(meta),
            str(write_context(tmp_path, base_image, message)),
            docker_config=docker_config,
            check=False,
        )
    finally:
        proxy.close()
    if cuts == 2:
        # two uploads cut, each tried again: the push went through
        assert proc.returncode == 0, proc.stderr
        assert proxy.cut == cuts
        assert inspect(f"{plain_registry.addr}/cut/img:2")["Digest"] == build_digest(meta)
        return
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert f"failed to push {ref}" in last
    found = re.search(
        rf"failed to push blob (sha256:[0-9a-f]{{64}}) to {proxy.addr}/cut/img after 3 tries", last
    )
    assert found, last
    # the other output was written before the push, and the blob named is one of its image's
    with tarfile.open(archive) as tf:
        index = json.load(tf.extractfile("index.json"))  # type: ignore[arg-type]
        digest = index["manifests"][0]["digest"]
        manifest = json.load(tf.extractfile(f"blobs/sha256/{digest[7:]}"))  # type: ignore[arg-type]
    assert found.group(1) in {
        manifest["config"]["digest"],
        *(la["digest"] for la in manifest["layers"]),
    }
    # the -t name is kept in the image store: a build FROM it needs no registry
    ctx = tmp_path / "from-local"
    ctx.mkdir()
    (ctx / "Dockerfile").write_text(f"FROM {ref}\nRUN cat /msg > /copy\n")
    ow(
        state_dir,
        "-o",
        f"type=local,dest={tmp_path / 'out'}",
        str(ctx),
        docker_config=docker_config,
    )
    assert (tmp_path / "out" / "copy").read_text() == message + "\n"


def test_a_media_type_the_registry_refuses_shows_its_message(plain_registry: Registry) -> None:
    # Our builds make only the manifests registries know; a client pushing
    # another kind meets the registry's refusal, which must reach the user whole.
    import asyncio

    from ociworker.errors import RegistryError
    from ociworker.registry.client import RegistryClient

    media_type = "application/vnd.example.unknown+json"
    data = json.dumps({"schemaVersion": 2, "mediaType": media_type}).encode()

    async def push() -> str:
        async with RegistryClient() as c:
            try:
                await c.push_manifest(f"{plain_registry.addr}/refused/x:1", media_type, data)
            except RegistryError as exc:
                return str(exc)
        return "pushed"

    msg = asyncio.run(push())
    assert msg.startswith(f"push of manifest to {plain_registry.addr}/refused/x:1 failed: PUT ")
    assert msg.endswith("400 Bad Request: MANIFEST_INVALID: manifest invalid")


def test_a_cached_build_that_only_pushes_copies_blobs_registry_to_registry(
    plain_registry: Registry,
    base_image: str,
    tmp_path: Path,
    docker_config: Path,
    require_root: None,
) -> None:
    """A fresh worker that finds every step in a registry cache and only pushes
    never downloads a layer: the registry mounts each one from the cache's
    repository (issue 10: "copies blobs registry-to-registry without pulling")."""
    from conftest import plain_steps

    tag = uuid.uuid4().hex[:8]
    reg = plain_registry.addr
    ctx = write_context(tmp_path, base_image, "r2r")
    cache, first, second = f"{reg}/r2r/cache:{tag}", f"{reg}/r2r/one:{tag}", f"{reg}/r2r/two:{tag}"
    ow(
        tmp_path / "w1",
        "--cache-to",
        f"type=registry,ref={cache},mode=max",
        "--output",
        f"type=registry,name={first}",
        str(ctx),
        docker_config=docker_config,
    )
    before = len(plain_registry.requests())
    proc = ow(
        tmp_path / "w2",
        "--progress",
        "plain",
        "--cache-from",
        f"type=registry,ref={cache}",
        "--output",
        f"type=registry,name={second}",
        str(ctx),
        docker_config=docker_config,
    )
    reqs = plain_registry.requests_since(before)
    layers = [d["digest"] for d in raw_manifest(second)["layers"]]  # type: ignore[attr-defined]
    assert layers == [d["digest"] for d in raw_manifest(first)["layers"]]  # type: ignore[attr-defined]
    run = [s for s in plain_steps(proc.stderr) if "RUN echo r2r" in s.name]
    assert len(run) == 1 and run[0].states == ("CACHED",), proc.stderr
    fetched = [u for m, u, s in reqs if m == "GET" and any(f"/blobs/{d}" in u for d in layers)]
    assert fetched == [], fetched
    mounted = {
        unquote(u).split("mount=", 1)[1].split("&", 1)[0]
        for m, u, s in uploads(reqs)
        if m == "POST" and s == 201 and "mount=" in u
    }
    assert set(layers) <= mounted
