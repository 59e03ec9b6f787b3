"""Rootless set-up that needs no namespace: subordinate id ranges and the
paths a user's worker uses (issue 12). What a user reads is checked against
the words shadow's tools and the XDG base directory spec use."""

from __future__ import annotations

import pwd
from pathlib import Path

import pytest

from ociworker import rootless
from ociworker.core.idmap import IdMap, IdRange, parse_subid, require_subid
from ociworker.errors import ConfigError
from ociworker.fs import userns

SUBUID = """\
# comment
alice:100000:65536
1001:300000:65536
bob:165536:65536
bob:400000:65536
"""


def test_parse_subid_by_name_or_uid_first_range() -> None:
    assert parse_subid(SUBUID, "alice", 1000) == IdRange(100000, 65536)
    assert parse_subid(SUBUID, "carol", 1001) == IdRange(300000, 65536)
    # newuidmap takes the first matching line too
    assert parse_subid(SUBUID, "bob", 1002) == IdRange(165536, 65536)
    assert parse_subid(SUBUID, "dave", 1003) is None
    assert parse_subid("eve:x:1\neve:5:0\n", "eve", 1) is None


def test_missing_range_names_the_fix() -> None:
    with pytest.raises(ConfigError) as e:
        require_subid(SUBUID, "/etc/subuid", "dave", 1003, "uid")
    assert str(e.value) == (
        "rootless: user dave has no subordinate uid range in /etc/subuid, which the "
        "build's user namespace needs; fix (as root): usermod --add-subuids 100000-165535 dave"
    )
    with pytest.raises(ConfigError, match="usermod --add-subgids 100000-165535 dave"):
        require_subid(None, "/etc/subgid", "dave", 1003, "gid")


def test_short_range_is_refused_with_a_range_that_fits() -> None:
    with pytest.raises(ConfigError) as e:
        require_subid("frank:500000:1000\n", "/etc/subuid", "frank", 1, "uid")
    assert "only 1000 subordinate uids" in str(e.value)
    assert "usermod --add-subuids 500000-565535 frank" in str(e.value)


def test_id_map_layout() -> None:
    m = IdMap(1001, IdRange(200000, 65536))
    # the arguments newuidmap takes: inside outside count, twice
    assert m.newidmap_args() == ["0", "1001", "1", "1", "200000", "65536"]
    assert m.to_host(0) == 1001
    assert m.to_host(1000) == 200999
    assert m.to_host(65536) == 265535
    assert m.to_host(65537) is None


def test_id_maps_read_the_files(tmp_path: Path) -> None:
    me = pwd.struct_passwd(("alice", "x", 1000, 1000, "", "/home/alice", "/bin/sh"))
    (tmp_path / "subuid").write_text(SUBUID)
    (tmp_path / "subgid").write_text("alice:700000:65536\n")
    uid, gid = rootless.id_maps(me, str(tmp_path / "subuid"), str(tmp_path / "subgid"))
    assert uid == IdMap(1000, IdRange(100000, 65536))
    assert gid == IdMap(1000, IdRange(700000, 65536))
    with pytest.raises(ConfigError, match=f"no subordinate gid range in {tmp_path}/none"):
        rootless.id_maps(me, str(tmp_path / "subuid"), str(tmp_path / "none"))


@pytest.fixture
def as_user(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """This process as a rootless worker (the marker the namespace's worker has)."""
    monkeypatch.setenv(userns.MARKER, "1")
    for var in ("OCIWORKER_ROOT", "XDG_DATA_HOME", "XDG_CONFIG_HOME", "XDG_RUNTIME_DIR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    return tmp_path


def test_user_paths_follow_xdg(as_user: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert userns.default_root() == as_user / ".local" / "share" / "ociworker"
    monkeypatch.setenv("XDG_DATA_HOME", "/data")
    assert userns.default_root() == Path("/data/ociworker")
    monkeypatch.setenv("XDG_DATA_HOME", "relative")  # the spec: ignored
    assert userns.default_root() == as_user / ".local" / "share" / "ociworker"
    monkeypatch.setenv("OCIWORKER_ROOT", "/explicit")
    assert userns.default_root() == Path("/explicit")
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/run/user/1001")
    assert userns.default_socket() == Path("/run/user/1001/ociworker/ociworker.sock")


def test_user_daemon_config_in_xdg_config_home(as_user: Path) -> None:
    assert userns.default_config() is None  # none written: none read
    conf = as_user / ".config" / "ociworker" / "ociworkerd.toml"
    conf.parent.mkdir(parents=True)
    conf.write_text('runtime = "crun"\n')
    assert userns.default_config() == conf
    from ociworker.api.daemon import load_config

    cfg = load_config(None, {})
    assert cfg.runtime == "crun"
    assert cfg.root == as_user / ".local" / "share" / "ociworker"
    assert cfg.addr == f"unix://{userns.runtime_dir()}/ociworker/ociworker.sock"


def test_root_paths_unchanged(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(userns.MARKER, raising=False)
    monkeypatch.delenv("OCIWORKER_ROOT", raising=False)
    monkeypatch.setattr("os.geteuid", lambda: 0)
    assert userns.default_root() == Path("/var/lib/ociworker")
    assert userns.default_socket() == Path("/run/ociworker/ociworker.sock")
    assert userns.default_config() is None


def test_user_daemon_refuses_tcp(as_user: Path) -> None:
    from ociworker.api.daemon import load_config

    with pytest.raises(ConfigError) as e:
        load_config(None, {"addr": "tcp://127.0.0.1:9999"})
    assert str(e.value).startswith(
        "refusing to listen on tcp://127.0.0.1:9999: a rootless daemon listens in its own "
        "network namespace"
    )
