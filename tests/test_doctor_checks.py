"""``ociworker doctor``'s checks on fake hosts: file contents and probe outcomes given as values.

Each expectation is worked out from the fake input by hand (the ranges, the versions, the
controllers), not taken from the code's output.
"""

from __future__ import annotations

import dataclasses
import json
import re

import pytest

from ociworker.cli import main
from ociworker.core import doctor
from ociworker.core.doctor import (
    FAIL,
    OK,
    WARN,
    Check,
    Facts,
    Probe,
    Report,
    Runtime,
    Tool,
    diagnose,
    parse_version,
)
from ociworker.core.idmap import parse_subid

_RUNC = Runtime("runc", "/usr/sbin/runc", "runc version 1.1.5+ds1\ncommit: x\nspec: 1.0.2-dev\n")
_CRUN = Runtime("crun", "/usr/bin/crun", "crun version 1.8.1\ncommit: f8a0\nrundir: /run/crun\n")
_SETUID = Tool("/usr/bin/newuidmap", 0o104755, 0)
_MAP = "         0       1001          1\n         1     200000      65535\n"


def _healthy(**changes: object) -> Facts:
    """A rootless user on a pure cgroup v2 host where everything works."""
    facts = Facts(
        uid=1001,
        user="carol",
        subuid="alice:100000:65536\ncarol:200000:65536\n",
        subgid="alice:100000:65536\ncarol:200000:65536\n",
        newuidmap=_SETUID,
        newgidmap=dataclasses.replace(_SETUID, path="/usr/bin/newgidmap"),
        sysctls={"user.max_user_namespaces": "63000"},
        userns=Probe(True),
        idmap=Probe(True, _MAP + "--\n" + _MAP),
        overlay=Probe(True, "options userxattr"),
        fuse_overlayfs="/usr/bin/fuse-overlayfs",
        dev_fuse=Probe(True),
        cgroup_fs="cgroup2",
        delegated="cpuset cpu io memory pids\n",
        delegated_writable=True,
        runtimes=(_RUNC, _CRUN),
        pasta="/usr/bin/pasta",
        slirp4netns=None,
    )
    return dataclasses.replace(facts, **changes)  # type: ignore[arg-type]


def _check(report: Report, name: str) -> Check:
    found = [c for c in report.checks if c.name == name]
    assert len(found) == 1, [c.name for c in report.checks]
    return found[0]


def test_a_healthy_rootless_host_passes_every_check() -> None:
    report = diagnose(_healthy())
    assert [c.status for c in report.checks] == [OK] * len(report.checks)
    assert {c.name for c in report.checks} == {
        "subuid",
        "subgid",
        "newuidmap",
        "newgidmap",
        "userns",
        "idmap",
        "overlay",
        "fuse-overlayfs",
        "snapshotter",
        "cgroups",
        "runc",
        "crun",
        "crun-cgroups",
        "network",
    }
    assert report.exit_code == 0
    assert "65536 subordinate uids (200000-265535)" in _check(report, "subuid").detail
    assert _check(report, "runc").detail == "/usr/sbin/runc version 1.1.5 (>= 1.0.0-rc91)"
    assert "1.8.1" in _check(report, "crun").detail
    assert _check(report, "snapshotter").detail == "auto picks overlayfs"


def test_root_gets_no_rootless_checks() -> None:
    report = diagnose(_healthy(uid=0, user="root", cgroup_fs="tmpfs", unified_controllers=""))
    names = [c.name for c in report.checks]
    assert names == [
        "overlay", "snapshotter", "cgroups", "runc", "crun", "crun-cgroups", "network"
    ]  # fmt: skip
    assert _check(report, "network").detail == (
        "--network default via a bridge and nftables (/usr/sbin/nft)"
    )
    assert report.ready
    assert report.render().splitlines()[-1] == "builds can run (as root; 0 warnings)"


def test_missing_subuid_names_the_user_and_a_free_range() -> None:
    text = "alice:100000:65536\nbob:165536:65536\n"
    report = diagnose(_healthy(subuid=text))
    check = _check(report, "subuid")
    assert check.status == FAIL
    assert "carol (uid 1001)" in check.detail and "/etc/subuid" in check.detail
    # alice ends at 165535, bob at 231071; carol's subgid 200000-265535 must not be shared
    # either, so the first free id is 265536.
    (fix,) = check.fixes
    assert fix == "sudo usermod --add-subuids 265536-331071 carol"
    first, last = map(int, re.search(r"(\d+)-(\d+)", fix).groups())  # type: ignore[union-attr]
    assert last - first + 1 == 65536
    # The idmap probe needs the ranges: with one missing it is not reported separately.
    assert "idmap" not in [c.name for c in report.checks]
    assert report.exit_code == 1
    assert report.render().splitlines()[-1].startswith("builds cannot run (rootless, as carol")


