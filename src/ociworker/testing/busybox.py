"""A busybox-static base image, built from nothing but the host's ``busybox`` binary.

The integration suite's base image (``scripts/make-base-image``) and the pytest
plugin's (``ociworker_base_image``) are both made here, so a project testing its
images needs no Docker Hub. Standard library only: the script imports this module
from the source tree before the project is installed. Everything that goes into
the image is fixed (mtimes, owners, order, gzip header), so the same busybox
binary always yields the same manifest digest.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import platform
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

MEDIA_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_INDEX = "application/vnd.oci.image.index.v1+json"
MEDIA_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"

PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# 2000-01-01T00:00:00Z: any fixed instant works; the epoch itself trips some tools that treat
# a zero mtime as "unset".
FIXED_MTIME = 946684800
FIXED_CREATED = "2000-01-01T00:00:00Z"
USER_UID = 1000

PASSWD = (
    "root:x:0:0:root:/root:/bin/sh\n"
    "user:x:1000:1000:user:/home/user:/bin/sh\n"
    "nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
)
GROUP = "root:x:0:\nuser:x:1000:\nnogroup:x:65534:\n"

# (path, mode, uid): /home/user belongs to its user so `USER user` can write its home; every
# other entry is root's.
DIRECTORIES: tuple[tuple[str, int, int], ...] = (
    ("bin", 0o755, 0),
    ("dev", 0o755, 0),
    ("etc", 0o755, 0),
    ("home", 0o755, 0),
    ("home/user", 0o755, USER_UID),
    ("proc", 0o555, 0),
    ("root", 0o700, 0),
    ("sbin", 0o755, 0),
    ("sys", 0o555, 0),
    ("tmp", 0o1777, 0),
    ("usr", 0o755, 0),
    ("usr/bin", 0o755, 0),
    ("usr/sbin", 0o755, 0),
    ("var", 0o755, 0),
)


@dataclass(frozen=True)
class Blob:
    media_type: str
    data: bytes

    @property
    def digest(self) -> str:
        return "sha256:" + hashlib.sha256(self.data).hexdigest()

    def descriptor(self) -> dict[str, object]:
        return {"mediaType": self.media_type, "digest": self.digest, "size": len(self.data)}


@dataclass(frozen=True)
class Image:
    layer: Blob
    config: Blob
    manifest: Blob
    diff_id: str


def applet_paths(busybox: Path) -> list[str]:
    """The install paths busybox itself reports, e.g. ``usr/bin/awk``."""
    out = subprocess.run(
        [str(busybox), "--list-full"], check=True, capture_output=True, text=True
    ).stdout
    return [line.strip() for line in out.splitlines() if line.strip()]


def _safe_relative(path: str) -> str:
    p = PurePosixPath(path)
    if p.is_absolute() or ".." in p.parts or not p.parts:
        raise ValueError(f"unsafe path in image: {path!r}")
    return str(p)


def _info(name: str, kind: bytes, mode: int, uid: int = 0) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type = kind
    ti.mode = mode
    ti.uid = ti.gid = uid
    ti.uname = ti.gname = ""
    ti.mtime = FIXED_MTIME
    return ti


def build_layer_tar(busybox_binary: bytes, applets: Iterable[str]) -> bytes:
    """An uncompressed, byte-for-byte reproducible root filesystem tar."""
    dirs = {name: (mode, uid) for name, mode, uid in DIRECTORIES}
    links: dict[str, str] = {}
    for raw in applets:
        path = _safe_relative(raw)
        if path == "bin/busybox":
            continue
        links[path] = "/bin/busybox"
        for parent in PurePosixPath(path).parents:
            if str(parent) != ".":
                dirs.setdefault(str(parent), (0o755, 0))
    files = {
        "bin/busybox": (busybox_binary, 0o755),
        "etc/group": (GROUP.encode(), 0o644),
        "etc/passwd": (PASSWD.encode(), 0o644),
    }
    names = sorted({*dirs, *links, *files})
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name in names:
            if name in dirs:
                mode, uid = dirs[name]
                tar.addfile(_info(name, tarfile.DIRTYPE, mode, uid))
            elif name in files:
                data, mode = files[name]
                ti = _info(name, tarfile.REGTYPE, mode)
                ti.size = len(data)
                tar.addfile(ti, io.BytesIO(data))
            else:
                ti = _info(name, tarfile.SYMTYPE, 0o777)
                ti.linkname = links[name]
                tar.addfile(ti)
    return buf.getvalue()


def _json(obj: object) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def build_image(
    layer_tar: bytes,
    arch: str,
    *,
    cmd: str = "sh",
    created: str = FIXED_CREATED,
    created_by: str = "ociworker scripts/make-base-image (busybox-static)",
    compresslevel: int = 9,
) -> Image:
    """A one-layer image; scripts/make_debian_base.py makes its Debian base with it too."""
    # mtime=0 in the gzip header keeps the compressed bytes stable across runs.
    layer = Blob(MEDIA_LAYER_GZIP, gzip.compress(layer_tar, compresslevel=compresslevel, mtime=0))
    diff_id = "sha256:" + hashlib.sha256(layer_tar).hexdigest()
    config = Blob(
        MEDIA_CONFIG,
        _json(
            {
                "created": created,
                "architecture": arch,
                "os": "linux",
                "config": {"Env": [PATH_ENV], "Cmd": [cmd]},
                "rootfs": {"type": "layers", "diff_ids": [diff_id]},
                "history": [{"created": created, "created_by": created_by}],
            }
        ),
    )
    manifest = Blob(
        MEDIA_MANIFEST,
        _json(
            {
                "schemaVersion": 2,
                "mediaType": MEDIA_MANIFEST,
                "config": config.descriptor(),
                "layers": [layer.descriptor()],
            }
        ),
    )
    return Image(layer=layer, config=config, manifest=manifest, diff_id=diff_id)


def write_layout(image: Image, layout: Path, tag: str, arch: str) -> None:
    """Write an OCI image layout, replacing ``layout`` as a whole so readers never see a mix."""
    layout.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=layout.name + ".", dir=layout.parent))
    try:
        blobs = tmp / "blobs" / "sha256"
        blobs.mkdir(parents=True)
        for blob in (image.layer, image.config, image.manifest):
            (blobs / blob.digest.removeprefix("sha256:")).write_bytes(blob.data)
        (tmp / "oci-layout").write_bytes(_json({"imageLayoutVersion": "1.0.0"}))
        desc = image.manifest.descriptor()
        desc["annotations"] = {"org.opencontainers.image.ref.name": tag}
        desc["platform"] = {"architecture": arch, "os": "linux"}
        (tmp / "index.json").write_bytes(
            _json({"schemaVersion": 2, "mediaType": MEDIA_INDEX, "manifests": [desc]})
        )
        tmp.chmod(0o755)
        if layout.exists():
            shutil.rmtree(layout)
        tmp.rename(layout)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


GOARCH = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}


def host_arch() -> str:
    """The host's architecture as OCI names it (``amd64``, ``arm64``)."""
    machine = platform.machine()
    try:
        return GOARCH[machine]
    except KeyError:
        raise ValueError(f"unsupported host architecture {machine!r}") from None


def busybox_image(busybox: Path, arch: str | None = None) -> Image:
    """The base image of ``busybox`` (a static binary; its applets are the links)."""
    return build_image(
        build_layer_tar(busybox.read_bytes(), applet_paths(busybox)), arch or host_arch()
    )
