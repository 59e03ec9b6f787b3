"""``ociworker serve`` configuration: TOML keys as the flags, flags win, sizes,
and addresses that are refused before anything is touched."""

from __future__ import annotations

from pathlib import Path

import pytest

from ociworker.api.daemon import DaemonConfig, load_config
from ociworker.core.units import parse_size
from ociworker.errors import ConfigError


@pytest.mark.parametrize(
    ("text", "n"),
    [
        (2097152, 2097152),
        ("2MiB", 2 << 20),
        ("2MB", 2_000_000),
        ("512k", 512_000),
        ("1.5KiB", 1536),
        ("10", 10),
        ("7B", 7),
    ],
)
def test_parse_size(text: int | str, n: int) -> None:
    assert parse_size(text) == n


@pytest.mark.parametrize("text", ["", "2 parsecs", "-1", "MiB", -5])
def test_parse_size_rejects(text: int | str) -> None:
    with pytest.raises(ConfigError):
        parse_size(text)


def test_file_then_flags(tmp_path: Path) -> None:
    cfg_file = tmp_path / "ociworker.toml"
    cfg_file.write_text(
        'addr = "unix:///tmp/x.sock"\nroot = "/srv/ow"\ngroup = "builders"\n'
        'runtime = "crun"\nlog_cap = "4MiB"\ninsecure_registries = ["r:5000"]\n'
    )
    cfg = load_config(cfg_file, {"runtime": "runc", "group": None})
    assert cfg == DaemonConfig(
        addr="unix:///tmp/x.sock",
        root=Path("/srv/ow"),
        group="builders",
        runtime="runc",
        log_cap=4 << 20,
        insecure_registries=("r:5000",),
    )


def test_unknown_key_is_refused(tmp_path: Path) -> None:
    cfg_file = tmp_path / "c.toml"
    cfg_file.write_text('adress = "unix:///x"\n')
    with pytest.raises(ConfigError, match="adress"):
        load_config(cfg_file, {})


def test_tcp_needs_mutual_tls() -> None:
    with pytest.raises(ConfigError, match="mutual TLS"):
        load_config(None, {"addr": "tcp://0.0.0.0:1234"})
    cfg = load_config(
        None, {"addr": "tcp://0.0.0.0:1234", "tlscacert": "ca", "tlscert": "c", "tlskey": "k"}
    )
    assert cfg.addr == "tcp://0.0.0.0:1234"


@pytest.mark.parametrize("addr", ["unix://rel.sock", "http://x", "/run/x.sock"])
def test_bad_addresses(addr: str) -> None:
    with pytest.raises(ConfigError):
        load_config(None, {"addr": addr})


def test_bad_toml(tmp_path: Path) -> None:
    cfg_file = tmp_path / "c.toml"
    cfg_file.write_text("addr = \n")
    with pytest.raises(ConfigError, match=r"c\.toml"):
        load_config(cfg_file, {})


def test_history_limits(tmp_path: Path) -> None:
    cfg_file = tmp_path / "c.toml"
    cfg_file.write_text("history_max_entries = 5\nhistory_max_age = 3600\n")
    cfg = load_config(cfg_file, {})
    assert (cfg.history_max_entries, cfg.history_max_age) == (5, 3600)
    assert DaemonConfig().history_max_entries == 50  # BuildKit's default
    for bad in ("history_max_entries = -1", 'history_max_age = "2d"', "history_max_entries = 1.5"):
        cfg_file.write_text(bad + "\n")
        with pytest.raises(ConfigError, match="history_max_"):
            load_config(cfg_file, {})
