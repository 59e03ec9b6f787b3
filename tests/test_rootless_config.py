"""Rootless set-up that needs no namespace: subordinate id ranges and the
paths a user's worker uses (issue 12). What a user reads is checked against
the words shadow's tools and the XDG base directory spec use."""

from __future__ import annotations

import pwd
from pathlib import Path

import pytest

from ociworker import rootless
from ociworker.core.doctor import Facts, diagnose
from ociworker.core.idmap import IdMap, IdRange, first_range, require_subid
from ociworker.errors import ConfigError
from ociworker.fs import userns

SUBUID = """\
# comment
alice:100000:65536
1001:300000:65536
bob:165536:65536
bob:400000:65536
"""


def test_first_range_by_name_or_uid() -> None:
    assert first_range(SUBUID, "alice", 1000) == IdRange(100000, 65536)
    assert first_range(SUBUID, "carol", 1001) == IdRange(300000, 65536)
    # newuidmap takes the first matching line too
    assert first_range(SUBUID, "bob", 1002) == IdRange(165536, 65536)
    assert first_range(SUBUID, "dave", 1003) is None
    assert first_range("eve:x:1\neve:5:0\n", "eve", 1) is None


SUBGID = "alice:100000:65536\nzed:600000:65536\n"


def test_missing_range_names_a_fix_free_in_both_files() -> None:
    with pytest.raises(ConfigError) as e:
        require_subid("uid", "dave", 1003, SUBUID, SUBGID, "/etc/subuid")
    # The highest range of either file (zed's gids) ends at 665535: nobody holds 665536 on,
    # where the fixed 100000-165535 would have been alice's.
    assert str(e.value) == (
        "rootless: user dave has no subordinate uid range in /etc/subuid, which the "
        "build's user namespace needs; fix (as root): usermod --add-subuids 665536-731071 dave"
    )
    with pytest.raises(ConfigError, match=r"usermod --add-subgids 665536-731071 dave$"):
        require_subid("gid", "dave", 1003, SUBUID, SUBGID, "/etc/subgid")
    with pytest.raises(ConfigError, match=r"usermod --add-subgids 100000-165535 dave$"):
        require_subid("gid", "dave", 1003, None, None, "/etc/subgid")


def test_short_range_is_replaced_by_a_free_one() -> None:
    subuid = "frank:500000:1000\nalice:100000:65536\n"
    with pytest.raises(ConfigError) as e:
        require_subid("uid", "frank", 1, subuid, None, "/etc/subuid")
    assert "holds 1000 ids (images need 65536)" in str(e.value)
    # extending frank's 500000 range in place would be a guess about its neighbours; the
    # fix drops it and adds one past every range (501000 on)
    assert str(e.value).endswith(
        "usermod --del-subuids 500000-500999 --add-subuids 501000-566535 frank"
    )


def test_worker_and_doctor_give_the_same_fix() -> None:
    facts = Facts(uid=1003, user="dave", subuid=SUBUID, subgid=SUBGID)
    (check,) = [c for c in diagnose(facts).checks if c.name == "subuid"]
    with pytest.raises(ConfigError) as e:
        require_subid("uid", "dave", 1003, SUBUID, SUBGID, "/etc/subuid")
    assert check.fixes == ("sudo " + str(e.value).split("fix (as root): ")[1],)


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
