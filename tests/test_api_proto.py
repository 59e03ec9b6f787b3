"""The committed generated modules match control.proto and graph.proto (scripts/gen-proto)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GEN = ROOT / "src" / "ociworker" / "api" / "v1"
FILES = tuple(
    f"{proto}{suffix}"
    for proto in ("control", "graph")
    for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")
)


def test_generated_code_is_current(tmp_path: Path) -> None:
    env = dict(os.environ, PYTHON=sys.executable)
    subprocess.run(
        [str(ROOT / "scripts" / "gen-proto"), str(tmp_path)],
        check=True,
        env=env,
        capture_output=True,
    )
    fresh = tmp_path / "ociworker" / "api" / "v1"
    stale = [f for f in FILES if (fresh / f).read_bytes() != (GEN / f).read_bytes()]
    assert stale == [], f"run scripts/gen-proto: {stale} differ from their .proto"


def test_importing_ociworker_does_not_load_grpc() -> None:
    code = (
        "import sys, ociworker, ociworker.cli; "
        "assert 'grpc' not in sys.modules, 'grpc loaded'; "
        "c = ociworker.Client; assert 'grpc' in sys.modules; print(c.__name__)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env=dict(os.environ, PYTHONPATH=str(ROOT / "src")),
    )
    assert out.stdout.strip() == "Client"