def test_subid_by_uid_and_a_second_range() -> None:
    report = diagnose(_healthy(subgid="1001:300000:65536\ncarol:400000:25536\n"))
    check = _check(report, "subgid")
    assert check.status == OK
    assert check.detail == "carol has 65536 subordinate gids (300000-365535); 1 more range unused"


def test_too_few_subids_fail() -> None:
    check = _check(diagnose(_healthy(subuid="carol:200000:1000\n")), "subuid")
    assert check.status == FAIL
    assert "(200000-200999) holds 1000 ids" in check.detail
    # carol's subgid range ends at 265535: the new range starts after it
    assert check.fixes == (
        "sudo usermod --del-subuids 200000-200999 --add-subuids 265536-331071 carol",
    )


def test_a_small_first_range_fails_even_with_enough_ids_in_all() -> None:
    # newuidmap is given the first range only (as the worker and unshare --map-auto do)
    text = "carol:300000:40000\ncarol:400000:65536\n"
    check = _check(diagnose(_healthy(subuid=text)), "subuid")
    assert check.status == FAIL and "holds 40000 ids" in check.detail
    assert check.fixes[0].startswith("sudo usermod --del-subuids 300000-339999 --add-subuids ")


def test_no_subid_file() -> None:
    check = _check(diagnose(_healthy(subgid=None)), "subgid")
    assert check.status == FAIL and "/etc/subgid does not exist" in check.detail
    assert check.fixes == ("sudo usermod --add-subgids 265536-331071 carol",)


def test_subid_parser_skips_what_is_no_entry() -> None:
    entries = parse_subid("# comment\n\njunk\ncarol:x:10\ncarol:5:0\ndave:7:3\n")
    assert [(e.owner, e.start, e.count) for e in entries] == [("dave", 7, 3)]


@pytest.mark.parametrize(
    ("tool", "status", "fix"),
    [
        (None, FAIL, "sudo apt-get install uidmap"),
        (
            Tool("/usr/bin/newuidmap", 0o100755, 0),
            FAIL,
            "sudo setcap cap_setuid+ep /usr/bin/newuidmap",
        ),
        (
            Tool("/usr/bin/newuidmap", 0o104755, 1000),
            FAIL,
            "sudo setcap cap_setuid+ep /usr/bin/newuidmap",
        ),
        (Tool("/usr/bin/newuidmap", 0o100755, 0, has_caps=True), OK, None),
    ],
)
def test_newuidmap(tool: Tool | None, status: str, fix: str | None) -> None:
    check = _check(diagnose(_healthy(newuidmap=tool)), "newuidmap")
    assert check.status == status
    assert check.fixes == ((fix,) if fix else ())


@pytest.mark.parametrize(
    ("sysctls", "probe", "fix"),
    [
        ({"kernel.unprivileged_userns_clone": "0"}, Probe(False, "Operation not permitted"),
         "sudo sysctl -w kernel.unprivileged_userns_clone=1"),
        ({"user.max_user_namespaces": "0"}, Probe(False, "No space left on device"),
         "sudo sysctl -w user.max_user_namespaces=28633"),
        ({"kernel.apparmor_restrict_unprivileged_userns": "1"}, Probe(False, "write failed"),
         "sudo sysctl -w kernel.apparmor_restrict_unprivileged_userns=0"),
    ],
)  # fmt: skip
def test_user_namespaces_refused(sysctls: dict[str, str], probe: Probe, fix: str) -> None:
    report = diagnose(_healthy(sysctls=sysctls, userns=probe))
    check = _check(report, "userns")
    assert check.status == FAIL
    name, value = fix.split()[-1].split("=")
    assert f"{name} = {sysctls[name]}" in check.detail
    assert check.fixes[0] == fix
    # and persistently:
    assert (
        check.fixes[1] == f"echo {name}={value} | sudo tee /etc/sysctl.d/50-ociworker-rootless.conf"
    )
    assert report.exit_code == 1


def test_apparmor_restriction_that_lets_us_through_is_ok() -> None:
    sysctls = {"kernel.apparmor_restrict_unprivileged_userns": "1"}
    assert _check(diagnose(_healthy(sysctls=sysctls)), "userns").status == OK


