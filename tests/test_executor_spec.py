"""config.json generation: Docker's defaults, user/env/cwd, mounts, namespaces."""

from __future__ import annotations

import json
from typing import Any

import pytest

from ociworker.core.mounts import Mount
from ociworker.executor.spec import (
    DEFAULT_CAPABILITIES,
    DEFAULT_PATH,
    SpecOptions,
    hosts_content,
    make_spec,
)


def _spec(**kw: Any) -> dict[str, Any]:
    return make_spec(SpecOptions(args=("sh", "-c", "true"), **kw))


def _mount(spec: dict[str, Any], dest: str) -> dict[str, Any]:
    found: list[dict[str, Any]] = [m for m in spec["mounts"] if m["destination"] == dest]
    assert len(found) == 1, found
    return found[0]


def test_process_defaults() -> None:
    p = _spec()["process"]
    assert p["args"] == ["sh", "-c", "true"]
    assert p["terminal"] is False
    assert p["cwd"] == "/"
    assert p["user"] == {"uid": 0, "gid": 0, "additionalGids": []}
    assert p["env"] == [DEFAULT_PATH, "HOME=/"]
    assert p["noNewPrivileges"] is True  # the sandbox: setuid binaries gain nothing
    assert p["rlimits"] == [{"type": "RLIMIT_NOFILE", "hard": 1048576, "soft": 1048576}]


def test_docker_capability_set_without_inheritable_or_ambient() -> None:
    caps = _spec()["process"]["capabilities"]
    assert set(caps) == {"bounding", "effective", "permitted"}
    expected = {
        "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FSETID", "CAP_FOWNER", "CAP_MKNOD",
        "CAP_NET_RAW", "CAP_SETGID", "CAP_SETUID", "CAP_SETFCAP", "CAP_SETPCAP",
        "CAP_NET_BIND_SERVICE", "CAP_SYS_CHROOT", "CAP_KILL", "CAP_AUDIT_WRITE",
    }  # fmt: skip
    for kind in ("bounding", "effective", "permitted"):
        assert set(caps[kind]) == expected
    assert set(DEFAULT_CAPABILITIES) == expected


def test_caller_env_wins_over_defaults() -> None:
    env = _spec(env=("PATH=/x", "HOME=/h", "A=b=c"), home="/root")["process"]["env"]
    assert env == ["PATH=/x", "HOME=/h", "A=b=c"]


def test_home_from_resolved_user() -> None:
    p = _spec(uid=5, gid=6, additional_gids=(7, 8), home="/home/u", cwd="/src")["process"]
    assert p["user"] == {"uid": 5, "gid": 6, "additionalGids": [7, 8]}
    assert "HOME=/home/u" in p["env"]
    assert p["cwd"] == "/src"


def test_root_hostname_and_no_cgroups_path() -> None:
    spec = _spec(hostname="box")
    assert spec["root"] == {"path": "rootfs", "readonly": False}
    assert spec["hostname"] == "box"
    assert "cgroupsPath" not in spec["linux"]


def test_system_mounts() -> None:
    spec = _spec()
    dests = [m["destination"] for m in spec["mounts"]]
    assert dests == [
        "/proc", "/dev", "/dev/pts", "/dev/shm", "/dev/mqueue", "/sys", "/sys/fs/cgroup",
    ]  # fmt: skip
    dev = _mount(spec, "/dev")
    assert (dev["type"], dev["options"]) == (
        "tmpfs",
        ["nosuid", "strictatime", "mode=755", "size=65536k"],
    )
    sys_ = _mount(spec, "/sys")
    assert sys_["type"] == "sysfs"
    assert {"ro", "nosuid", "noexec", "nodev"} <= set(sys_["options"])
    cg = _mount(spec, "/sys/fs/cgroup")
    assert cg["type"] == "cgroup"
    assert "ro" in cg["options"]


def test_resolv_conf_and_hosts_are_read_only_binds() -> None:
    spec = _spec(resolv_conf="/b/resolv.conf", hosts="/b/hosts")
    for dest, src in (("/etc/resolv.conf", "/b/resolv.conf"), ("/etc/hosts", "/b/hosts")):
        m = _mount(spec, dest)
        assert m["type"] == "bind"
        assert m["source"] == src
        assert "ro" in m["options"]
        assert "rbind" in m["options"]


def test_user_mounts() -> None:
    spec = _spec(
        mounts=(
            Mount(type="bind", source="/host/ctx", options=("ro",), target="/ctx"),
            Mount(type="rbind", source="/host/tree", target="/tree"),
            Mount(type="none", source="/host/x", options=("bind", "rw"), target="/x"),
            Mount(type="tmpfs", source="tmpfs", options=("size=1m",), target="/tmp"),
        )
    )
    assert _mount(spec, "/ctx") == {
        "destination": "/ctx",
        "type": "bind",
        "source": "/host/ctx",
        "options": ["bind", "ro"],
    }
    assert _mount(spec, "/tree")["options"] == ["rbind"]
    assert _mount(spec, "/x")["options"] == ["bind", "rw"]
    assert _mount(spec, "/tmp") == {
        "destination": "/tmp",
        "type": "tmpfs",
        "source": "tmpfs",
        "options": ["size=1m"],
    }
    # User mounts come after the system ones so they can shadow e.g. /tmp.
    assert spec["mounts"][-1]["destination"] == "/tmp"


def test_user_mount_needs_absolute_target() -> None:
    with pytest.raises(ValueError, match="absolute"):
        _spec(mounts=(Mount(type="bind", source="/a", target="rel"),))


def test_namespaces_isolated_network() -> None:
    ns = _spec()["linux"]["namespaces"]
    assert ns == [
        {"type": "pid"},
        {"type": "ipc"},
        {"type": "uts"},
        {"type": "mount"},
        {"type": "network"},
    ]
    ns = _spec(netns_path="/state/netns/x")["linux"]["namespaces"]
    assert ns[-1] == {"type": "network", "path": "/state/netns/x"}


def test_host_network_has_no_network_namespace() -> None:
    ns = _spec(isolated_network=False, netns_path="/ignored")["linux"]["namespaces"]
    assert [n["type"] for n in ns] == ["pid", "ipc", "uts", "mount"]


def test_masked_and_readonly_paths() -> None:
    linux = _spec()["linux"]
    assert {"/proc/kcore", "/proc/keys", "/sys/firmware", "/proc/scsi"} <= set(linux["maskedPaths"])
    assert linux["readonlyPaths"] == [
        "/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger",
    ]  # fmt: skip


def test_spec_is_json_and_independent_between_calls() -> None:
    a = _spec()
    a["mounts"][0]["options"].append("mutated")
    a["process"]["capabilities"]["effective"].clear()
    b = _spec()
    assert "mutated" not in b["mounts"][0]["options"]
    assert b["process"]["capabilities"]["bounding"] == b["process"]["capabilities"]["effective"]
    assert json.loads(json.dumps(b)) == b


def test_hosts_content() -> None:
    assert hosts_content("buildkitsandbox").splitlines()[0] == (
        "127.0.0.1\tlocalhost buildkitsandbox"
    )
    assert hosts_content("").splitlines()[0] == "127.0.0.1\tlocalhost"
    assert "::1\tlocalhost ip6-localhost ip6-loopback" in hosts_content("x")
