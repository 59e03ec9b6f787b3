"""Layer export throughput against the floor of ``tar | zstd -T0`` (issue 17); prints figures.

A tree of ``--mib`` MiB (half incompressible, half text-like, in 64 MiB files plus
``--small`` small files) is made once; then, alternating, each contender turns it
into a compressed tar ``--repeat`` times, with a ``sync`` before each run:

  floor      ``tar --sort=name -cf - . | zstd -T0 -<level> -q > FILE``
  ociworker  ``write_dir_layer`` (tar + diffID sha256 + zstd + blob sha256 + commit) in a
             child process, whose peak RSS is read from ``wait4``

The medians and the ratio floor/ours (the issue's target: >= 0.80, peak RSS < 200 MiB)
are printed as a table and, with ``--json``, as JSON. Never run by scripts/test.

Run: .venv/bin/python benchmarks/layer_throughput.py [--mib 1024] [--repeat 3] [--dir DIR]
     [--compression zstd|gzip] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

FILE_MIB = 64


@dataclass(frozen=True)
class Run:
    tool: str
    seconds: float
    max_rss_kib: int  # 0 when not measured (a shell pipeline)


def make_tree(root: Path, mib: int, small: int, seed: int = 1) -> int:
    """Half random, half text-like data in 64 MiB files, plus ``small`` tiny files;
    the bytes written."""
    rng = random.Random(seed)
    words = [rng.randbytes(rng.randrange(3, 9)).hex().encode() for _ in range(4096)]
    text = b" ".join(rng.choice(words) for _ in range(300_000))[: 1 << 20]
    written = 0
    for i in range(max(1, mib // FILE_MIB)):
        path = root / "big" / f"f{i:03d}"
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("wb") as f:
            for j in range(FILE_MIB):
                # the odd files are text-like (compressible), the even ones random
                chunk = text[j:] + text[:j] if i % 2 else rng.randbytes(1 << 20)
                f.write(chunk)
                written += len(chunk)
    for i in range(small):
        path = root / "small" / f"d{i % 100:02d}" / f"{i}"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"%d\n" % i)
        written += len(str(i)) + 1
    return written


def floor_argv(tree: Path, out: Path, compression: str, level: int) -> list[str]:
    comp = f"zstd -T0 -{level} -q" if compression == "zstd" else f"gzip -{level}"
    cmd = f"tar -C {tree} --sort=name -cf - . | {comp} > {out}"
    return ["bash", "-o", "pipefail", "-c", cmd]


OURS = """
import sys
from pathlib import Path
from ociworker.content.store import ContentStore
from ociworker.diff import CompressionOpts, write_dir_layer
layer = write_dir_layer(ContentStore(Path(sys.argv[2])), Path(sys.argv[1]),
                        CompressionOpts(compression=sys.argv[3], level=int(sys.argv[4])))
print(layer.descriptor.digest, layer.descriptor.size)
"""


def timed(argv: list[str]) -> tuple[float, int]:
    """Wall seconds and peak RSS (KiB, of the biggest process waited for) of ``argv``."""
    subprocess.run(["sync"], check=True)
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{argv[:3]} failed with {proc.returncode}")
    return seconds, usage.ru_maxrss


def summarise(runs: list[Run], mib: float) -> dict[str, dict[str, float]]:
    """Per tool: median seconds, MiB/s and the worst peak RSS in MiB."""
    out: dict[str, dict[str, float]] = {}
    for tool in sorted({r.tool for r in runs}):
        mine = [r for r in runs if r.tool == tool]
        med = statistics.median(r.seconds for r in mine)
        out[tool] = {
            "median_s": round(med, 3),
            "mib_per_s": round(mib / med, 1) if med else 0.0,
            "max_rss_mib": round(max(r.max_rss_kib for r in mine) / 1024, 1),
        }
    return out


def format_table(summary: dict[str, dict[str, float]]) -> str:
    lines = [f"{'tool':<10} {'median s':>9} {'MiB/s':>8} {'peak RSS MiB':>13}"]
    for tool, s in summary.items():
        lines.append(
            f"{tool:<10} {s['median_s']:>9.3f} {s['mib_per_s']:>8.1f} {s['max_rss_mib']:>13.1f}"
        )
    if "floor" in summary and "ociworker" in summary and summary["floor"]["mib_per_s"]:
        ratio = summary["ociworker"]["mib_per_s"] / summary["floor"]["mib_per_s"]
        lines.append(f"ociworker / floor throughput: {ratio:.2f} (target >= 0.80)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=1024)
    ap.add_argument("--small", type=int, default=2000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--compression", choices=("zstd", "gzip"), default="zstd")
    ap.add_argument("--level", type=int, default=3)
    ap.add_argument("--dir", type=Path, help="work dir (default: a temporary one)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    work = Path(args.dir or tempfile.mkdtemp(prefix="layer-throughput-"))
    tree = work / "tree"
    if not tree.exists():
        tree.mkdir(parents=True)
        make_tree(tree, args.mib, args.small)
    total = sum(p.stat().st_size for p in tree.rglob("*") if p.is_file()) / (1 << 20)
    runs: list[Run] = []
    for rep in range(args.repeat):
        order = ["floor", "ociworker"] if rep % 2 == 0 else ["ociworker", "floor"]
        for tool in order:
            out = work / "out"
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir()
            if tool == "floor":
                cmd = floor_argv(tree, out / "blob", args.compression, args.level)
            else:
                cmd = [sys.executable, "-c", OURS, str(tree), str(out / "content")]
                cmd += [args.compression, str(args.level)]
            seconds, rss = timed(cmd)
            runs.append(Run(tool, seconds, rss if tool == "ociworker" else 0))
            print(f"# {tool} run {rep + 1}: {seconds:.3f}s", file=sys.stderr, flush=True)
    summary = summarise(runs, total)
    print(f"{total:.0f} MiB, compression={args.compression} level={args.level}")
    print(format_table(summary))
    if args.json:
        print(json.dumps({"mib": total, "runs": [asdict(r) for r in runs], "summary": summary}))
    if not args.dir:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
