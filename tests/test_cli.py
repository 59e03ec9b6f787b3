"""CLI behaviour that needs no root and no runtime."""

from __future__ import annotations

from pathlib import Path

import pytest

from ociworker.cli import main


def test_prune_refuses_a_filter_it_cannot_honour(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "state"
    assert main(["prune", "--root", str(root), "--filter", "until=24h"]) == 1
    assert "--filter" in capsys.readouterr().err
    assert not root.exists()  # refused before the worker touched anything
