"""Incremental context sync (ociworker.session.filesync) on issue 5's case; prints figures.

A ~120 MiB / 3,000-file context is synced into a fresh ContextStore, then once
unchanged and once after one file was rewritten. For each round: the seconds of
the client's scan, of the worker's plan (validate + lock + compare:
``ContextStore.begin``), of the content transfer plus ``finish``, and the bytes
received against the context's total (the issue asks under 1% for one change).
Both ends run in this process, so the transfer is a local copy, not a network.

Run: .venv/bin/python benchmarks/filesync.py [--files 3000] [--mib 120] [--dir DIR]
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from pathlib import Path

from ociworker.session.filesync import ContextStore, read_chunks, scan


def make_context(root: Path, files: int, total: int, rng: random.Random) -> int:
    """``files`` files in 30 dirs, sizes drawn around total/files; the bytes written."""
    weights = [rng.uniform(0.1, 1.9) for _ in range(files)]
    scale = total / sum(weights)
    block = rng.randbytes(1 << 20)
    written = 0
    for i, w in enumerate(weights):
        size = max(1, int(w * scale))
        path = root / f"dir{i % 30:02d}" / f"sub{i % 7}" / f"file{i:05d}.bin"
        path.parent.mkdir(parents=True, exist_ok=True)
        start = rng.randrange(len(block))
        data = (block[start:] + block[:start]) * (size // len(block) + 1)
        path.write_bytes(data[:size])
        written += size
    return written


def sync_round(store: ContextStore, src: Path, label: str, total: int) -> int:
    t0 = time.perf_counter()
    stats = scan(src, None)
    t1 = time.perf_counter()
    sizes = {s.path: s.size for s in stats}
    with store.begin("bench-host:" + str(src) + ":Dockerfile", stats) as t:
        t2 = time.perf_counter()
        for path in t.wanted:
            for chunk in read_chunks(src, path, size=sizes[path]):
                t.write(path, chunk)
        t.finish()
        t3 = time.perf_counter()
        received = t.bytes_received
        wanted = len(t.wanted)
    print(
        f"{label:<12} entries={len(stats):>5} wanted={wanted:>5} "
        f"bytes_received={received:>10} ({100 * received / total:.4f}% of {total}) "
        f"scan={t1 - t0:.3f}s plan={t2 - t1:.3f}s transfer+finish={t3 - t2:.3f}s"
    )
    return received


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=3000)
    ap.add_argument("--mib", type=int, default=120)
    ap.add_argument("--dir", type=Path, default=None, help="scratch dir (default: system temp)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="filesync-bench-", dir=args.dir) as tmp:
        src = Path(tmp) / "context"
        src.mkdir()
        rng = random.Random(5)
        total = make_context(src, args.files, args.mib << 20, rng)
        store = ContextStore(Path(tmp) / "contexts")
        sync_round(store, src, "first", total)
        sync_round(store, src, "unchanged", total)
        victim = sorted(p for p in src.rglob("*.bin"))[args.files // 2]
        data = bytearray(victim.read_bytes())
        data[0] ^= 0xFF
        victim.write_bytes(bytes(data))
        st = victim.stat()
        os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
        received = sync_round(store, src, "one changed", total)
        print(f"changed file: {victim.relative_to(src)} ({len(data)} bytes)")
        ok = received == len(data) and received < total / 100
        print("OK: only the changed file was sent" if ok else "FAIL: more than the changed file")
        return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
