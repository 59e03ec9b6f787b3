"""Network settings as a user gives them: --network, RUN --network, --add-host,
--allow, the daemon's TOML keys, and the resolv.conf / hosts a step gets.

Expectations come from BuildKit's behaviour (executor/oci/resolvconf.go and
hosts.go, buildx's flag parsing), not from our own output."""

from __future__ import annotations

from pathlib import Path

import pytest

from ociworker.api.daemon import load_config
from ociworker.cli import main
from ociworker.controller import check_entitlements
from ociworker.core.build import parse_add_host
from ociworker.core.entitlements import require_entitlement
from ociworker.errors import ConfigError, UserError
from ociworker.executor.spec import hosts_content, resolv_conf_content
from ociworker.frontend.dockerfile.convert import Options
from test_df_convert import _exec, _resolve

HOST_RESOLV = "search corp.example\nnameserver 127.0.0.53\nnameserver 192.0.2.53\noptions ndots:2\n"


def test_default_network_drops_localhost_nameservers_keeps_the_rest() -> None:
    assert resolv_conf_content(HOST_RESOLV, "default") == (
        "search corp.example\nnameserver 192.0.2.53\noptions ndots:2\n"
    )


def test_only_localhost_nameservers_fall_back_to_public_ones() -> None:
    host = "nameserver 127.0.0.1\nnameserver ::1\n"
    assert resolv_conf_content(host, "none") == "nameserver 8.8.8.8\nnameserver 8.8.4.4\n"


def test_host_network_keeps_the_hosts_file_and_configured_dns_replaces_servers() -> None:
    assert resolv_conf_content(HOST_RESOLV, "host") == HOST_RESOLV
    assert resolv_conf_content(HOST_RESOLV, "default", ("198.51.100.1",)) == (
        "search corp.example\noptions ndots:2\nnameserver 198.51.100.1\n"
    )


def test_hosts_file_lists_add_host_entries_after_localhost() -> None:
    assert hosts_content("buildkitsandbox", (("db", "10.0.0.5"), ("v6", "2001:db8::1"))) == (
        "127.0.0.1\tlocalhost buildkitsandbox\n"
        "::1\tlocalhost ip6-localhost ip6-loopback\n"
        "10.0.0.5\tdb\n"
        "2001:db8::1\tv6\n"
    )


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("db:10.0.0.5", ("db", "10.0.0.5")),
        ("db=10.0.0.5", ("db", "10.0.0.5")),
        ("v6=[2001:db8::1]", ("v6", "2001:db8::1")),
        ("v6:2001:db8::1", ("v6", "2001:db8::1")),
    ],
)
def test_add_host_forms_buildx_accepts(value: str, expected: tuple[str, str]) -> None:
    assert parse_add_host(value) == expected


@pytest.mark.parametrize("value", ["db", "db:", ":10.0.0.5", "db:not-an-ip", "a b:10.0.0.1"])
def test_add_host_refuses_what_is_no_name_and_ip(value: str) -> None:
    with pytest.raises(ConfigError, match="--add-host"):
        parse_add_host(value)


def test_entitlement_needs_both_keys() -> None:
    require_entitlement("network.host", ("network.host",), ("network.host",), "[2/2] RUN x")
    with pytest.raises(UserError, match=r"step \[2/2\] RUN x: entitlement network.host is not"):
        require_entitlement("network.host", ("network.host",), (), "[2/2] RUN x")
    with pytest.raises(UserError, match="the worker does not grant it"):
        require_entitlement("network.host", (), ("network.host",), "[2/2] RUN x")


def test_only_host_steps_need_the_entitlement() -> None:
    text = "FROM busybox\nRUN --network=none a\nRUN b\nRUN --network=host c\nRUN d\n"
    plan = _resolve(text)
    check_entitlements(plan.target, ("network.host",), ("network.host",))
    with pytest.raises(UserError, match=r"\[4/5\] RUN --network=host c: entitlement"):
        check_entitlements(plan.target, ("network.host",), ())
    # a build on --network=none has no step that needs it
    check_entitlements(_resolve("FROM busybox\nRUN a\n", network="none").target, (), ())


def test_run_network_default_is_the_builds_network() -> None:
    assert _exec(_resolve("FROM busybox\nRUN a\n")).network == "default"
    assert _exec(_resolve("FROM busybox\nRUN --network=default a\n", network="none")).network == (
        "none"
    )
    op = _exec(_resolve("FROM busybox\nRUN a\n", extra_hosts=(("db", "10.0.0.5"),)))
    assert op.extra_hosts == (("db", "10.0.0.5"),)
    # the hosts are in the step's cache key, as BuildKit's ExtraHosts
    assert op.to_json()["exec"]["extra_hosts"] == [["db", "10.0.0.5"]]
    assert Options().network == "default"


def test_cli_refuses_bad_add_host_and_unknown_entitlement(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "Dockerfile").write_text("FROM busybox\n")
    root = str(tmp_path / "root")
    assert main(["build", "--root", root, "--add-host", "db", str(tmp_path)]) != 0
    assert "invalid --add-host 'db'" in capsys.readouterr().err
    assert main(["build", "--root", root, "--allow", "network.hots", str(tmp_path)]) != 0
    assert "unknown entitlement network.hots" in capsys.readouterr().err
    assert not (tmp_path / "root").exists()


def test_daemon_config_network_keys(tmp_path: Path) -> None:
    cfg = tmp_path / "d.toml"
    cfg.write_text(
        'network_subnet = "198.18.7.0/24"\ndns = ["198.18.7.1"]\nentitlements = ["network.host"]\n'
    )
    got = load_config(cfg, {})
    assert (got.network_subnet, got.dns, got.entitlements) == (
        "198.18.7.0/24",
        ("198.18.7.1",),
        ("network.host",),
    )
    cfg.write_text('entitlements = ["network.hots"]\n')
    with pytest.raises(ConfigError, match="unknown entitlement"):
        load_config(cfg, {})
