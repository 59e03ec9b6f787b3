"""scripts/make_base_image.py: the base image must be reproducible and well-formed."""

from __future__ import annotations

import importlib.util
import io
import json
import sys
import tarfile
from pathlib import Path
from types import ModuleType

import pytest

_PATH = Path(__file__).resolve().parent.parent / "scripts" / "make_base_image.py"


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("make_base_image", _PATH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    # dataclasses resolves annotations through sys.modules while the class body runs.
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


mbi = _load()
APPLETS = ["bin/sh", "usr/bin/awk", "sbin/init", "bin/busybox", "usr/local/bin/x"]


def _members(data: bytes) -> list[tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return tar.getmembers()


def test_same_input_same_digest() -> None:
    a = mbi.build_image(mbi.build_layer_tar(b"BB", APPLETS), "amd64")
    b = mbi.build_image(mbi.build_layer_tar(b"BB", list(reversed(APPLETS))), "amd64")
    assert a.manifest.digest == b.manifest.digest
    c = mbi.build_image(mbi.build_layer_tar(b"BB2", APPLETS), "amd64")
    assert c.manifest.digest != a.manifest.digest


def test_layer_layout() -> None:
    members = _members(mbi.build_layer_tar(b"BB", APPLETS))
    names = [m.name for m in members]
    assert names == sorted(names)
    by_name = {m.name: m for m in members}
    # parents of every applet exist, created before their children
    assert by_name["usr/local/bin"].isdir() and by_name["usr/local"].isdir()
    assert by_name["usr/bin/awk"].linkname == "/bin/busybox"
    assert by_name["bin/busybox"].isfile() and by_name["bin/busybox"].mode == 0o755
    assert by_name["tmp"].mode == 0o1777
    assert by_name["home/user"].uid == 1000
    assert {m.uid for m in members if m.name != "home/user"} == {0}
    assert len({m.mtime for m in members}) == 1


def test_config_and_manifest() -> None:
    layer_tar = mbi.build_layer_tar(b"BB", APPLETS)
    image = mbi.build_image(layer_tar, "arm64")
    config = json.loads(image.config.data)
    assert config["architecture"] == "arm64" and config["os"] == "linux"
    assert config["config"]["Cmd"] == ["sh"]
    assert config["rootfs"]["diff_ids"] == [image.diff_id]
    manifest = json.loads(image.manifest.data)
    assert manifest["config"]["digest"] == image.config.digest
    assert manifest["layers"][0]["digest"] == image.layer.digest
    assert manifest["layers"][0]["size"] == len(image.layer.data)


def test_write_layout_replaces_whole_dir(tmp_path: Path) -> None:
    image = mbi.build_image(mbi.build_layer_tar(b"BB", APPLETS), "amd64")
    layout = tmp_path / "oci"
    layout.mkdir()
    (layout / "stale").write_text("x")
    mbi.write_layout(image, layout, "latest", "amd64")
    assert not (layout / "stale").exists()
    index = json.loads((layout / "index.json").read_text())
    (desc,) = index["manifests"]
    assert desc["digest"] == image.manifest.digest
    assert desc["annotations"]["org.opencontainers.image.ref.name"] == "latest"
    blob = layout / "blobs" / "sha256" / image.layer.digest.removeprefix("sha256:")
    assert blob.read_bytes() == image.layer.data


@pytest.mark.parametrize("bad", ["/bin/sh", "../etc/x", "usr/../../x"])
def test_rejects_unsafe_applet_paths(bad: str) -> None:
    with pytest.raises(ValueError, match="unsafe"):
        mbi.build_layer_tar(b"BB", [bad])


@pytest.mark.parametrize(
    ("ref", "want"),
    [
        ("127.0.0.1:5000/busybox:latest", ("127.0.0.1:5000", "busybox", "latest")),
        ("127.0.0.1:5000/a/b", ("127.0.0.1:5000", "a/b", "latest")),
        ("localhost/x:1.0", ("localhost", "x", "1.0")),
    ],
)
def test_split_ref(ref: str, want: tuple[str, str, str]) -> None:
    assert mbi.split_ref(ref) == want
