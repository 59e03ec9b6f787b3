"""Reproducible images: two workers with two empty roots build the same Dockerfile
with SOURCE_DATE_EPOCH and write byte-identical images, gzip and zstd alike.

Real runc, overlayfs and the local registry. What is compared comes from the
archives as skopeo and tarfile read them; the expected dates are computed here
with datetime from the epoch, and the base image's layers are the registry's."""

from __future__ import annotations

import gzip
import io
import json
import os
import subprocess
import sys
import tarfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import zstandard

from conftest import mounts_under, oci_archive_image
from ociworker.testing.daemon import spawn_daemon

EPOCH = 1_700_000_000
CREATED = datetime.fromtimestamp(EPOCH, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
#: a context file and a tar entry older than the epoch: they keep their times
OLD_CONTEXT = 1_600_000_000
OLD_TAR = 1_500_000_000
COMPRESSIONS = ("gzip", "zstd")

DOCKERFILE = """\
FROM {base} AS gen
RUN mkdir -p /out/sub && echo generated > /out/sub/g.txt && ln -s g.txt /out/sub/link \\
 && echo linked > /out/h1 && ln /out/h1 /out/h2
FROM {base}
RUN mkdir /data && echo one > /data/one && rm -f /bin/true
COPY files/ /app/
ADD local.tar /unpacked/
COPY --from=gen /out /gen
RUN touch /app/a.txt && echo two >> /data/one
"""


def _local_tar() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, mtime, data in [
            ("t", EPOCH + 5_000, None),
            ("t/new.txt", EPOCH + 5_000, b"new\n"),
            ("t/old.txt", OLD_TAR, b"old\n"),
        ]:
            ti = tarfile.TarInfo(name)
            ti.mtime = mtime
            if data is None:
                ti.type, ti.mode = tarfile.DIRTYPE, 0o755
                tf.addfile(ti)
            else:
                ti.size, ti.mode = len(data), 0o644
                tf.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


def make_context(dest: Path, base: str, new_mtime: float) -> Path:
    """The same files each time; the ones newer than the epoch dated ``new_mtime``."""
    dest.mkdir(parents=True)
    (dest / "Dockerfile").write_text(DOCKERFILE.format(base=base))
    (dest / "local.tar").write_bytes(_local_tar())
    files = dest / "files"
    (files / "d").mkdir(parents=True)
    for rel, text in [("a.txt", "a\n"), ("d/b.txt", "b\n"), ("old.txt", "old\n")]:
        (files / rel).write_text(text)
        os.utime(files / rel, (new_mtime, new_mtime))
    os.utime(files / "old.txt", (OLD_CONTEXT, OLD_CONTEXT))
    for p in (files / "d", files, dest / "local.tar"):
        os.utime(p, (new_mtime, new_mtime))
    return dest


def build(
    root: Path | None,
    ctx: Path,
    *outputs: str,
    epoch: str | None = None,
    build_arg: bool = False,
    addr: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """``ociworker build`` as a user runs it: SOURCE_DATE_EPOCH from the environment
    or (``build_arg``) as ``--build-arg``; on a daemon when ``addr`` is given."""
    env = {k: v for k, v in os.environ.items() if k != "SOURCE_DATE_EPOCH"}
    args = [sys.executable, "-m", "ociworker", "build", "--progress=plain"]
    args += ["--addr", addr] if addr else ["--root", str(root)]
    if epoch is not None and build_arg:
        args += ["--build-arg", f"SOURCE_DATE_EPOCH={epoch}"]
    elif epoch is not None:
        env["SOURCE_DATE_EPOCH"] = epoch
    for out in outputs:
        args += ["-o", out]
    proc = subprocess.run([*args, str(ctx)], capture_output=True, text=True, env=env, timeout=600)
    if proc.returncode != 0:
        raise AssertionError(f"build failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


@dataclass(frozen=True)
class Built:
    oci: Path
    docker: Path | None  # docker archives take no zstd layers


def build_both(root: Path | None, ctx: Path, dest: Path, compression: str, **kw: Any) -> Built:
    """An OCI archive, then (gzip) a docker archive: a second, fully cached build,
    as one build's outputs share their layer media types."""
    dest.mkdir(parents=True, exist_ok=True)
    oci, docker = dest / "image.oci.tar", dest / "image.docker.tar"
    build(root, ctx, f"type=oci,dest={oci},compression={compression}", **kw)
    if compression == "zstd":
        return Built(oci, None)
    build(root, ctx, f"type=docker,dest={docker},compression={compression}", **kw)
    return Built(oci, docker)


def skopeo_inspect(transport: str, path: Path) -> dict[str, Any]:
    out = subprocess.run(
        ["skopeo", "inspect", f"{transport}:{path}"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    result: dict[str, Any] = json.loads(out.stdout)
    return result


@dataclass(frozen=True)
class ArchiveLayer:
    digest: str
    #: every entry's name -> mtime, as tarfile reads the layer
    mtimes: dict[str, int]


def _untar_times(blob: bytes) -> dict[str, int]:
    if blob[:2] == b"\x1f\x8b":
        blob = gzip.decompress(blob)
    elif blob[:4] == b"\x28\xb5\x2f\xfd":
        blob = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(blob)).read()
    with tarfile.open(fileobj=io.BytesIO(blob)) as tf:
        return {m.name: int(m.mtime) for m in tf.getmembers()}


def oci_contents(archive: Path) -> tuple[dict[str, Any], list[ArchiveLayer]]:
    """The config and the layers of the image in an OCI archive."""
    with tarfile.open(archive) as tf:

        def blob(digest: str) -> bytes:
            f = tf.extractfile("blobs/sha256/" + digest.split(":", 1)[1])
            assert f is not None
            return f.read()

        index = json.loads(blob_of(tf, "index.json"))
        manifest = json.loads(blob(index["manifests"][0]["digest"]))
        config = json.loads(blob(manifest["config"]["digest"]))
        layers = [
            ArchiveLayer(la["digest"], _untar_times(blob(la["digest"])))
            for la in manifest["layers"]
        ]
    return config, layers


def docker_contents(archive: Path) -> tuple[str, dict[str, Any], list[ArchiveLayer]]:
    """The config file's name, the config and the layers of a ``docker load`` archive."""
    with tarfile.open(archive) as tf:
        (entry,) = json.loads(blob_of(tf, "manifest.json"))
        config = json.loads(blob_of(tf, entry["Config"]))
        layers = [ArchiveLayer(name, _untar_times(blob_of(tf, name))) for name in entry["Layers"]]
    return str(entry["Config"]), config, layers


def blob_of(tf: tarfile.TarFile, name: str) -> bytes:
    f = tf.extractfile(name)
    assert f is not None, name
    return f.read()


def registry_image(base_image: str) -> tuple[list[str], dict[str, Any]]:
    """The base image's layer digests and config, as the registry serves them."""
    host, _, rest = base_image.partition("/")
    repo, _, tag = rest.partition(":")
    accept = (
        "application/vnd.oci.image.manifest.v1+json, "
        "application/vnd.docker.distribution.manifest.v2+json"
    )
    req = urllib.request.Request(
        f"http://{host}/v2/{repo}/manifests/{tag}", headers={"Accept": accept}
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        manifest = json.load(resp)
    with urllib.request.urlopen(
        f"http://{host}/v2/{repo}/blobs/{manifest['config']['digest']}", timeout=10
    ) as resp:
        config = json.load(resp)
    return [la["digest"] for la in manifest["layers"]], config


@dataclass(frozen=True)
class Runs:
    """Worker 1 (epoch from the environment) and worker 2 (``--build-arg``), each
    with its own empty root and its own copy of the context, per compression."""

    tmp: Path
    ctx: tuple[Path, Path]
    images: dict[str, tuple[Built, Built]]


@pytest.fixture(scope="module")
def runs(
    tmp_path_factory: pytest.TempPathFactory,
    require_root: None,
    base_image: str,
) -> Iterator[Runs]:
    tmp = tmp_path_factory.mktemp("repro")
    # fresh mtimes in one context, others (still after the epoch) in the other
    ctx = (
        make_context(tmp / "ctx1", base_image, time.time()),
        make_context(tmp / "ctx2", base_image, EPOCH + 12_345_678),
    )
    images: dict[str, tuple[Built, Built]] = {}
    for comp in COMPRESSIONS:
        one = build_both(tmp / f"root1-{comp}", ctx[0], tmp / f"w1-{comp}", comp, epoch=str(EPOCH))
        two = build_both(
            tmp / f"root2-{comp}",
            ctx[1],
            tmp / f"w2-{comp}",
            comp,
            epoch=str(EPOCH),
            build_arg=True,
        )
        images[comp] = (one, two)
    yield Runs(tmp, ctx, images)
    assert not mounts_under(tmp), "a build left mounts behind"


@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_two_workers_with_empty_roots_make_the_same_image(runs: Runs, compression: str) -> None:
    one, two = runs.images[compression]
    # OCI archives: the manifest digest as skopeo reads it, and as the index names it
    s1, s2 = skopeo_inspect("oci-archive", one.oci), skopeo_inspect("oci-archive", two.oci)
    assert s1["Digest"] == s2["Digest"]
    assert oci_archive_image(one.oci) == oci_archive_image(two.oci)
    assert s1["Layers"] == s2["Layers"]
    # the OCI archives are the same bytes altogether
    assert one.oci.read_bytes() == two.oci.read_bytes()
    if compression == "gzip":
        # docker archives: the same image ID, and the same bytes too
        assert one.docker is not None and two.docker is not None
        c1, _, _ = docker_contents(one.docker)
        c2, _, _ = docker_contents(two.docker)
        assert c1 == c2
        assert one.docker.read_bytes() == two.docker.read_bytes()
        d1 = skopeo_inspect("docker-archive", one.docker)
        assert d1["Digest"] == skopeo_inspect("docker-archive", two.docker)["Digest"]
    media = {"gzip": "tar+gzip", "zstd": "tar+zstd"}[compression]
    with tarfile.open(one.oci) as tf:
        index = json.loads(blob_of(tf, "index.json"))
        manifest = json.loads(
            blob_of(tf, "blobs/sha256/" + index["manifests"][0]["digest"].split(":")[1])
        )
    # the layers we made are in the asked compression (the base's come as they are)
    assert all(la["mediaType"].endswith(media) for la in manifest["layers"][1:])


@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_created_and_history_say_the_epoch(runs: Runs, compression: str, base_image: str) -> None:
    _, base_config = registry_image(base_image)
    base_history = base_config["history"]
    for built in runs.images[compression]:
        assert skopeo_inspect("oci-archive", built.oci)["Created"] == CREATED
        config, _ = oci_contents(built.oci)
        assert config["created"] == CREATED
        history = config["history"]
        # the base image's entries as it has them; the build's five (RUN, COPY, ADD,
        # COPY --from, RUN) dated with the epoch
        assert history[: len(base_history)] == base_history
        ours = history[len(base_history) :]
        assert [h["created_by"].split()[0] for h in ours] == ["RUN", "COPY", "ADD", "COPY", "RUN"]
        assert [h["created"] for h in ours] == [CREATED] * 5
        if built.docker is not None:
            _, dconfig, _ = docker_contents(built.docker)
            assert dconfig["created"] == CREATED


@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_new_layers_are_clamped_and_base_layers_copied_as_they_are(
    runs: Runs, compression: str, base_image: str
) -> None:
    base_layers, _ = registry_image(base_image)
    for built in runs.images[compression]:
        _, layers = oci_contents(built.oci)
        dlayers = docker_contents(built.docker)[2] if built.docker is not None else []
        assert [la.digest for la in layers[: len(base_layers)]] == base_layers
        seen: dict[str, int] = {}
        for layer in [*layers[len(base_layers) :], *dlayers[len(base_layers) :]]:
            late = {n: t for n, t in layer.mtimes.items() if t > EPOCH}
            assert not late, f"entries after the epoch in {layer.digest}: {late}"
            seen.update(layer.mtimes)
        # files the build wrote, and context and tar files newer than the epoch: the epoch
        for name in ("data/one", "gen/sub/g.txt", "gen/h1", "app/a.txt", "app/d/b.txt"):
            assert seen[name] == EPOCH, name
        assert seen["unpacked/t/new.txt"] == EPOCH
        # older ones keep their own times
        assert seen["app/old.txt"] == OLD_CONTEXT
        assert seen["unpacked/t/old.txt"] == OLD_TAR


def test_without_the_epoch_two_workers_differ_and_a_used_root_then_matches(
    runs: Runs, base_image: str
) -> None:
    """The control: the same two builds without SOURCE_DATE_EPOCH differ, and not
    only in ``created`` (the layers carry the build's times). The same roots then
    build with the epoch: the layers remembered without it are not reused, and
    the image is the one the empty roots made."""
    dest = runs.tmp / "control"
    oci = [dest / "c1.oci.tar", dest / "c2.oci.tar"]
    dest.mkdir()
    for i in (0, 1):
        build(runs.tmp / f"control-root{i}", runs.ctx[i], f"type=oci,dest={oci[i]}")
    s1, s2 = skopeo_inspect("oci-archive", oci[0]), skopeo_inspect("oci-archive", oci[1])
    assert s1["Digest"] != s2["Digest"]
    base_layers, _ = registry_image(base_image)
    assert s1["Layers"][: len(base_layers)] == s2["Layers"][: len(base_layers)]
    assert s1["Layers"][len(base_layers) :] != s2["Layers"][len(base_layers) :]
    _, layers = oci_contents(oci[0])
    assert any(t > EPOCH for la in layers for t in la.mtimes.values())

    want = skopeo_inspect("oci-archive", runs.images["gzip"][0].oci)["Digest"]
    again = dest / "again.oci.tar"
    build(runs.tmp / "control-root0", runs.ctx[0], f"type=oci,dest={again}", epoch=str(EPOCH))
    assert skopeo_inspect("oci-archive", again)["Digest"] == want


def test_a_cached_rebuild_without_the_epoch_is_the_same_image(runs: Runs) -> None:
    """Without SOURCE_DATE_EPOCH a step is dated by when its layer was made, as in
    BuildKit (a fully cached rebuild keeps the image's "created", moby/moby#34786),
    so a cached rebuild is the same image: same digest, dated by the first build."""
    root = runs.tmp / "cached-root"
    first, second = runs.tmp / "cached1.oci.tar", runs.tmp / "cached2.oci.tar"
    before = datetime.now(UTC)
    build(root, runs.ctx[0], f"type=oci,dest={first}")
    after = datetime.now(UTC)
    build(root, runs.ctx[0], f"type=oci,dest={second}")
    assert (
        skopeo_inspect("oci-archive", first)["Digest"]
        == skopeo_inspect("oci-archive", second)["Digest"]
    )
    c1, _ = oci_contents(first)
    created = datetime.fromisoformat(c1["created"].replace("Z", "+00:00"))
    assert before <= created <= after


def test_over_the_daemon_the_clients_epoch_gives_the_same_image(runs: Runs) -> None:
    """The client's SOURCE_DATE_EPOCH travels as a build arg: a daemon (whose own
    environment has none) with an empty root makes the embedded workers' image."""
    root, sock = runs.tmp / "daemon-root", runs.tmp / "d.sock"
    proc = spawn_daemon(("--addr", f"unix://{sock}", "--root", str(root)), runs.tmp / "daemon.log")
    try:
        out = runs.tmp / "daemon.oci.tar"
        build(None, runs.ctx[1], f"type=oci,dest={out}", epoch=str(EPOCH), addr=f"unix://{sock}")
    finally:
        proc.terminate()
        assert proc.wait(timeout=60) == 0
    want = skopeo_inspect("oci-archive", runs.images["gzip"][0].oci)["Digest"]
    assert skopeo_inspect("oci-archive", out)["Digest"] == want
    assert not mounts_under(root)


def test_layers_output_writes_the_clamped_layers_of_the_image(runs: Runs, base_image: str) -> None:
    """``type=layers`` writes each layer while the build runs: with the epoch they
    are the image's own clamped layers, the ones the empty roots made."""
    layers_dir, oci = runs.tmp / "streamed", runs.tmp / "streamed.oci.tar"
    build(
        runs.tmp / "layers-root",
        runs.ctx[1],
        f"type=layers,dest={layers_dir}",
        f"type=oci,dest={oci}",
        epoch=str(EPOCH),
    )
    want = skopeo_inspect("oci-archive", runs.images["gzip"][0].oci)
    assert skopeo_inspect("oci-archive", oci)["Digest"] == want["Digest"]
    base_layers, _ = registry_image(base_image)
    written = sorted(layers_dir.glob("*.json"))
    assert [json.loads(p.read_text())["digest"] for p in written] == want["Layers"][
        len(base_layers) :
    ]