def test_idmap_that_maps_too_few_ids_fails() -> None:
    short = "         0       1001          1\n         1     200000       999\n"
    check = _check(diagnose(_healthy(idmap=Probe(True, short + "--\n" + _MAP))), "idmap")
    assert check.status == FAIL
    assert "maps only 1000 uids and 65536 gids" in check.detail


def test_no_kernel_overlay_means_fuse_overlayfs_which_the_worker_takes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    facts = _healthy(overlay=Probe(False, "mount: permission denied"))
    report = diagnose(facts)
    assert _check(report, "overlay").status == WARN
    assert "permission denied" in _check(report, "overlay").detail
    assert _check(report, "snapshotter").detail == "auto picks fuse-overlayfs"
    assert report.exit_code == 0
    # a worker without the fallback: doctor reports fuse-overlayfs, promises native
    monkeypatch.setattr(doctor, "WORKER_USES_FUSE_OVERLAYFS", False)
    report = diagnose(facts)
    assert "does not use it yet" in _check(report, "fuse-overlayfs").detail
    assert _check(report, "snapshotter").status == WARN
    assert "auto picks native" in _check(report, "snapshotter").detail


def test_no_overlay_and_no_usable_fuse_means_native() -> None:
    report = diagnose(
        _healthy(overlay=Probe(False, "x"), dev_fuse=Probe(False, "/dev/fuse is crw------- root"))
    )
    fuse = _check(report, "fuse-overlayfs")
    assert (fuse.status, fuse.fixes) == (WARN, ("sudo chmod 0666 /dev/fuse",))
    assert "crw------- root" in fuse.detail
    snap = _check(report, "snapshotter")
    assert snap.status == WARN and "native" in snap.detail
    assert report.exit_code == 0


def test_unusable_fuse_is_no_warning_when_kernel_overlay_works() -> None:
    check = _check(diagnose(_healthy(fuse_overlayfs=None)), "fuse-overlayfs")
    assert check.status == OK and "not needed" in check.detail and "not installed" in check.detail


@pytest.mark.parametrize(
    ("changes", "status", "says"),
    [
        ({"delegated": "cpuset io pids\n"}, WARN, "without cpu, memory"),
        ({"delegated": None}, WARN, "no cgroup is delegated to carol"),
        ({"delegated_writable": False}, WARN, "no cgroup is delegated to carol"),
        ({"cgroup_fs": "tmpfs", "unified_controllers": ""}, WARN, "cgroup hybrid"),
        ({"cgroup_fs": "tmpfs"}, WARN, "cgroup v1"),
        # delegated: a build started in a login session's (root's) scope cannot use it
        ({}, OK, "in a cgroup of its own: systemd-run --user --scope -p Delegate=yes"),
    ],
)
def test_cgroup_delegation(changes: dict[str, object], status: str, says: str) -> None:
    report = diagnose(_healthy(**changes))
    check = _check(report, "cgroups")
    assert check.status == status and says in check.detail
    assert report.exit_code == 0  # no limits is a warning, not a failure (issue 12, item 4)


def test_delegation_fix_is_systemds_drop_in() -> None:
    (fix,) = _check(diagnose(_healthy(delegated="pids\n")), "cgroups").fixes
    assert "/etc/systemd/system/user@.service.d/delegate.conf" in fix
    assert "Delegate=cpu cpuset io memory pids" in fix


@pytest.mark.parametrize(
    ("output", "version"),
    [
        ("runc version 1.1.5+ds1\ncommit: 1.1.5", (1, 1, 5, 1 << 30)),
        ("runc version 1.0.0-rc92\nspec: 1.0.2", (1, 0, 0, 92)),
        ("runc version 1.0.0-rc.10", (1, 0, 0, 10)),
        ("crun version 1.8.1\ncommit: f8a0", (1, 8, 1, 1 << 30)),
        ("crun version 0.17", (0, 17, 0, 1 << 30)),
        ("no idea", None),
    ],
)
def test_runtime_versions(output: str, version: tuple[int, int, int, int] | None) -> None:
    assert parse_version(output) == version


def test_old_runc_warns_while_crun_works() -> None:
    old = Runtime("runc", "/usr/sbin/runc", "runc version 1.0.0-rc10\n")
    report = diagnose(_healthy(runtimes=(old, _CRUN)))
    runc = _check(report, "runc")
    assert runc.status == WARN and "1.0.0-rc10" in runc.detail and ">= 1.0.0-rc91" in runc.detail
    assert report.exit_code == 0


def test_no_runtime_fails() -> None:
    report = diagnose(_healthy(runtimes=(Runtime("runc", None), Runtime("crun", None))))
    assert [(c.status, c.fixes) for c in report.checks if c.name in ("runc", "crun")] == [
        (FAIL, ("sudo apt-get install runc",)),
        (FAIL, ("sudo apt-get install crun",)),
    ]
    assert "crun-cgroups" not in [c.name for c in report.checks]
    assert report.exit_code == 1


