"""SOURCE_DATE_EPOCH without root: the value, the frontend's dates, layer clamping on
plain directories, the output attribute, the CLI's build arg, image assembly.

Expected times are computed here with ``datetime``, never taken from ociworker."""

from __future__ import annotations

import asyncio
import io
import os
import tarfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import zstandard

from ociworker.cli import _build_args
from ociworker.content.image import read_image
from ociworker.content.store import ContentStore
from ociworker.core.epoch import parse_epoch, rfc3339, rfc3339_ns
from ociworker.core.graph import ExecOp, Vertex
from ociworker.core.mounts import Mount
from ociworker.core.oci import Layer
from ociworker.core.outputs import OutputSpec
from ociworker.diff import CompressionOpts, LayerComparer, write_dir_layer
from ociworker.errors import ConfigError
from ociworker.exporter.assemble import (
    LayerOptions,
    epoch_warnings,
    make_image,
    with_epoch,
)
from ociworker.exporter.chain import layer_cache_key
from ociworker.frontend.dockerfile.convert import ImageInfo, Options, Plan, convert
from ociworker.frontend.dockerfile.parser import parse

EPOCH = 1_700_000_000
#: what BuildKit writes for it (Go's RFC 3339 of a whole second), computed independently
CREATED = datetime.fromtimestamp(EPOCH, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
BASE_CONFIG: dict[str, Any] = {
    "config": {"Env": ["PATH=/bin"]},
    "rootfs": {"type": "layers", "diff_ids": ["sha256:" + "a" * 64]},
    "history": [{"created": "2001-02-03T04:05:06Z", "created_by": "base"}],
}


# --- the value --------------------------------------------------------------------------


def test_created_of_the_acceptance_epoch() -> None:
    assert CREATED == "2023-11-14T22:13:20Z"
    assert rfc3339(EPOCH) == CREATED


@pytest.mark.parametrize("seconds", [0, 1, 951_782_400, EPOCH, 4_102_444_800, 253_402_300_799])
def test_rfc3339_of_whole_seconds_is_what_datetime_says(seconds: int) -> None:
    want = datetime.fromtimestamp(seconds, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    assert rfc3339(seconds) == want


@pytest.mark.parametrize("micros", [1, 500_000, 120_000, 999_999, 100])
def test_rfc3339_trims_the_fraction_as_go_does(micros: int) -> None:
    # datetime knows microseconds: its fraction with the trailing zeros trimmed
    dt = datetime.fromtimestamp(EPOCH, tz=UTC).replace(microsecond=micros)
    want = dt.strftime("%Y-%m-%dT%H:%M:%S.%f").rstrip("0") + "Z"
    assert rfc3339(EPOCH, micros * 1000) == want
    assert rfc3339_ns(EPOCH * 1_000_000_000 + micros * 1000) == want


def test_nanoseconds_are_kept() -> None:
    assert rfc3339_ns(EPOCH * 1_000_000_000 + 123_456_789).endswith(":20.123456789Z")


@pytest.mark.parametrize("text", ["0", "1700000000", "253402300799"])
def test_epoch_values_taken(text: str) -> None:
    assert parse_epoch(text) == int(text)


def test_empty_epoch_means_unset() -> None:
    assert parse_epoch("") is None


@pytest.mark.parametrize(
    "text", ["yesterday", "-5", "1.5", " 1700000000", "1_700_000_000", "+1", "0x10", "253402300800"]
)
def test_bad_epoch_is_refused_naming_it(text: str) -> None:
    with pytest.raises(ConfigError, match="SOURCE_DATE_EPOCH"):
        parse_epoch(text)


# --- the frontend -----------------------------------------------------------------------


def _plan(text: str, build_args: dict[str, str]) -> Plan:
    parsed = parse(text)
    images: dict[str, ImageInfo] = {}
    for _ in range(5):
        plan = convert(parsed, Options(build_args=build_args), images)
        if not plan.missing:
            return plan
        for m in plan.missing:
            images[m] = ImageInfo(ref=f"{m}@sha256:" + "b" * 64, config=BASE_CONFIG)
    raise AssertionError("did not converge")


DOCKERFILE = (
    "FROM busybox AS gen\nRUN echo gen > /g\n"
    "FROM busybox\nENV A=1\nRUN echo hi > /f\nCOPY --from=gen /g /g\nLABEL x=y\n"
)


def test_epoch_dates_the_config_and_every_history_entry_of_the_build() -> None:
    plan = _plan(DOCKERFILE, {"SOURCE_DATE_EPOCH": str(EPOCH)})
    assert plan.epoch == EPOCH
    assert plan.config["created"] == CREATED
    history = plan.config["history"]
    # the base image's entry keeps its own date; the four of the Dockerfile say the epoch
    assert history[0] == BASE_CONFIG["history"][0]
    assert [h["created"] for h in history[1:]] == [CREATED] * 4
    assert not plan.warnings


def test_without_epoch_the_frontend_dates_nothing() -> None:
    for args in ({}, {"SOURCE_DATE_EPOCH": ""}):
        plan = _plan(DOCKERFILE, args)
        assert plan.epoch is None
        assert "created" not in plan.config
        assert all("created" not in h for h in plan.config["history"][1:])


def test_epoch_is_never_an_unconsumed_build_arg_but_others_still_are() -> None:
    plan = _plan("FROM busybox\nRUN true\n", {"SOURCE_DATE_EPOCH": "5", "FOO": "1"})
    assert plan.warnings == ("One or more build-args [FOO] were not consumed",)


def _run_env(plan: Plan) -> tuple[str, ...]:
    assert isinstance(plan.target, Vertex)
    runs = [v.op for v in plan.target.walk() if isinstance(v.op, ExecOp)]
    assert len(runs) == 1
    return runs[0].env


def test_run_sees_the_epoch_only_where_an_arg_declares_it() -> None:
    args = {"SOURCE_DATE_EPOCH": str(EPOCH)}
    hidden = _run_env(_plan("FROM busybox\nRUN true\n", args))
    assert not any(e.startswith("SOURCE_DATE_EPOCH=") for e in hidden)
    shown = _run_env(_plan("FROM busybox\nARG SOURCE_DATE_EPOCH\nRUN true\n", args))
    assert f"SOURCE_DATE_EPOCH={EPOCH}" in shown


def test_bad_epoch_build_arg_fails_the_conversion() -> None:
    with pytest.raises(ConfigError, match="invalid SOURCE_DATE_EPOCH 'now'"):
        _plan("FROM busybox\n", {"SOURCE_DATE_EPOCH": "now"})


# --- layers -----------------------------------------------------------------------------


def _tree(root: Path, new: int) -> Path:
    """Files older than the epoch (kept) and newer ones dated ``new`` (clamped)."""
    old = EPOCH - 86_400
    (root / "dir" / "sub").mkdir(parents=True)
    for rel, when in [
        ("old.txt", old),
        ("new.txt", new),
        ("dir/sub/deep.txt", new),
        ("dir/keep.txt", old),
    ]:
        (root / rel).write_text(rel)
        os.utime(root / rel, (new, when))
    (root / "dir" / "link").symlink_to("keep.txt")
    os.utime(root / "dir" / "link", (new, new), follow_symlinks=False)
    os.link(root / "new.txt", root / "dir" / "hard")
    for d in ("dir/sub", "dir", "."):
        os.utime(root / d, (new, new))
    return root


def _entries(store: ContentStore, layer: Layer) -> dict[str, int]:
    blob = store.read(layer.descriptor.digest)
    if layer.descriptor.media_type.endswith("+zstd"):
        blob = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(blob)).read()
    with tarfile.open(fileobj=io.BytesIO(blob)) as tf:
        return {m.name: m.mtime for m in tf.getmembers()}


@pytest.mark.parametrize("compression", ["gzip", "zstd", "uncompressed"])
def test_clamped_layers_of_trees_with_other_new_times_are_the_same_bytes(
    tmp_path: Path, compression: Any
) -> None:
    store = ContentStore(tmp_path / "content")
    a = _tree(tmp_path / "a", EPOCH + 10)
    b = _tree(tmp_path / "b", EPOCH + 99_999)
    opts = CompressionOpts(compression, epoch=EPOCH)
    la, lb = write_dir_layer(store, a, opts), write_dir_layer(store, b, opts)
    assert la == lb
    got = _entries(store, la)
    for rel in ("dir", "dir/sub", "dir/sub/deep.txt", "dir/link", "new.txt", "dir/hard"):
        assert got[rel] == EPOCH, rel
    # older than the epoch: kept as it is on disk
    assert got["old.txt"] == os.lstat(a / "old.txt").st_mtime_ns // 1_000_000_000 == EPOCH - 86_400
    assert got["dir/keep.txt"] == EPOCH - 86_400
    # the control: without the epoch the two trees' layers differ
    plain = CompressionOpts(compression)
    assert write_dir_layer(store, a, plain) != write_dir_layer(store, b, plain)


def test_a_changed_tree_is_clamped_too(tmp_path: Path) -> None:
    """The double walk (a diff between two trees) writes through the same clamp."""
    store = ContentStore(tmp_path / "content")
    lower = _tree(tmp_path / "lower", EPOCH - 500)
    upper = _tree(tmp_path / "upper", EPOCH - 500)
    (upper / "dir" / "added.txt").write_text("added")
    (upper / "new.txt").write_text("changed, longer")
    (upper / "old.txt").unlink()

    def bind(p: Path) -> list[Mount]:
        return [Mount("bind", str(p), ("rbind", "ro"))]

    comparer = LayerComparer(store, scratch_dir=tmp_path / "scratch")
    opts = CompressionOpts("gzip", epoch=EPOCH)
    layer = asyncio.run(comparer.compare(bind(lower), bind(upper), opts))
    got = _entries(store, layer)
    assert got["dir/added.txt"] == got["new.txt"] == got["dir"] == EPOCH
    assert got[".wh.old.txt"] == 0
    assert all(t <= EPOCH for t in got.values())


def test_a_layer_is_remembered_per_epoch() -> None:
    keys = {
        layer_cache_key(CompressionOpts("gzip")),
        layer_cache_key(CompressionOpts("gzip", epoch=EPOCH)),
        layer_cache_key(CompressionOpts("gzip", epoch=EPOCH + 1)),
        layer_cache_key(CompressionOpts("zstd", epoch=EPOCH)),
    }
    assert len(keys) == 4
    assert layer_cache_key(CompressionOpts("gzip")) == "gzip"  # what older roots recorded


# --- outputs ----------------------------------------------------------------------------


@pytest.mark.parametrize("typ", ["oci,dest=o.tar", "docker,dest=d.tar", "image", "layers,dest=l"])
def test_image_outputs_take_rewrite_timestamp(typ: str) -> None:
    for value in ("true", "false"):
        spec = OutputSpec.parse(f"type={typ},rewrite-timestamp={value}")
        assert LayerOptions.parse(spec).rewrite_timestamp is (value == "true")


@pytest.mark.parametrize("typ", ["local,dest=d", "tar,dest=t.tar"])
def test_file_outputs_refuse_rewrite_timestamp(typ: str) -> None:
    with pytest.raises(ConfigError, match="unknown attribute 'rewrite-timestamp'"):
        OutputSpec.parse(f"type={typ},rewrite-timestamp=true")


def test_rewrite_timestamp_must_be_a_bool() -> None:
    with pytest.raises(ConfigError, match="rewrite-timestamp must be true or false"):
        OutputSpec.parse("type=oci,dest=o.tar,rewrite-timestamp=yes")


def test_epoch_clamps_unless_the_last_output_that_says_so_turns_it_off() -> None:
    base = CompressionOpts("zstd", level=5)
    on, off = LayerOptions(rewrite_timestamp=True), LayerOptions(rewrite_timestamp=False)
    assert with_epoch(base, [], EPOCH) == CompressionOpts("zstd", level=5, epoch=EPOCH)
    assert with_epoch(base, [LayerOptions()], EPOCH).epoch == EPOCH
    assert with_epoch(base, [off], EPOCH).epoch is None
    assert with_epoch(base, [off, on], EPOCH).epoch == EPOCH
    assert with_epoch(base, [on, off, LayerOptions()], EPOCH).epoch is None
    assert with_epoch(base, [on], None).epoch is None


def test_rewrite_timestamp_without_epoch_is_warned_about() -> None:
    on = LayerOptions(rewrite_timestamp=True)
    assert epoch_warnings([on], None) == [
        "rewrite-timestamp is specified, but no source-date-epoch was found"
    ]
    assert epoch_warnings([on], EPOCH) == []
    assert epoch_warnings([LayerOptions()], None) == []


# --- the CLI ----------------------------------------------------------------------------


def test_cli_sends_the_environment_epoch_as_a_build_arg(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1234")
    assert _build_args(["A=1"]) == {"A": "1", "SOURCE_DATE_EPOCH": "1234"}
    # a --build-arg wins over the environment, as in buildx
    assert _build_args(["SOURCE_DATE_EPOCH=5"]) == {"SOURCE_DATE_EPOCH": "5"}
    monkeypatch.delenv("SOURCE_DATE_EPOCH")
    assert _build_args(["A=1"]) == {"A": "1"}


# --- image assembly ---------------------------------------------------------------------


class _OneLayer:
    def __init__(self, layer: Layer) -> None:
        self.layer = layer

    async def chain(self, name: str | None) -> list[str]:
        return ["snap"]

    async def layer_of(self, chain: Any, index: int, opts: CompressionOpts) -> Layer:
        return self.layer


def test_assembly_keeps_the_frontends_dates_and_dates_the_rest_now(tmp_path: Path) -> None:
    store = ContentStore(tmp_path / "content")
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_text("f")
    layer = write_dir_layer(store, src, CompressionOpts())
    chain = _OneLayer(layer)
    dated = _plan("FROM scratch\nCOPY f /f\nENV A=1\n", {"SOURCE_DATE_EPOCH": str(EPOCH)})
    image = asyncio.run(make_image(chain, store, dated, "snap", CompressionOpts()))
    _, config = read_image(store, image.manifest.digest)
    assert config["created"] == CREATED
    assert [h["created"] for h in config["history"]] == [CREATED, CREATED]

    before = datetime.fromtimestamp(time.time(), tz=UTC).replace(microsecond=0)
    undated = _plan("FROM scratch\nCOPY f /f\nENV A=1\n", {})
    image = asyncio.run(make_image(chain, store, undated, "snap", CompressionOpts()))
    _, config = read_image(store, image.manifest.digest)
    created = datetime.fromisoformat(config["created"])
    assert created >= before and created.tzinfo is not None
    assert {h["created"] for h in config["history"]} == {config["created"]}
