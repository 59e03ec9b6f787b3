"""benchmarks/layer_throughput.py: the tree it makes, its floor command and its report."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import zlib
from pathlib import Path
from types import ModuleType

_PATH = Path(__file__).resolve().parent.parent / "benchmarks" / "layer_throughput.py"


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("ociworker_layer_throughput", _PATH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses looks the module up while the class is made
    spec.loader.exec_module(module)
    return module


lt = _load()


def test_make_tree_writes_what_it_says_half_compressible(tmp_path: Path) -> None:
    written = lt.make_tree(tmp_path, 128, 10)
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert written == sum(p.stat().st_size for p in files)
    assert len(files) == 2 + 10
    big = sorted((tmp_path / "big").iterdir())
    assert [p.stat().st_size for p in big] == [64 << 20, 64 << 20]
    head = [p.read_bytes()[: 1 << 20] for p in big]
    assert len(zlib.compress(head[0], 1)) > 0.99 * len(head[0])  # random
    assert len(zlib.compress(head[1], 1)) < 0.8 * len(head[1])  # text-like


def test_floor_command_makes_a_zstd_tar_of_the_tree(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    (tree / "d").mkdir(parents=True)
    (tree / "d" / "f").write_bytes(b"hello\n")
    out = tmp_path / "out.zst"
    subprocess.run(lt.floor_argv(tree, out, "zstd", 3), check=True)
    listing = subprocess.run(
        ["tar", "--zstd", "-tf", str(out)], check=True, capture_output=True, text=True
    ).stdout.split()
    assert "./d/f" in listing


def test_summary_and_table() -> None:
    runs = [
        lt.Run("floor", 2.0, 0),
        lt.Run("floor", 4.0, 0),
        lt.Run("floor", 3.0, 0),
        lt.Run("ociworker", 5.0, 100 * 1024),
        lt.Run("ociworker", 4.0, 150 * 1024),
        lt.Run("ociworker", 6.0, 120 * 1024),
    ]
    summary = lt.summarise(runs, 1200.0)
    assert summary["floor"] == {"median_s": 3.0, "mib_per_s": 400.0, "max_rss_mib": 0.0}
    assert summary["ociworker"] == {"median_s": 5.0, "mib_per_s": 240.0, "max_rss_mib": 150.0}
    table = lt.format_table(summary)
    assert "ociworker / floor throughput: 0.60" in table
