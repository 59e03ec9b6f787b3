"""core.activation: which inherited fds an fd:// address takes (sd_listen_fds(3) rules)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ociworker.core.activation import ListenFd, check_fd_addr, listen_fds, select_fds
from ociworker.errors import ConfigError

ENV = {"LISTEN_PID": "42", "LISTEN_FDS": "3", "LISTEN_FDNAMES": "api:api:admin"}


def test_fds_start_at_3_and_carry_their_names() -> None:
    assert listen_fds(ENV, 42) == (ListenFd(3, "api"), ListenFd(4, "api"), ListenFd(5, "admin"))


def test_fds_meant_for_another_process_are_not_taken() -> None:
    # a child that inherited the environment (LISTEN_PID is its parent's)
    assert listen_fds(ENV, 43) == ()
    assert listen_fds({}, 42) == ()


def test_names_that_do_not_match_the_count_are_unknown() -> None:
    env = {"LISTEN_PID": "7", "LISTEN_FDS": "2"}
    assert [f.name for f in listen_fds(env, 7)] == ["unknown", "unknown"]
    env["LISTEN_FDNAMES"] = "one"
    assert [f.name for f in listen_fds(env, 7)] == ["unknown", "unknown"]


def test_garbage_count_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="LISTEN_FDS='x'"):
        listen_fds({"LISTEN_PID": "7", "LISTEN_FDS": "x"}, 7)


@pytest.mark.parametrize(
    ("addr", "fds"),
    [("fd://", [3, 4, 5]), ("fd://*", [3, 4, 5]), ("fd://4", [4]), ("fd://api", [3, 4]),
     ("fd://admin", [5])],
)  # fmt: skip
def test_select(addr: str, fds: list[int]) -> None:
    assert [f.fd for f in select_fds(addr, listen_fds(ENV, 42))] == fds


@pytest.mark.parametrize(
    ("addr", "message"),
    [
        ("fd://9", "fd 9 was not passed by socket activation (passed: 3, 4, 5)"),
        ("fd://web", "no socket named 'web' was passed by socket activation (names: admin, api)"),
    ],
)
def test_select_what_was_not_passed(addr: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        select_fds(addr, listen_fds(ENV, 42))


def test_select_without_activation() -> None:
    with pytest.raises(ConfigError, match="no sockets passed by socket activation"):
        select_fds("fd://", ())


@pytest.mark.parametrize("addr", ["fd://2", "fd://0", "fd://a:b", "fd:///run/x.sock"])
def test_bad_fd_addresses(addr: str) -> None:
    with pytest.raises(ConfigError):
        check_fd_addr(addr)


def test_daemon_config_takes_fd_addresses_and_refuses_a_group(tmp_path: Path) -> None:
    from ociworker.api.daemon import load_config

    conf = tmp_path / "d.toml"
    conf.write_text('addr = "fd://ociworker"\n')
    assert load_config(conf, {}).addr == "fd://ociworker"
    with pytest.raises(ConfigError, match="set SocketGroup= and SocketMode="):
        load_config(conf, {"group": "docker"})
    with pytest.raises(ConfigError, match="fd://, fd://N or fd://NAME"):
        load_config(conf, {"addr": "fd:///run/x.sock"})
