"""Which OCI runtime runs RUN steps when none is named: crun where it is installed
(it starts a container several times faster than runc), else runc."""

from __future__ import annotations

from pathlib import Path

import pytest

from ociworker.api.daemon import DaemonConfig
from ociworker.cli import make_parser
from ociworker.executor.binary import default_runtime
from ociworker.worker import WorkerConfig


def _path_with(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, *names: str) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in names:
        exe = bin_dir / name
        exe.write_text("#!/bin/sh\nexit 0\n")
        exe.chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_dir))


@pytest.mark.parametrize(
    ("installed", "expected"),
    [(("runc", "crun"), "crun"), (("crun",), "crun"), (("runc",), "runc"), ((), "runc")],
)
def test_default_is_crun_when_installed(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, installed: tuple[str, ...], expected: str
) -> None:
    _path_with(monkeypatch, tmp_path, *installed)
    assert default_runtime() == expected
    assert WorkerConfig().runtime == expected
    assert DaemonConfig().runtime == expected


def test_a_named_runtime_is_kept(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _path_with(monkeypatch, tmp_path, "runc", "crun")
    args = make_parser().parse_args(["build", "--runtime", "runc", "."])
    assert args.runtime == "runc"
    # not named: left to the worker, which picks by what is installed
    assert make_parser().parse_args(["build", "."]).runtime is None
