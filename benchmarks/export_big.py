"""Exporting a 1 GiB layer: the worker's peak RSS and the export's throughput (issue 17).

One embedded build (``ociworker build --root``, the process that exports is the CLI process)
of a Dockerfile whose one RUN writes --mib MiB: half incompressible (/dev/urandom), half
compressible (decimal numbers, one per line, as logs and text compress), with the output
``type=oci,dest=FILE,compression=zstd``.

  peak RSS     VmHWM of the build process, read from /proc/PID/status every 20 ms until it
               exits (VmHWM only grows: the last read is the peak over the whole build, an
               upper bound of the export's); ``ru_maxrss`` from wait4() is printed next to it
               (the largest of the process and the children it reaped: runc/crun, any helper),
               and the highest VmRSS sampled within the export window and before it (where
               the peak happened)
  export       from the start of the first ``exporting ...`` vertex to the end of the last
               one, from the build's own ``--progress=rawjson`` timestamps (the diff, tar,
               compression and digest of the layers, then the OCI archive written)
  reference    ``tar -C TREE -cf - . | zstd -T0 > /dev/null`` on the same tree: the layer
               blob from the OCI archive unpacked into TREE; the best of --repeat runs

throughput = the layer's uncompressed bytes (the tar stream's size) / seconds; the targets
are peak RSS < 200 MiB and the export at >= 80% of the reference's throughput.

Run as root: .venv/bin/python benchmarks/export_big.py [--mib 1024] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

DEFAULT_BASE = "127.0.0.1:5000/busybox:latest"
MiB = 1024 * 1024


def dockerfile(mib: int) -> str:
    half = mib * MiB // 2
    return (
        "ARG BASE\nFROM $BASE\n"
        f"RUN mkdir /data && head -c {half} /dev/urandom > /data/random.bin"
        f" && seq 1 200000000 | head -c {half} > /data/numbers.txt\n"
    )


def _timestamp(value: str) -> float:
    # RFC 3339 with up to nanoseconds and a Z: fromisoformat takes microseconds
    value = re.sub(r"(\.\d{6})\d*", r"\1", value.replace("Z", "+00:00"))
    return datetime.fromisoformat(value).timestamp()


def export_window(lines: Iterable[str]) -> tuple[float, dict[str, float]]:
    """Seconds from the first ``exporting`` vertex's start to the last one's completion in a
    rawjson progress stream, and each such vertex's own seconds (by name)."""
    start, end, parts = export_span(lines)
    return end - start, parts


def export_span(lines: Iterable[str]) -> tuple[float, float, dict[str, float]]:
    """``export_window`` as the epoch seconds of its start and end, and the parts."""
    spans: dict[str, tuple[float, float]] = {}
    for line in lines:
        line = line.strip()
        if not line.startswith("{"):
            continue
        for v in json.loads(line).get("vertexes") or []:
            name = v.get("name", "")
            if name.startswith("exporting") and v.get("started") and v.get("completed"):
                spans[name] = (_timestamp(v["started"]), _timestamp(v["completed"]))
    if not spans:
        raise ValueError("no completed 'exporting' vertex in the progress")
    start = min(s for s, _ in spans.values())
    end = max(e for _, e in spans.values())
    return start, end, {name: e - s for name, (s, e) in spans.items()}


def status_kib(pid: int, field: str) -> int | None:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    m = re.search(rf"^{field}:\s+(\d+) kB", text, re.M)
    return int(m.group(1)) if m else None


@dataclass(frozen=True)
class Built:
    archive: Path
    export_s: float
    #: each ``exporting ...`` vertex's own seconds
    parts: dict[str, float]
    vmhwm_kib: int
    ru_maxrss_kib: int
    #: the highest VmRSS sampled within the export window, and before it
    export_rss_kib: int
    before_rss_kib: int


def build(args: argparse.Namespace, work: Path) -> Built:
    ctx = work / "ctx"
    ctx.mkdir()
    (ctx / "Dockerfile").write_text(dockerfile(args.mib))
    out = work / "image.tar"
    progress = work / "progress.jsonl"
    argv = [sys.executable, "-m", "ociworker", "build", f"--root={work / 'root'}"]
    argv += ["--progress=rawjson", f"--build-arg=BASE={args.base}"]
    argv += [f"--output=type=oci,dest={out},compression=zstd", str(ctx)]
    with progress.open("wb") as log:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        hwm = [0]
        rss: list[tuple[float, int]] = []  # (epoch seconds, VmRSS), to place the peak
        done = threading.Event()

        def poll() -> None:
            while not done.is_set():
                value = status_kib(proc.pid, "VmHWM")
                if value is not None:
                    hwm[0] = max(hwm[0], value)
                now = status_kib(proc.pid, "VmRSS")
                if now is not None:
                    rss.append((time.time(), now))
                time.sleep(0.02)

        watcher = threading.Thread(target=poll, daemon=True)
        watcher.start()
        # wait4 and not proc.wait(): its rusage has the peak RSS of what it reaped
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        done.set()
        watcher.join()
    text = progress.read_text(errors="replace")
    if proc.returncode != 0:
        raise SystemExit(f"the build failed ({proc.returncode}):\n{text[-3000:]}")
    start, end, parts = export_span(text.splitlines())
    during = max((kib for t, kib in rss if start <= t <= end), default=0)
    before = max((kib for t, kib in rss if t < start), default=0)
    return Built(out, end - start, parts, hwm[0], usage.ru_maxrss, during, before)


