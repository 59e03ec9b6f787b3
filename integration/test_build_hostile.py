"""Hostile base layers, pulled from the real registry and applied by a real build.

As containerd does, ``../`` and absolute entry names are clamped inside the
snapshot and symlinked parents are resolved inside it; a hardlink to a path
outside the layer is an error. Each case proves nothing was written outside.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import io
import json
import subprocess
import sys
import tarfile
import uuid
from pathlib import Path

import pytest

from ociworker.content.store import ContentStore
from ociworker.core.digest import Digest
from ociworker.core.oci import OCI_CONFIG, OCI_LAYER_GZIP, OCI_MANIFEST, Descriptor
from ociworker.registry.client import RegistryClient


def _tar(entries: list[tarfile.TarInfo], data: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for info in entries:
            payload = data.get(info.name)
            if payload is not None:
                info.size = len(payload)
                tf.addfile(info, io.BytesIO(payload))
            else:
                tf.addfile(info)
    return buf.getvalue()


def _entry(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = 0o755 if kind in (tarfile.DIRTYPE, tarfile.SYMTYPE) else 0o644
    info.linkname = link
    return info


async def _push_image(repo: str, layer_tar: bytes, store: ContentStore) -> None:
    """busybox's layers plus one hostile layer on top, pushed under ``repo``."""
    client = RegistryClient()
    try:
        base = await client.resolve("127.0.0.1:5000/busybox:latest", _amd64(), store=store)
        for d in base.layer_descriptors:
            await client.fetch_blob("127.0.0.1:5000/busybox:latest", d, store)
        config = json.loads(base.config_json)
        blob = gzip.compress(layer_tar)
        layer = Descriptor(OCI_LAYER_GZIP, store.put(blob), len(blob))
        config["rootfs"]["diff_ids"].append("sha256:" + hashlib.sha256(layer_tar).hexdigest())
        config["history"] = []
        cfg_bytes = json.dumps(config).encode()
        cfg = Descriptor(OCI_CONFIG, store.put(cfg_bytes), len(cfg_bytes))
        layers = [*base.layer_descriptors, layer]
        for d in (*layers, cfg):
            await client.push_blob(repo, d, store, mount_from="127.0.0.1:5000/busybox")
        manifest = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": cfg.to_json(),
            "layers": [d.to_json() for d in layers],
        }
        await client.push_manifest(repo, OCI_MANIFEST, json.dumps(manifest).encode())
    finally:
        await client.aclose()


def _amd64():  # type: ignore[no-untyped-def]
    from ociworker.core.oci import Platform

    return Platform("linux", "amd64")


def _build(tmp: Path, image: str, root: Path) -> subprocess.CompletedProcess[str]:
    ctx = tmp / f"ctx-{uuid.uuid4().hex[:6]}"
    ctx.mkdir()
    (ctx / "Dockerfile").write_text(f"FROM {image}\nRUN true\n")
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "ociworker",
            "build",
            "--root",
            str(root),
            "--progress",
            "plain",
            "--output",
            f"type=local,dest={tmp / 'out'}",
            str(ctx),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture
def sentinel(tmp_path: Path) -> Path:
    d = tmp_path / "outside"
    d.mkdir()
    (d / "keep").write_text("untouched")
    return d


def _outside_untouched(sentinel: Path) -> None:
    assert sorted(p.name for p in sentinel.iterdir()) == ["keep"]
    assert (sentinel / "keep").read_text() == "untouched"


def test_dotdot_and_absolute_names_are_clamped_inside(
    tmp_path: Path, sentinel: Path, base_image: str, require_root: None
) -> None:
    rel_escape = "../" * 20 + str(sentinel).lstrip("/") + "/escaped-rel"
    abs_escape = str(sentinel) + "/escaped-abs"
    layer = _tar(
        [_entry(rel_escape), _entry(abs_escape)],
        {rel_escape: b"rel", abs_escape: b"abs"},
    )
    repo = f"127.0.0.1:5000/ociworker-test/hostile-dotdot-{uuid.uuid4().hex[:8]}:latest"
    asyncio.run(_push_image(repo, layer, ContentStore(tmp_path / "push")))
    proc = _build(tmp_path, repo, tmp_path / "state")
    assert proc.returncode == 0, proc.stderr
    _outside_untouched(sentinel)
    inside = tmp_path / "out" / str(sentinel).lstrip("/")
    assert (inside / "escaped-rel").read_text() == "rel"
    assert (inside / "escaped-abs").read_text() == "abs"


def test_symlinked_parent_resolves_inside_the_snapshot(
    tmp_path: Path, sentinel: Path, base_image: str, require_root: None
) -> None:
    layer = _tar(
        [
            _entry("abs-link", tarfile.SYMTYPE, str(sentinel)),
            _entry("abs-link/pwned-abs"),
            _entry("rel-link", tarfile.SYMTYPE, "../../../../../../../.." + str(sentinel)),
            _entry("rel-link/pwned-rel"),
        ],
        {"abs-link/pwned-abs": b"x", "rel-link/pwned-rel": b"y"},
    )
    repo = f"127.0.0.1:5000/ociworker-test/hostile-symlink-{uuid.uuid4().hex[:8]}:latest"
    asyncio.run(_push_image(repo, layer, ContentStore(tmp_path / "push")))
    proc = _build(tmp_path, repo, tmp_path / "state")
    assert proc.returncode == 0, proc.stderr
    _outside_untouched(sentinel)
    inside = tmp_path / "out" / str(sentinel).lstrip("/")
    assert (inside / "pwned-abs").read_text() == "x"
    assert (inside / "pwned-rel").read_text() == "y"


@pytest.mark.parametrize("target", ["/etc/passwd", "../../../../etc/passwd"])
def test_hardlink_to_outside_fails_clearly(
    tmp_path: Path, sentinel: Path, base_image: str, require_root: None, target: str
) -> None:
    host_passwd = Path("/etc/passwd").read_bytes()
    layer = _tar([_entry("stolen", tarfile.LNKTYPE, target)], {})
    repo = f"127.0.0.1:5000/ociworker-test/hostile-link-{uuid.uuid4().hex[:8]}:latest"
    asyncio.run(_push_image(repo, layer, ContentStore(tmp_path / "push")))
    proc = _build(tmp_path, repo, tmp_path / "state")
    assert proc.returncode == 1
    assert "ERROR" in proc.stderr and "stolen" in proc.stderr, proc.stderr
    assert Path("/etc/passwd").read_bytes() == host_passwd
    assert not (tmp_path / "out").exists()


def test_whiteout_of_dotdot_fails_clearly(
    tmp_path: Path, base_image: str, require_root: None
) -> None:
    layer = _tar([_entry("etc/.wh..")], {"etc/.wh..": b""})
    repo = f"127.0.0.1:5000/ociworker-test/hostile-wh-{uuid.uuid4().hex[:8]}:latest"
    asyncio.run(_push_image(repo, layer, ContentStore(tmp_path / "push")))
    proc = _build(tmp_path, repo, tmp_path / "state")
    assert proc.returncode == 1
    assert ".wh.." in proc.stderr, proc.stderr


def _unused(d: Digest) -> None:  # keeps the Digest import honest for mypy
    return None
