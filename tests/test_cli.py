"""CLI behaviour that needs no root and no runtime."""

from __future__ import annotations

from pathlib import Path

import pytest

from ociworker.cli import main


def test_prune_refuses_a_filter_it_cannot_honour(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "state"
    assert main(["prune", "--root", str(root), "--filter", "until=a day"]) == 1
    assert "--filter" in capsys.readouterr().err
    assert not root.exists()  # refused before the worker touched anything


def test_prune_filters_select_cache_mounts_by_type_and_id() -> None:
    from ociworker.core.build import PruneFilter, UsageRecord
    from ociworker.errors import ConfigError

    rec = UsageRecord("sha256:" + "ab" * 32, "exec.cachemount", 1, "/root/.cache", 0.0)
    other = UsageRecord("sha256:" + "cd" * 32, "regular", 1, "RUN x", 0.0)
    assert PruneFilter.parse(["type=exec.cachemount"]).matches(rec, now=0.0)
    assert not PruneFilter.parse(["type=exec.cachemount"]).matches(other, now=0.0)
    assert PruneFilter.parse(["id=/root/.cache"]).matches(rec, now=0.0)  # the cache id, as du shows
    assert PruneFilter.parse(["id=" + "ab" * 12]).matches(rec, now=0.0)  # the record id du prints
    assert not PruneFilter.parse(["id=" + "ab" * 3]).matches(rec, now=0.0)  # too short to be one
    for bad in ("type=image", "until=soon", "id", "private=true", "description~=("):
        with pytest.raises(ConfigError):
            PruneFilter.parse([bad])


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--push"], "tag is needed when pushing to registry"),
        (["-t", "r.example/a:1", "--push", "-o", "type=oci,dest=x.tar"], 'push and "oci" output'),
        (["--annotation", "index:k=v"], "only manifest annotations are supported"),
        (["--label", "=v"], "invalid --label"),
        (["--registry-ca", "r.example"], "want HOST[:PORT]=FILE"),
        (["--registry-ca", "r.example=/no/such/ca.pem"], "/no/such/ca.pem is not a file"),
        (
            ["--addr", "unix:///no/such.sock", "--registry-ca", "r.example=/etc/passwd"],
            "--registry-ca configures the embedded worker",
        ),
    ],
)
def test_push_and_image_flags_are_checked_before_anything_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flags: list[str], message: str
) -> None:
    root = tmp_path / "state"
    (tmp_path / "Dockerfile").write_text("FROM scratch\n")
    assert main(["build", "--root", str(root), *flags, str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not root.exists()  # refused before the worker touched anything
