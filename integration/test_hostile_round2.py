"""Hostile input, second round (issue 18 item 4): base layers served by the real registry
that are decompression bombs, carry a 1 GiB tar header or whiteout the root, and RUN steps
that race the worker's mounts. Each case checks the error the user sees (no traceback), that
a canary dir outside the state dir is untouched, and that the worker builds afterwards.

The bounds a layer meets (``ociworker.diff.tarutil``): past its first GiB a layer may not
decompress to more than 1100x its compressed size, extraction stops with "no space left on
device" while its filesystem still has min(5%, 1 GiB) free, and a PAX or GNU long-name record
may not exceed 1 MiB (Go's archive/tar's limit).
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
import uuid
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zstandard

from ociworker.content.store import ContentStore
from ociworker.core.oci import (
    OCI_CONFIG,
    OCI_LAYER_GZIP,
    OCI_LAYER_ZSTD,
    OCI_MANIFEST,
    Descriptor,
    Platform,
)
from ociworker.registry.client import RegistryClient

_ZERO_MIB = bytes(1 << 20)


# --- building hostile images ---------------------------------------------------------------


def _header(name: str, size: int, kind: bytes = tarfile.REGTYPE) -> bytes:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.size = size
    info.mode = 0o644
    return info.tobuf(format=tarfile.USTAR_FORMAT)


def _end() -> bytes:
    return bytes(1024)


class _Layer:
    """A layer tar streamed through sha256 (its diffID) and a compressor, so a 4 GiB
    bomb is made in a few seconds without holding it."""

    def __init__(self, compression: str) -> None:
        self.sha = hashlib.sha256()
        self.compression = compression
        if compression == "gzip":
            # level 1 and raw deflate in a gzip wrapper: zeros compress at ~1000:1 anyway
            self._z = zlib.compressobj(1, zlib.DEFLATED, 31)
            self._out = io.BytesIO()
        else:
            self._out = io.BytesIO()
            self._zw = zstandard.ZstdCompressor(level=3).stream_writer(self._out, closefd=False)

    def write(self, data: bytes) -> None:
        self.sha.update(data)
        if self.compression == "gzip":
            self._out.write(self._z.compress(data))
        else:
            self._zw.write(data)

    def zeros(self, n: int) -> None:
        while n > 0:
            chunk = _ZERO_MIB[: min(n, len(_ZERO_MIB))]
            self.write(chunk)
            n -= len(chunk)

    def finish(self) -> tuple[bytes, str, str]:
        """(blob, media type, diffID)."""
        if self.compression == "gzip":
            self._out.write(self._z.flush())
            media = OCI_LAYER_GZIP
        else:
            self._zw.flush(zstandard.FLUSH_FRAME)
            media = OCI_LAYER_ZSTD
        return self._out.getvalue(), media, "sha256:" + self.sha.hexdigest()


def _zero_file_layer(name: str, size: int, compression: str) -> tuple[bytes, str, str]:
    layer = _Layer(compression)
    layer.write(_header(name, size))
    layer.zeros(size)
    layer.write(_end())
    return layer.finish()


def _plain_layer(tar: bytes) -> tuple[bytes, str, str]:
    return gzip.compress(tar), OCI_LAYER_GZIP, "sha256:" + hashlib.sha256(tar).hexdigest()


async def _push(repo: str, blob: bytes, media: str, diff_id: str, store: ContentStore) -> None:
    """busybox's layers plus ``blob`` on top, pushed as ``repo``."""
    client = RegistryClient()
    try:
        base = await client.resolve(
            "127.0.0.1:5000/busybox:latest", Platform("linux", "amd64"), store=store
        )
        for d in base.layer_descriptors:
            await client.fetch_blob("127.0.0.1:5000/busybox:latest", d, store)
        config = json.loads(base.config_json)
        layer = Descriptor(media, store.put(blob), len(blob))
        config["rootfs"]["diff_ids"].append(diff_id)
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


def push_hostile(tmp: Path, what: str, layer: tuple[bytes, str, str]) -> str:
    repo = f"127.0.0.1:5000/ociworker-test/r2-{what}-{uuid.uuid4().hex[:8]}:latest"
    asyncio.run(_push(repo, *layer, ContentStore(tmp / f"push-{uuid.uuid4().hex[:6]}")))
    return repo


