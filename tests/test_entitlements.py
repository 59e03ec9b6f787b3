"""Entitlements: both keys must turn (worker grants, build asks), as in BuildKit."""

from __future__ import annotations

from pathlib import Path

import pytest

from ociworker.api.daemon import load_config
from ociworker.cli import main
from ociworker.core.entitlements import parse_entitlements, require_entitlement
from ociworker.errors import ConfigError, EntitlementError

STEP = "[2/2] RUN --security=insecure mount -t tmpfs none /mnt"


def test_both_keys_needed() -> None:
    ents = ("security.insecure",)
    require_entitlement("security.insecure", ents, ents, STEP)  # granted and asked: runs
    with pytest.raises(EntitlementError) as not_asked:
        require_entitlement("security.insecure", ents, (), STEP)
    msg = str(not_asked.value)
    assert "entitlement security.insecure is not allowed" in msg
    assert STEP in msg and "--allow security.insecure" in msg
    with pytest.raises(EntitlementError) as not_granted:
        require_entitlement("network.host", (), ("network.host",), STEP)
    assert "entitlement network.host is not allowed" in str(not_granted.value)
    assert "entitlements" in str(not_granted.value)  # points at the worker's config


def test_unknown_names_refused() -> None:
    assert parse_entitlements(["network.host", "network.host"], "--allow") == ("network.host",)
    with pytest.raises(ConfigError, match="unknown entitlement device"):
        parse_entitlements(["device"], "--allow")


def test_cli_refuses_unknown_allow(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "Dockerfile").write_text("FROM scratch\n")
    code = main(["build", "--root", str(tmp_path / "root"), "--allow", "bogus", str(tmp_path)])
    assert code == 1
    assert "unknown entitlement bogus" in capsys.readouterr().err
    assert not (tmp_path / "root").exists()  # refused before anything was made


def test_daemon_grants_only_what_its_config_lists(tmp_path: Path) -> None:
    assert load_config(None, {}).entitlements == ()
    cfg = tmp_path / "d.toml"
    cfg.write_text('entitlements = ["security.insecure"]\n')
    assert load_config(cfg, {}).entitlements == ("security.insecure",)
    cfg.write_text('entitlements = ["root"]\n')
    with pytest.raises(ConfigError, match="unknown entitlement root"):
        load_config(cfg, {})
