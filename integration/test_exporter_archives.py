"""Archives we write, read by real consumers: skopeo (OCI) and Docker Engine (docker)."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from dockerd import Dockerd, dockerd
from ociworker.content.store import ContentStore
from ociworker.core.digest import Digest
from ociworker.core.oci import OCI_LAYER_GZIP, Descriptor, Layer
from ociworker.exporter.image import ImageResult, write_image
from ociworker.exporter.ocilayout import export_docker_archive, export_oci_archive

__all__ = ["dockerd"]  # the fixture is used by name

pytestmark = pytest.mark.integration

BUSYBOX = Path("/bin/busybox")
CMD = ["/bin/sh", "-c", "echo hello-from-archive; ls /gone || echo gone-is-gone"]


def _add(tar: tarfile.TarFile, name: str, *, data: bytes | None = None, link: str = "") -> None:
    info = tarfile.TarInfo(name)
    info.mtime = 1_700_000_000
    if link:
        info.type, info.linkname, info.mode = tarfile.SYMTYPE, link, 0o777
        tar.addfile(info)
    elif data is None:
        info.type, info.mode = tarfile.DIRTYPE, 0o755
        tar.addfile(info)
    else:
        info.size, info.mode = len(data), 0o755
        tar.addfile(info, io.BytesIO(data))


def _gzip_layer(store: ContentStore, build: list[tuple[str, bytes | None, str]]) -> Layer:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data, link in build:
            _add(tar, name, data=data, link=link)
    blob = gzip.compress(raw.getvalue(), mtime=0)
    return Layer(
        descriptor=Descriptor(OCI_LAYER_GZIP, store.put(blob), len(blob)),
        diff_id=Digest("sha256:" + hashlib.sha256(raw.getvalue()).hexdigest()),
    )


def _busybox_image(store: ContentStore, *, oci_media_types: bool) -> ImageResult:
    if not BUSYBOX.is_file():
        pytest.fail("needs busybox-static at /bin/busybox")
    base = _gzip_layer(
        store,
        [
            ("bin", None, ""),
            ("bin/busybox", BUSYBOX.read_bytes(), ""),
            ("bin/sh", None, "busybox"),
            ("bin/ls", None, "busybox"),
            ("gone", b"soon removed\n", ""),
        ],
    )
    top = _gzip_layer(store, [(".wh.gone", b"", ""), ("etc", None, ""), ("etc/added", b"2\n", "")])
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {"Cmd": CMD, "Env": ["PATH=/bin"]},
        "history": [
            {"created_by": "busybox"},
            {"created_by": "ENV PATH=/bin", "empty_layer": True},
            {"created_by": "rm /gone"},
        ],
    }
    return write_image(store, config, [base, top], oci_media_types=oci_media_types)


@pytest.mark.parametrize("oci_media_types", [True, False], ids=["oci-types", "docker-types"])
def test_docker_load_and_run(dockerd: Dockerd, tmp_path: Path, oci_media_types: bool) -> None:
    store = ContentStore(tmp_path / "content")
    image = _busybox_image(store, oci_media_types=oci_media_types)
    tag = f"ociworker-test/busybox:{'oci' if oci_media_types else 'docker'}"
    # streamed straight into `docker load` (a pipe), as `build -o type=docker | docker load`
    load = subprocess.Popen(
        ["/usr/bin/docker", "-H", f"unix://{dockerd.socket}", "load"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={"DOCKER_CONFIG": str(dockerd.client_config), "PATH": "/usr/bin:/bin"},
    )
    assert load.stdin is not None
    try:
        export_docker_archive(store, image, [tag], load.stdin)
    except BaseException:
        load.kill()
        raise
    finally:
        # closes stdin (end of archive) and reaps the client either way
        out, err = load.communicate(timeout=120)
    assert load.returncode == 0, err.decode()
    assert f"Loaded image: {tag}" in out.decode()

    inspect = json.loads(dockerd.docker("image", "inspect", tag).stdout)[0]
    assert inspect["Id"] == image.config.digest
    assert inspect["RootFS"]["Layers"] == [la.diff_id for la in image.layers]
    assert inspect["Config"]["Cmd"] == CMD

    run = dockerd.docker("run", "--rm", "--network=none", tag)
    assert run.stdout.splitlines() == ["hello-from-archive", "gone-is-gone"]
    dockerd.docker("rmi", tag)


def test_skopeo_reads_oci_archive(tmp_path: Path) -> None:
    skopeo = shutil.which("skopeo")
    if skopeo is None:
        pytest.fail("needs skopeo")
    store = ContentStore(tmp_path / "content")
    image = _busybox_image(store, oci_media_types=True)
    archive = tmp_path / "image.oci.tar"
    with open(archive, "wb") as out:
        export_oci_archive(store, image, ["example.com/team/busybox:v1"], out)

    def inspect(*args: str) -> dict[str, object]:
        proc = subprocess.run(
            [skopeo, "inspect", *args], capture_output=True, text=True, timeout=60, check=False
        )
        assert proc.returncode == 0, proc.stderr
        result: dict[str, object] = json.loads(proc.stdout)
        return result

    # the ref.name annotation is the tag, which is what skopeo selects by
    info = inspect(f"oci-archive:{archive}:v1")
    assert info["Digest"] == image.manifest.digest
    assert info["Layers"] == [la.descriptor.digest for la in image.layers]
    assert info["Os"] == "linux" and info["Architecture"] == "amd64"
    raw = inspect("--raw", f"oci-archive:{archive}")
    assert raw["config"] == image.config.to_json()
    config = inspect("--config", f"oci-archive:{archive}")
    assert config["rootfs"] == {"type": "layers", "diff_ids": [la.diff_id for la in image.layers]}