# --- running the worker ----------------------------------------------------------------------


def build(
    tmp: Path,
    dockerfile: str,
    root: Path,
    *extra: str,
    files: dict[str, str] | None = None,
    files_bytes: dict[str, bytes] | None = None,
) -> subprocess.CompletedProcess[str]:
    ctx = tmp / f"ctx-{uuid.uuid4().hex[:6]}"
    ctx.mkdir()
    (ctx / "Dockerfile").write_text(dockerfile)
    for name, text in (files or {}).items():
        (ctx / name).write_text(text)
    for name, data in (files_bytes or {}).items():
        (ctx / name).write_bytes(data)
    out = tmp / f"out-{uuid.uuid4().hex[:6]}"
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
            *extra,
            "--output",
            f"type=local,dest={out}",
            str(ctx),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )


def assert_clear_failure(proc: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    for needle in needles:
        assert needle in proc.stderr, proc.stderr


def assert_still_builds(tmp: Path, root: Path) -> None:
    marker = uuid.uuid4().hex
    proc = build(tmp, f"FROM 127.0.0.1:5000/busybox:latest\nRUN echo {marker} > /m\n", root)
    assert proc.returncode == 0, proc.stderr


@pytest.fixture
def canary(tmp_path: Path) -> Iterator[Path]:
    """A dir outside every state dir; the test must leave it as it was."""
    d = tmp_path / "canary"
    (d / "b" / "c").mkdir(parents=True)
    (d / "keep").write_text("untouched")
    (d / "empty").write_bytes(b"")
    before = _snapshot(d)
    yield d
    assert _snapshot(d) == before


def _snapshot(d: Path) -> list[tuple[str, int, int, bytes]]:
    out = []
    for p in sorted(d.rglob("*")):
        st = p.lstat()
        data = p.read_bytes() if p.is_file() and not p.is_symlink() else b""
        out.append((str(p.relative_to(d)), st.st_mode, st.st_mtime_ns, data))
    return out


def _du(path: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for f in files:
            with contextlib.suppress(FileNotFoundError):
                total += os.lstat(os.path.join(dirpath, f)).st_blocks * 512
    return total


@pytest.fixture
def small_fs(tmp_path: Path, require_root: None) -> Iterator[Path]:
    """A 256 MiB tmpfs, the worker's whole state dir: a bomb meets its disk there."""
    d = tmp_path / "small"
    d.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256m", "tmpfs", str(d)], check=True)
    try:
        yield d
    finally:
        subprocess.run(["umount", "-R", "-l", str(d)], check=False)


# --- decompression bombs -----------------------------------------------------------------------


def test_gzip_bomb_stops_at_the_disk_reserve(
    tmp_path: Path, canary: Path, small_fs: Path, base_image: str
) -> None:
    # 1 GiB of zeros in one file: ~1 MiB of gzip, four times the disk the worker has
    repo = push_hostile(tmp_path, "gzip-bomb", _zero_file_layer("zeros", 1 << 30, "gzip"))
    root = small_fs / "state"
    proc = build(tmp_path, f"FROM {repo}\nRUN true\n", root)
    assert_clear_failure(proc, "no space left on device", "stopped")
    st = os.statvfs(small_fs)
    # the reserve held: the failed layer's partial snapshot is gone, the disk is not full
    assert st.f_bavail * st.f_frsize > (256 << 20) // 2
    assert_still_builds(tmp_path, root)


def test_zstd_bomb_stops_at_the_ratio_bound(
    tmp_path: Path, canary: Path, base_image: str, require_root: None
) -> None:
    # 3 GiB of zeros in one file: ~100 KiB of zstd; the bound is the first GiB
    layer = _zero_file_layer("zeros", 3 << 30, "zstd")
    assert len(layer[0]) * 1100 < 1 << 30
    repo = push_hostile(tmp_path, "zstd-bomb", layer)
    root = tmp_path / "state"
    proc = build(tmp_path, f"FROM {repo}\nRUN true\n", root)
    assert_clear_failure(proc, "decompression bomb", "decompresses to more than")
    # what it had written was removed with the failed snapshot
    assert _du(root) < 256 << 20
    assert_still_builds(tmp_path, root)


def test_zstd_bomb_after_the_end_of_the_tar_is_bounded(
    tmp_path: Path, canary: Path, base_image: str, require_root: None
) -> None:
    # a valid tiny tar, then 3 GiB of zeros that never reach the disk but would be
    # decompressed and hashed for the diffID
    layer = _Layer("zstd")
    layer.write(_header("hello", 5) + b"hello" + bytes(507))
    layer.write(_end())
    layer.zeros(3 << 30)
    repo = push_hostile(tmp_path, "zstd-trailer-bomb", layer.finish())
    root = tmp_path / "state"
    proc = build(tmp_path, f"FROM {repo}\nRUN true\n", root)
    assert_clear_failure(proc, "decompression bomb")
    assert_still_builds(tmp_path, root)


# --- a 1 GiB tar header --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("what", "kind"),
    [
        ("pax-header", tarfile.XHDTYPE),
        ("pax-global", tarfile.XGLTYPE),
        ("gnu-longname", tarfile.GNUTYPE_LONGNAME),
        ("gnu-longlink", tarfile.GNUTYPE_LONGLINK),
    ],
)
def test_a_1gib_tar_header_is_refused(
    tmp_path: Path, canary: Path, base_image: str, require_root: None, what: str, kind: bytes
) -> None:
    layer = _Layer("gzip")
    layer.write(_header("././@LongHeader", 1 << 30, kind))
    layer.zeros(1 << 30)
    layer.write(_header("after", 0) + _end())
    repo = push_hostile(tmp_path, f"{what}-1g", layer.finish())
    root = tmp_path / "state"
    proc = build(tmp_path, f"FROM {repo}\nRUN true\n", root)
    assert_clear_failure(proc, f"record of {1 << 30} bytes", "1048576 bytes allowed")
    assert_still_builds(tmp_path, root)


# --- a whiteout of / -----------------------------------------------------------------------


def _entries(*names: str, kind: bytes = tarfile.REGTYPE) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name in names:
            info = tarfile.TarInfo(name)
            info.type = kind
            info.mode = 0o644
            tf.addfile(info, io.BytesIO(b""))
    return buf.getvalue()


def test_opaque_whiteout_at_the_root_hides_only_lower_layers(
    tmp_path: Path, canary: Path, base_image: str, require_root: None
) -> None:
    # An opaque root is legal (the layer replaces the whole tree), so it is applied:
    # busybox's files vanish, this layer's stay, and nothing outside the snapshot goes.
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, data in ((".wh..wh..opq", b""), ("kept", b"mine")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    repo = push_hostile(tmp_path, "opaque-root", _plain_layer(buf.getvalue()))
    out = tmp_path / "opaque-out"
    proc = subprocess.run(
        [
            sys.executable, "-m", "ociworker", "build", "--root", str(tmp_path / "state"),
            "--progress", "plain", "--output", f"type=local,dest={out}", "-",
        ],
        input=f"FROM {repo}\n",
        capture_output=True,
        text=True,
        timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["kept"]
    assert (out / "kept").read_text() == "mine"
    assert_still_builds(tmp_path, tmp_path / "state")


@pytest.mark.parametrize(
    ("what", "name"),
    [
        ("wh-dot", ".wh.."),
        ("wh-dotdot", ".wh..."),
        ("wh-slash", "/.wh./"),
        ("wh-empty", ".wh."),
        ("wh-dotdot-abs", "/.wh..."),
    ],
)
def test_whiteout_naming_the_root_fails_clearly(
    tmp_path: Path, canary: Path, base_image: str, require_root: None, what: str, name: str
) -> None:
    repo = push_hostile(tmp_path, what, _plain_layer(_entries(name)))
    root = tmp_path / "state"
    proc = build(tmp_path, f"FROM {repo}\nRUN true\n", root)
    assert_clear_failure(proc, "names no entry")
    assert_still_builds(tmp_path, root)


# --- mount stubs swapped for symlinks (CVE-2024-23652 class) ----------------------------------


def test_mount_stub_swapped_for_a_symlink_removes_nothing_outside(
    tmp_path: Path, canary: Path, base_image: str, require_root: None
) -> None:
    # The runtime makes /a/b/c (and /a/b, /a) for the tmpfs; the step moves /a away and
    # puts a symlink to a host dir shaped like the stubs there. The cleanup that removes
    # the stubs after the step must not follow it: canary/b/c and canary/empty stay.
    dockerfile = (
        f"FROM {base_image}\n"
        "RUN --mount=type=tmpfs,target=/a/b/c --mount=type=bind,source=f,target=/a/empty "
        f"sh -c 'mv /a /a2 && ln -s {canary} /a && ls -la /a2'\n"
    )
    root = tmp_path / "state"
    proc = build(tmp_path, dockerfile, root, "--no-cache", files={"f": "x"})
    assert proc.returncode == 0, proc.stderr
    assert (canary / "b" / "c").is_dir()
    assert (canary / "empty").is_file()
    assert_still_builds(tmp_path, root)


# --- a cache mount's source= swapped for a symlink while a step runs -------------------------


def test_cache_source_swapped_for_a_symlink_cannot_redirect_the_mount(
    tmp_path: Path, canary: Path, base_image: str, require_root: None
) -> None:
    # Stage `attacker` holds the shared cache and waits for the worker to make `sub`
    # (it does when the victim step asks for source=sub), then at once swaps `sub` for a
    # symlink to a host dir. The worker resolved `sub` before; the runtime binds it a
    # moment later. Bound by path, the victim's mount would be the host dir and its
    # `touch` would land there; bound through the descriptor resolved inside the cache,
    # it lands in the cache dir that was `sub`.
    tag = uuid.uuid4().hex[:8]
    dockerfile = f"""\
FROM {base_image} AS attacker
RUN --mount=type=cache,id=race-{tag},target=/c sh -c '\\
  rm -rf /c/sub /c/old; touch /c/ready; i=0; \\
  while [ ! -d /c/sub ]; do i=$((i+1)); [ $i -lt 5000000 ] || exit 3; done; \\
  mv /c/sub /c/old && ln -s {canary} /c/sub && echo swapped; sleep 3'
RUN echo attacker-done > /attacker

FROM {base_image} AS victim
RUN --mount=type=cache,id=race-{tag},target=/w sh -c '\\
  i=0; while [ ! -e /w/ready ]; do i=$((i+1)); [ $i -lt 600 ] || exit 4; sleep 0.1; done'
RUN --mount=type=cache,id=race-{tag},target=/m,source=sub sh -c '\\
  touch /m/pwned; ls -la /m; echo ok > /victim'

FROM {base_image}
COPY --from=attacker /attacker /attacker
COPY --from=victim /victim /victim
"""
    root = tmp_path / "state"
    proc = build(tmp_path, dockerfile, root, "--no-cache")
    assert proc.returncode == 0, proc.stderr
    assert "swapped" in proc.stderr, proc.stderr
    assert not (canary / "pwned").exists()
    # The victim's file is inside the cache, in whichever dir was `sub` when the worker
    # pinned it: the one since moved to `old`; a `sub` made again when the move came
    # between resolving and opening (the symlink then lands inside it); or the path the
    # symlink names resolved inside the cache, as if the cache were /. Never outside.
    cache_root = root / "cachemounts"
    found = [
        Path(top) / "pwned"
        for top, _dirs, files in os.walk(cache_root)  # never follows a symlink
        if "pwned" in files
    ]
    assert len(found) == 1, proc.stderr
    assert found[0].relative_to(cache_root).parts[1] == "i0"
    assert_still_builds(tmp_path, root)


# --- a manifest over 4 MiB ---------------------------------------------------------------------
#
# Debian's docker-registry (distribution 2.8) refuses to store a manifest over 4 MiB and to
# serve one ("storage: read exceeds limit"), so the registry here is a hostile one: a loopback
# HTTP server speaking just enough of the distribution API to serve it.


class _HostileRegistry:
    def __init__(self, body: bytes | None) -> None:
        import http.server
        import threading

        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                if self.path == "/v2/":
                    self.send_response(200)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if not self.path.startswith("/v2/big/manifests/"):
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Type", OCI_MANIFEST)
                if outer.body is not None:
                    self.send_header("Content-Length", str(len(outer.body)))
                    self.end_headers()
                    self.wfile.write(outer.body)
                    return
                # no length, never ends: only the reader's bound stops it
                self.end_headers()
                outer.endless_started = True
                try:
                    while True:
                        self.wfile.write(b" " * 65536)
                except OSError:
                    pass

            def do_HEAD(self) -> None:
                self.send_error(405)

        self.body = body
        self.endless_started = False
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.addr = f"127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.parametrize("endless", [False, True], ids=["5mib", "endless"])
def test_manifest_over_4mib_is_refused(
    tmp_path: Path, canary: Path, base_image: str, require_root: None, endless: bool
) -> None:
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": "sha256:" + "0" * 64, "size": 2},
        "layers": [],
        "annotations": {"pad": "x" * (5 << 20)},
    }
    registry = _HostileRegistry(None if endless else json.dumps(manifest).encode())
    try:
        root = tmp_path / "state"
        proc = build(tmp_path, f"FROM {registry.addr}/big:latest\nRUN true\n", root)
        assert_clear_failure(proc, "manifest of", f"more than {4 << 20} bytes")
        assert registry.endless_started == endless
    finally:
        registry.close()
    assert_still_builds(tmp_path, root)


# --- device nodes in a rootless build -------------------------------------------------------


def _devices_layer() -> tuple[bytes, str, str]:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, kind, major, minor in (
            ("devs/null2", tarfile.CHRTYPE, 1, 3),
            ("devs/loop9", tarfile.BLKTYPE, 7, 9),
            ("devs/kmem", tarfile.CHRTYPE, 1, 2),
            ("devs/fifo", tarfile.FIFOTYPE, 0, 0),
        ):
            info = tarfile.TarInfo(name)
            info.type = kind
            info.mode = 0o666
            info.devmajor, info.devminor = major, minor
            tf.addfile(info)
        info = tarfile.TarInfo("devs/plain")
        info.size = 2
        tf.addfile(info, io.BytesIO(b"ok"))
    return _plain_layer(buf.getvalue())


def test_rootless_build_skips_a_layers_device_nodes(
    tmp_path: Path, canary: Path, base_image: str, as_user: Any
) -> None:
    # BuildKit rootless (containerd's archive code) leaves device nodes out: a user
    # namespace cannot make them. The fifo and the plain file are kept.
    repo = push_hostile(tmp_path, "devices-rootless", _devices_layer())
    ctx = as_user.home / "ctx-dev"
    ctx.mkdir()
    (ctx / "Dockerfile").write_text(f"FROM {repo}\nRUN ls -la /devs\n")
    out = as_user.home / "out-dev"
    proc = as_user.run(
        "build", "--progress", "plain", "--output", f"type=local,dest={out}", str(ctx),
        check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in (out / "devs").iterdir()) == ["fifo", "plain"]
    assert (out / "devs" / "plain").read_text() == "ok"


def test_rootless_run_mknod_fails_with_the_commands_error(
    tmp_path: Path, canary: Path, base_image: str, as_user: Any
) -> None:
    ctx = as_user.home / "ctx-mknod"
    ctx.mkdir()
    (ctx / "Dockerfile").write_text(f"FROM {base_image}\nRUN mknod /kmem c 1 2\n")
    proc = as_user.run("build", "--progress", "plain", str(ctx), check=False)
    assert_clear_failure(proc, "Operation not permitted", "did not complete successfully")
    # and the worker still builds
    (ctx / "Dockerfile").write_text(f"FROM {base_image}\nRUN echo fine\n")
    again = as_user.run("build", "--progress", "plain", str(ctx), check=False)
    assert again.returncode == 0, again.stderr


def test_add_of_a_gzip_bomb_archive_stops_at_the_disk_reserve(
    tmp_path: Path, canary: Path, small_fs: Path, base_image: str
) -> None:
    # ADD unpacks a local archive: 1 GiB of zeros, ~1 MiB gzipped, onto a 256 MiB disk
    blob, _, _ = _zero_file_layer("zeros", 1 << 30, "gzip")
    root = small_fs / "state"
    proc = build(
        tmp_path,
        f"FROM {base_image}\nADD bomb.tar.gz /x/\n",
        root,
        files_bytes={"bomb.tar.gz": blob},
    )
    assert_clear_failure(proc, "no space left on device", "stopped", "zeros")
    st = os.statvfs(small_fs)
    assert st.f_bavail * st.f_frsize > (256 << 20) // 2
    assert_still_builds(tmp_path, root)
