"""The exporters without root: the registry by name, option checks, the
filesystem exporters on a plain dir, image assembly on a fake chain."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import hashlib
import io
import json
import os
import tarfile
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest

from ociworker.content.image import read_image
from ociworker.content.store import ContentStore
from ociworker.core.digest import check_digest
from ociworker.core.oci import OCI_LAYER_GZIP, OCI_MANIFEST, Descriptor, Layer
from ociworker.core.outputs import OUTPUT_TYPES, OutputSpec
from ociworker.core.progress import Event, VertexStatus
from ociworker.diff.base import CompressionOpts
from ociworker.errors import ConfigError, UserError
from ociworker.exporter.assemble import compression_opts, make_image
from ociworker.exporter.base import ExportParts, ExportResult
from ociworker.exporter.exporters import EXPORTERS, resolve_outputs
from ociworker.exporter.image import ImageResult
from ociworker.exporter.target import LocalExportTarget
from ociworker.frontend.dockerfile.convert import Plan


def _out(typ: str, **attrs: str) -> OutputSpec:
    return OutputSpec(typ, tuple(sorted((k.replace("_", "-"), v) for k, v in attrs.items())))


# --- the registry ----------------------------------------------------------------------


def test_registry_names_exactly_the_output_types() -> None:
    assert sorted(EXPORTERS) == sorted(OUTPUT_TYPES)


def test_unknown_output_type_is_refused() -> None:
    with pytest.raises(ConfigError, match="unknown output type 'cacheonly'"):
        resolve_outputs([_out("cacheonly", dest="x")])


def test_instances_come_back_in_output_order() -> None:
    outs = [_out(t, dest="d") for t in OUTPUT_TYPES]
    assert [i.output for i in resolve_outputs(outs)] == outs  # type: ignore[attr-defined]


def test_image_outputs_need_the_image_and_file_outputs_do_not() -> None:
    needs = {t: EXPORTERS[t].resolve(_out(t, dest="d")).needs_image for t in OUTPUT_TYPES}
    assert needs == {
        "image": True,
        "registry": True,
        "oci": True,
        "docker": True,
        "local": False,
        "tar": False,
        "layers": False,
    }


# --- options ---------------------------------------------------------------------------


@pytest.mark.parametrize("typ", OUTPUT_TYPES)
def test_every_exporter_refuses_a_compression_level_that_is_no_integer(typ: str) -> None:
    with pytest.raises(ConfigError, match=r"^compression-level must be an integer$"):
        EXPORTERS[typ].resolve(_out(typ, dest="d", compression_level="high"))


@pytest.mark.parametrize("typ", OUTPUT_TYPES)
def test_every_exporter_refuses_a_name_that_is_no_reference(typ: str) -> None:
    with pytest.raises(UserError, match="invalid reference format"):
        EXPORTERS[typ].resolve(_out(typ, dest="d", name="Not A Name"))


def _opts(*outs: OutputSpec) -> CompressionOpts:
    return compression_opts([i.layer_options for i in resolve_outputs(outs)])


def test_unknown_compression_is_refused_once_the_outputs_are_merged() -> None:
    with pytest.raises(ConfigError, match="unknown compression 'lz4'"):
        _opts(_out("oci", dest="d", compression="lz4"))
    # the last output naming a compression wins, as before
    assert _opts(_out("oci", dest="d", compression="lz4"), _out("image", compression="zstd")) == (
        CompressionOpts("zstd", None, True)
    )


def test_layer_options_merge_in_output_order() -> None:
    assert _opts() == CompressionOpts("gzip", None, True)
    assert _opts(_out("image", compression_level="3")) == CompressionOpts("gzip", 3, True)
    assert _opts(_out("docker", dest="d")) == CompressionOpts("gzip", None, False)
    docker_oci = _out("docker", dest="d", oci_mediatypes="true")
    assert _opts(docker_oci) == CompressionOpts("gzip", None, True)
    # oci-mediatypes=false asks for Docker media types on any image output (as BuildKit)
    assert _opts(_out("oci", dest="d", oci_mediatypes="false")) == CompressionOpts(
        "gzip", None, False
    )
    assert _opts(
        _out("image", oci_mediatypes="true"), _out("docker", dest="d")
    ).oci_media_types is (False)
    assert _opts(_out("docker", dest="d"), _out("image", oci_mediatypes="true")).oci_media_types
    # zstd layers need OCI media types
    assert _opts(_out("docker", dest="d", compression="zstd")) == CompressionOpts(
        "zstd", None, True
    )


# --- the filesystem exporters on a plain dir --------------------------------------------


class _Images:
    def __init__(self) -> None:
        self.names: dict[str, Descriptor] = {}

    def put(self, name: str, desc: Descriptor) -> None:
        self.names[name] = desc


class _NoLayers:
    async def chain(self, name: str | None) -> list[str]:
        raise AssertionError("no chain wanted")

    async def layer_of(self, chain: Sequence[str], index: int, opts: CompressionOpts) -> Layer:
        raise AssertionError("no layer wanted")


def _parts(tmp_path: Path, tree: Path, events: list[Event], images: _Images) -> ExportParts:
    @contextlib.asynccontextmanager
    async def view(name: str | None) -> AsyncIterator[Path]:
        assert name == "top"
        yield tree

    return ExportParts(
        content=ContentStore(tmp_path / "content"),
        images=images,
        view=view,
        layers=_NoLayers(),
        target=LocalExportTarget(),
        events=events.append,
    )


def _tree(root: Path) -> Path:
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "hostname").write_text("box\n")
    (root / "bin").mkdir()
    (root / "bin" / "tool").write_bytes(b"#!/bin/sh\necho hi\n")
    os.chmod(root / "bin" / "tool", 0o755)
    (root / "empty").mkdir()
    os.symlink("bin/tool", root / "tool")
    return root


def _listing(root: Path) -> dict[str, bytes | str | None]:
    """Every entry below ``root``: a file's bytes, a link's target, None for a dir."""
    got: dict[str, bytes | str | None] = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(dirpath) / name
            rel = str(path.relative_to(root))
            if path.is_symlink():
                got[rel] = os.readlink(path)
            elif path.is_dir():
                got[rel] = None
            else:
                got[rel] = path.read_bytes()
    return got


def test_tar_exporter_writes_the_files_of_the_view(tmp_path: Path) -> None:
    tree = _tree(tmp_path / "tree")
    dest = tmp_path / "out" / "fs.tar"
    dest.parent.mkdir()  # not made by the writer (buildx creates no parent)
    events: list[Event] = []
    inst = EXPORTERS["tar"].resolve(_out("tar", dest=str(dest)))
    asyncio.run(inst.export(ExportResult(None, "top"), _parts(tmp_path, tree, events, _Images())))

    got: dict[str, bytes | str | None] = {}
    with tarfile.open(dest) as tar:
        for m in tar.getmembers():
            f = tar.extractfile(m) if m.isfile() else None
            got[m.name] = f.read() if f else (m.linkname if m.issym() else None)
    assert got == _listing(tree)
    names = {e.name for e in events if isinstance(e, VertexStatus)}
    assert names == {"exporting to client tarball"}


def test_local_exporter_copies_the_files_of_the_view(tmp_path: Path) -> None:
    tree = _tree(tmp_path / "tree")
    dest = tmp_path / "out"
    events: list[Event] = []
    inst = EXPORTERS["local"].resolve(_out("local", dest=str(dest)))
    asyncio.run(inst.export(ExportResult(None, "top"), _parts(tmp_path, tree, events, _Images())))

    assert _listing(dest) == _listing(tree)
    assert os.stat(dest / "bin" / "tool").st_mode & 0o777 == 0o755
    names = {e.name for e in events if isinstance(e, VertexStatus)}
    assert names == {"exporting to client directory"}


def test_image_exporter_names_the_image_by_name_or_else_by_tags(tmp_path: Path) -> None:
    desc = Descriptor(OCI_MANIFEST, check_digest("sha256:" + "a" * 64), 1)
    image = ImageResult(desc, desc, ())
    images = _Images()
    parts = _parts(tmp_path, tmp_path, [], images)
    result = ExportResult(image, None, ("app:1", "app:2"))
    asyncio.run(EXPORTERS["image"].resolve(_out("image")).export(result, parts))
    assert sorted(images.names) == ["docker.io/library/app:1", "docker.io/library/app:2"]
    asyncio.run(EXPORTERS["image"].resolve(_out("image", name="other")).export(result, parts))
    assert "docker.io/library/other:latest" in images.names


# --- image assembly ----------------------------------------------------------------------


def _layer(store: ContentStore, tar_bytes: bytes) -> Layer:
    blob = gzip.compress(tar_bytes, mtime=0)
    digest = store.put(blob)
    diff_id = check_digest("sha256:" + hashlib.sha256(tar_bytes).hexdigest())
    return Layer(Descriptor(OCI_LAYER_GZIP, digest, len(blob)), diff_id)


def _tar_with(name: str, data: bytes) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


class _Chain:
    def __init__(self, layers: list[Layer]) -> None:
        self.layers = layers

    async def chain(self, name: str | None) -> list[str]:
        assert name == "top"
        return [f"snap{i}" for i in range(len(self.layers))]

    async def layer_of(self, chain: Sequence[str], index: int, opts: CompressionOpts) -> Layer:
        assert chain[index] == f"snap{index}"
        return self.layers[index]


@pytest.mark.parametrize("empty_size", [1024, 10240])  # Go's and Python's empty tar
def test_assembly_drops_an_empty_layer_and_marks_its_history(
    tmp_path: Path, empty_size: int
) -> None:
    store = ContentStore(tmp_path / "content")
    base = _layer(store, _tar_with("base", b"base"))
    empty = _layer(store, b"\0" * empty_size)
    built = _layer(store, _tar_with("app", b"app"))
    assert empty.diff_id == "sha256:" + hashlib.sha256(b"\0" * empty_size).hexdigest()
    history = [{"created_by": "base"}, {"created_by": "RUN true"}, {"created_by": "RUN make"}]
    plan = Plan(
        target=None,
        config={"config": {"Env": ["A=1"], "_maintainer": "me"}, "history": history},
        base_history=({"created_by": "base"},),
        base_layers=1,
        missing=(),
        warnings=(),
    )
    image = asyncio.run(
        make_image(_Chain([base, empty, built]), store, plan, "top", CompressionOpts())
    )

    assert [layer.diff_id for layer in image.layers] == [base.diff_id, built.diff_id]
    manifest, config = read_image(store, image.manifest.digest)
    assert [m["digest"] for m in manifest["layers"]] == [
        base.descriptor.digest,
        built.descriptor.digest,
    ]
    assert config["rootfs"]["diff_ids"] == [base.diff_id, built.diff_id]
    assert [h.get("empty_layer", False) for h in config["history"]] == [False, True, False]
    assert [h["created_by"] for h in config["history"]] == ["base", "RUN true", "RUN make"]
    assert config["author"] == "me" and config["config"] == {"Env": ["A=1"]}
    with store.open(image.config.digest) as f:
        assert json.load(f) == config


def test_assembly_refuses_a_chain_that_does_not_match_the_steps(tmp_path: Path) -> None:
    store = ContentStore(tmp_path / "content")
    base = _layer(store, _tar_with("base", b"base"))
    plan = Plan(None, {"history": [{"created_by": "RUN a"}]}, (), 0, (), ())
    with pytest.raises(UserError, match="internal: 2 snapshots for 0 base layers and 1 steps"):
        asyncio.run(make_image(_Chain([base, base]), store, plan, "top", CompressionOpts()))