def layer_tree(archive: Path, dest: Path) -> tuple[int, int]:
    """Unpack the image's last layer into ``dest``; its uncompressed and compressed sizes."""
    with tarfile.open(archive) as tar:

        def blob(digest: str) -> bytes:
            f = tar.extractfile("blobs/" + digest.replace(":", "/"))
            assert f is not None
            return f.read()

        index = json.loads(tar.extractfile("index.json").read())  # type: ignore[union-attr]
        manifest = json.loads(blob(index["manifests"][0]["digest"]))
        layer = manifest["layers"][-1]
        if "zstd" not in layer["mediaType"]:
            raise SystemExit(f"the layer is {layer['mediaType']}, not zstd")
        member = "blobs/" + layer["digest"].replace(":", "/")
    dest.mkdir()
    blob_out = subprocess.Popen(["tar", "-xOf", archive, member], stdout=subprocess.PIPE)
    unzstd = subprocess.Popen(["zstd", "-dc"], stdin=blob_out.stdout, stdout=subprocess.PIPE)
    untar = subprocess.Popen(["tar", "-x", "-C", dest], stdin=subprocess.PIPE)
    assert unzstd.stdout is not None and untar.stdin is not None
    raw = 0
    while chunk := unzstd.stdout.read(MiB):
        raw += len(chunk)
        untar.stdin.write(chunk)
    untar.stdin.close()
    if any(p.wait() != 0 for p in (blob_out, unzstd, untar)):
        raise SystemExit("unpacking the layer failed")
    return raw, int(layer["size"])


def reference(tree: Path, repeat: int) -> float:
    """The best seconds of ``tar -C tree -cf - . | zstd -T0 > /dev/null``."""
    best = float("inf")
    for _ in range(repeat):
        subprocess.run(["sync"], check=True)
        t0 = time.perf_counter()
        subprocess.run(
            ["bash", "-c", 'tar -C "$1" -cf - . | zstd -T0 -q > /dev/null', "-", tree], check=True
        )
        best = min(best, time.perf_counter() - t0)
    return best


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--mib", type=int, default=1024, help="size of the layer's data (MiB)")
    p.add_argument("--base", default=DEFAULT_BASE, help="base image")
    p.add_argument("--repeat", "-n", type=int, default=3, help="reference runs (best)")
    p.add_argument("--dir", type=Path, default=Path("/var/tmp"), help="where to work")
    p.add_argument("--json", type=Path, help="also write the figures here")
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        raise SystemExit("export_big.py needs root (an embedded build)")
    if shutil.which("zstd") is None:
        raise SystemExit("zstd is not installed")
    work = Path(tempfile.mkdtemp(prefix="ociexport-", dir=args.dir))
    try:
        got = build(args, work)
        raw, compressed = layer_tree(got.archive, work / "tree")
        ref = reference(work / "tree", args.repeat)
    finally:
        subprocess.run(["umount", "-R", "--lazy", str(work / "root")], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)
    figures = {
        "layer_bytes": raw,
        "layer_zstd_bytes": compressed,
        "peak_rss_mib": got.vmhwm_kib / 1024,
        "ru_maxrss_mib": got.ru_maxrss_kib / 1024,
        "export_rss_mib": got.export_rss_kib / 1024,
        "before_export_rss_mib": got.before_rss_kib / 1024,
        "export_s": got.export_s,
        "export_vertices_s": got.parts,
        "export_mib_s": raw / MiB / got.export_s,
        "tar_zstd_s": ref,
        "tar_zstd_mib_s": raw / MiB / ref,
        "throughput_ratio": ref / got.export_s,
    }
    print(f"layer: {raw / MiB:.0f} MiB uncompressed, {compressed / MiB:.0f} MiB as zstd")
    print(
        f"peak RSS of the build process: {got.vmhwm_kib / 1024:.0f} MiB (VmHWM; target"
        f" < 200), ru_maxrss {got.ru_maxrss_kib / 1024:.0f} MiB; highest VmRSS sampled during"
        f" the export {got.export_rss_kib / 1024:.0f} MiB, before it"
        f" {got.before_rss_kib / 1024:.0f} MiB"
    )
    for name, seconds in sorted(got.parts.items()):
        print(f"  {name}: {seconds:.2f}s")
    print(
        f"export: {got.export_s:.2f}s = {raw / MiB / got.export_s:.0f} MiB/s; tar | zstd -T0:"
        f" {ref:.2f}s = {raw / MiB / ref:.0f} MiB/s; ratio"
        f" {ref / got.export_s:.0%} (target >= 80%)"
    )
    print(json.dumps(figures))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