def test_crun_on_a_hybrid_host_with_a_v2_controller() -> None:
    facts = _healthy(uid=0, user="root", cgroup_fs="tmpfs", unified_controllers="hugetlb\n")
    report = diagnose(facts)
    check = _check(report, "crun-cgroups")
    # runc still builds, so crun's problem is a warning
    assert check.status == WARN and "hugetlb" in check.detail
    assert check.fixes == (
        "sudo mkdir -p /sys/fs/cgroup/hugetlb && "
        "sudo mount -t cgroup -o hugetlb cgroup /sys/fs/cgroup/hugetlb",
    )
    assert report.exit_code == 0
    # ... and a failure when crun is the only runtime.
    only_crun = diagnose(dataclasses.replace(facts, runtimes=(Runtime("runc", None), _CRUN)))
    assert _check(only_crun, "crun-cgroups").status == FAIL
    assert only_crun.exit_code == 1


def test_two_controllers_on_v2_each_get_a_mount() -> None:
    facts = _healthy(cgroup_fs="tmpfs", unified_controllers="cpu hugetlb\n")
    (fix,) = _check(diagnose(facts), "crun-cgroups").fixes
    assert fix.count("mount -t cgroup") == 2
    assert "-o cpu cgroup /sys/fs/cgroup/cpu " in fix and fix.endswith("/sys/fs/cgroup/hugetlb")


def test_rootless_without_pasta_or_slirp4netns_fails() -> None:
    report = diagnose(_healthy(pasta=None, slirp4netns=None))
    check = _check(report, "network")
    assert (check.status, check.fixes) == (FAIL, ("sudo apt-get install passt",))
    assert report.exit_code == 1
    assert (
        _check(diagnose(_healthy(pasta=None, slirp4netns="/usr/bin/slirp4netns")), "network").status
        == OK
    )


@pytest.mark.parametrize(
    ("detail", "fix"),
    [
        ("/dev/net/tun is crw------- root", "sudo chmod 0666 /dev/net/tun"),
        ("/dev/net/tun: No such file or directory", "sudo modprobe tun"),
    ],
)
def test_rootless_network_needs_dev_net_tun(detail: str, fix: str) -> None:
    report = diagnose(_healthy(dev_tun=Probe(False, detail)))
    check = _check(report, "network")
    assert check.status == FAIL and detail in check.detail and "pasta" in check.detail
    assert check.fixes == (fix,)
    assert report.exit_code == 1


@pytest.mark.parametrize("uid", [0, 1001])
def test_default_network_needs_nft(uid: int) -> None:
    report = diagnose(_healthy(uid=uid, nft=None))
    check = _check(report, "network")
    assert (check.status, check.fixes) == (FAIL, ("sudo apt-get install nftables",))
    assert report.exit_code == 1


def test_text_report_lines() -> None:
    report = diagnose(_healthy(subuid="", pasta=None))
    lines = report.render().splitlines()
    checks = [ln for ln in lines if re.match(r"^(ok|warn|FAIL) ", ln)]
    assert len(checks) == len(report.checks)
    for line, check in zip(checks, report.checks, strict=True):
        status, name, detail = re.split(r"\s{2,}", line, maxsplit=2)
        assert (status, name, detail) == (check.status, check.name, check.detail)
    at = lines.index(next(ln for ln in lines if ln.startswith("FAIL  subuid")))
    assert lines[at + 1].strip() == "fix: sudo usermod --add-subuids 265536-331071 carol"


def test_json_report() -> None:
    report = diagnose(_healthy(pasta=None))
    data = json.loads(report.to_json())
    assert (data["mode"], data["user"], data["uid"], data["ready"]) == (
        "rootless",
        "carol",
        1001,
        False,
    )
    network = next(c for c in data["checks"] if c["name"] == "network")
    assert network["status"] == "FAIL" and network["fix"] == ["sudo apt-get install passt"]


def test_cli_prints_the_report_and_exits_by_it(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import ociworker.cli.doctor as doctor

    monkeypatch.setattr(doctor, "gather", lambda: _healthy(slirp4netns=None, pasta=None))
    assert main(["doctor", "--format", "json"]) == 1
    assert json.loads(capsys.readouterr().out)["ready"] is False
    monkeypatch.setattr(doctor, "gather", lambda: _healthy())
    assert main(["doctor"]) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith("builds can run (rootless, as carol")
