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


def test_prune_filters_select_cache_mounts_by_type_and_id() -> None:
    from ociworker.core.build import PruneFilter, UsageRecord
    from ociworker.errors import ConfigError

    rec = UsageRecord("sha256:" + "ab" * 32, "exec.cachemount", 1, "/root/.cache", 0.0)
    other = UsageRecord("sha256:" + "cd" * 32, "regular", 1, "RUN x", 0.0)
    assert PruneFilter.parse(["type=exec.cachemount"]).matches(rec)
    assert not PruneFilter.parse(["type=exec.cachemount"]).matches(other)
    assert PruneFilter.parse(["id=/root/.cache"]).matches(rec)  # the cache id, as du shows
    assert PruneFilter.parse(["id=" + "ab" * 12]).matches(rec)  # the record id du prints
    assert not PruneFilter.parse(["id=" + "ab" * 3]).matches(rec)  # too short to be one
    for bad in ("type=regular", "until=1h", "id"):
        with pytest.raises(ConfigError):
            PruneFilter.parse([bad])
