"""``ociworker doctor`` in a container: the facts a privileged CI container shows (Docker's
/.dockerenv, an overlayfs root, the bounding capability set, seccomp, cgroup mounts) and the
one thing a container commonly gets wrong for a builder, a state dir on the container's own
overlayfs root (overlay on overlay). Fakes only: the mount tables and /proc/self/status texts
below are as the kernel writes them (Docker's default and --privileged capability sets)."""

from __future__ import annotations

import dataclasses

import pytest

from ociworker.core.doctor import (
    FAIL,
    OK,
    WARN,
    Check,
    Facts,
    Probe,
    Report,
    Runtime,
    diagnose,
    mount_of,
    parse_mountinfo,
)

_RUNC = Runtime("runc", "/usr/sbin/runc", "runc version 1.1.5+ds1\n")
_CRUN = Runtime("crun", "/usr/bin/crun", "crun version 1.8.1\n")

# A docker run --privileged -v ociworker-state:/var/lib/ociworker container, cgroup v2.
_ROOT_OVERLAY = (
    "412 340 0:120 / / rw,relatime master:200 - overlay overlay "
    "rw,lowerdir=/var/lib/docker/overlay2/l/A:/var/lib/docker/overlay2/l/B,"
    "upperdir=/var/lib/docker/overlay2/x/diff,workdir=/var/lib/docker/overlay2/x/work\n"
    "413 412 0:123 / /proc rw,nosuid,nodev,noexec,relatime - proc proc rw\n"
    "414 412 0:124 / /dev rw,nosuid - tmpfs tmpfs rw,size=65536k,mode=755\n"
    "420 412 0:27 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime - cgroup2 cgroup rw\n"
)
_VOLUME = "430 412 254:0 /docker/volumes/ociworker-state/_data /var/lib/ociworker rw,relatime - ext4 /dev/vda rw\n"  # noqa: E501
_PRIVILEGED = "Name:\tpython3\nCapEff:\t000001ffffffffff\nCapBnd:\t000001ffffffffff\nSeccomp:\t0\n"
# Docker's default set (no CAP_SYS_ADMIN) under its default seccomp profile.
_DEFAULT = "Name:\tpython3\nCapEff:\t00000000a80425fb\nCapBnd:\t00000000a80425fb\nSeccomp:\t2\n"


def _in_docker(**changes: object) -> Facts:
    facts = Facts(
        uid=0,
        user="root",
        overlay=Probe(True, "options default"),
        dev_fuse=Probe(True),
        runtimes=(_RUNC, _CRUN),
        dockerenv=True,
        init_cgroup="0::/\n",
        mountinfo=_ROOT_OVERLAY + _VOLUME,
        proc_status=_PRIVILEGED,
        cgroup_writable=True,
        state_dir="/var/lib/ociworker",
        state_path="/var/lib/ociworker",
    )
    return dataclasses.replace(facts, **changes)  # type: ignore[arg-type]


def _check(report: Report, name: str) -> Check:
    found = [c for c in report.checks if c.name == name]
    assert len(found) == 1, [c.name for c in report.checks]
    return found[0]


def test_a_privileged_container_with_a_state_volume_is_ready() -> None:
    report = diagnose(_in_docker())
    names = [c.name for c in report.checks]
    # the container's own lines come first: they explain whatever fails below them
    assert names[:4] == ["container", "privileged", "cgroup-mounts", "dev-fuse"]
    assert "state-fs" in names and names.index("state-fs") < names.index("overlay")
    assert [c.status for c in report.checks] == [OK] * len(names)
    assert _check(report, "container").detail == "in a container (/.dockerenv, / is overlay)"
    assert _check(report, "state-fs").detail == "/var/lib/ociworker is on ext4 (/var/lib/ociworker)"
    assert _check(report, "cgroup-mounts").detail == (
        "1 cgroup2 mount under /sys/fs/cgroup, writable"
    )
    assert report.exit_code == 0


def test_overlay_on_overlay_fails_and_says_which_volume_to_mount() -> None:
    # no volume: the state dir is a dir of the container's overlayfs root
    report = diagnose(_in_docker(mountinfo=_ROOT_OVERLAY, state_path="/var/lib"))
    state = _check(report, "state-fs")
    assert state.status == FAIL
    assert state.detail.startswith("/var/lib/ociworker is on overlay (/): ")
    assert "overlay on overlay" in state.detail
    assert len(state.fixes) == 1
    assert "mount a volume or tmpfs at /var/lib/ociworker" in state.fixes[0]
    assert "docker run -v ociworker-state:/var/lib/ociworker" in state.fixes[0]
    assert not report.ready and report.exit_code == 1
    text = report.render().splitlines()
    i = text.index(next(ln for ln in text if ln.startswith("FAIL  state-fs")))
    assert text[i + 1].strip().startswith("fix: mount a volume or tmpfs at /var/lib/ociworker")
    assert text[-1] == "builds cannot run (as root): run the fix lines above"


def test_the_state_dir_named_is_the_configured_one() -> None:
    # a rootless user's state dir under a home on the overlay root
    facts = _in_docker(
        uid=1000,
        user="ci",
        mountinfo=_ROOT_OVERLAY,
        state_dir="/home/ci/.local/share/ociworker",
        state_path="/home/ci",
    )
    state = _check(diagnose(facts), "state-fs")
    assert state.status == FAIL
    assert "docker run -v ociworker-state:/home/ci/.local/share/ociworker" in state.fixes[0]


def test_docker_default_capabilities_and_seccomp_fail_as_unprivileged() -> None:
    report = diagnose(_in_docker(proc_status=_DEFAULT))
    priv = _check(report, "privileged")
    assert priv.status == FAIL
    assert "no CAP_SYS_ADMIN" in priv.detail
    assert priv.fixes and priv.fixes[0].startswith("docker run --privileged")
    assert not report.ready


def test_a_seccomp_filter_with_cap_sys_admin_is_a_warning() -> None:
    status = _PRIVILEGED.replace("Seccomp:\t0", "Seccomp:\t2")
    priv = _check(diagnose(_in_docker(proc_status=status)), "privileged")
    assert priv.status == WARN
    assert "Seccomp: 2" in priv.detail
    assert "seccomp=unconfined" in priv.fixes[0]


@pytest.mark.parametrize(("uid", "severity"), [(0, FAIL), (1000, WARN)], ids=["root", "rootless"])
def test_read_only_cgroups(uid: int, severity: str) -> None:
    ro = _ROOT_OVERLAY.replace(
        "/sys/fs/cgroup rw,nosuid,nodev,noexec,relatime - cgroup2 cgroup rw",
        "/sys/fs/cgroup ro,nosuid,nodev,noexec,relatime - cgroup2 cgroup rw",
    )
    facts = _in_docker(uid=uid, user="u", mountinfo=ro + _VOLUME, cgroup_writable=False)
    check = _check(diagnose(facts), "cgroup-mounts")
    assert check.status == severity
    assert "read-only (/sys/fs/cgroup)" in check.detail


def test_no_cgroup_mount_at_all() -> None:
    bare = "".join(ln + "\n" for ln in _ROOT_OVERLAY.splitlines() if "cgroup" not in ln)
    check = _check(diagnose(_in_docker(mountinfo=bare + _VOLUME)), "cgroup-mounts")
    assert check.status == FAIL
    assert "no cgroup filesystem under /sys/fs/cgroup" in check.detail


def test_missing_dev_fuse_matters_only_to_rootless_without_kernel_overlay() -> None:
    gone = Probe(False, "/dev/fuse: No such file or directory")
    root = _check(diagnose(_in_docker(dev_fuse=gone)), "dev-fuse")
    assert root.status == OK and "not needed" in root.detail
    rootless = _in_docker(uid=1000, user="ci", dev_fuse=gone, overlay=Probe(False, "EPERM"))
    check = _check(diagnose(rootless), "dev-fuse")
    assert check.status == WARN
    assert check.detail == "/dev/fuse: No such file or directory"
    assert check.fixes == ("docker run --device /dev/fuse ... (or --privileged)",)


@pytest.mark.parametrize(
    ("changes", "hint"),
    [
        ({"dockerenv": False, "containerenv": True}, "/run/.containerenv"),
        (
            {"dockerenv": False, "init_cgroup": "0::/kubepods/besteffort/pod1/abc\n"},
            "kubepods in /proc/1/cgroup",
        ),
        ({"dockerenv": False, "init_cgroup": "12:pids:/docker/4f2a\n"}, "docker in /proc/1/cgroup"),
    ],
)
def test_container_hints(changes: dict[str, object], hint: str) -> None:
    detail = _check(diagnose(_in_docker(**changes)), "container").detail
    assert hint in detail


def test_a_host_gets_no_container_lines_but_its_state_fs() -> None:
    host = "22 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw\n"
    report = diagnose(
        _in_docker(
            dockerenv=False, init_cgroup="0::/init.scope\n", mountinfo=host, proc_status=_DEFAULT
        )
    )
    names = [c.name for c in report.checks]
    assert not {"container", "privileged", "cgroup-mounts", "dev-fuse"} & set(names)
    assert _check(report, "state-fs").detail == "/var/lib/ociworker is on ext4 (/)"


def test_no_mount_table_leaves_the_state_check_out() -> None:
    report = diagnose(_in_docker(dockerenv=False, mountinfo=""))
    assert "state-fs" not in [c.name for c in report.checks]


def test_mountinfo_escapes_and_the_mount_that_shows() -> None:
    text = (
        "1 0 8:1 / / rw - ext4 /dev/sda1 rw\n"
        "2 1 0:5 / /mnt/my\\040dir rw - tmpfs tmpfs rw\n"
        "3 1 0:6 / /mnt/my\\040dir ro - overlay overlay rw\n"  # mounted later: it shows
        "4 1 0:7 / /mnt/my rw - xfs /dev/sdb rw\n"
    )
    mounts = parse_mountinfo(text)
    assert [m.point for m in mounts] == ["/", "/mnt/my dir", "/mnt/my dir", "/mnt/my"]
    m = mount_of("/mnt/my dir/state", mounts)
    assert m is not None and (m.fstype, m.read_only) == ("overlay", True)
    other = mount_of("/mnt/my", mounts)
    assert other is not None and other.fstype == "xfs"  # a prefix of the name is not a parent
    under = mount_of("/mnt/myother", mounts)
    assert under is not None and under.fstype == "ext4"


def test_cgroup_v1_binds_of_the_containers_own_cgroup_need_a_cgroup_namespace() -> None:
    # docker run --privileged on a cgroup v1 host without --cgroupns=private
    sub = "/ociworker-tic-1/83e458faacd6"
    v1 = "".join(
        f"{500 + i} 253 0:{29 + i} {sub} /sys/fs/cgroup/{c} rw,nosuid,nodev,noexec,relatime "
        f"- cgroup cgroup rw,{c}\n"
        for i, c in enumerate(("cpu", "memory", "pids"))
    )
    base = "".join(ln + "\n" for ln in _ROOT_OVERLAY.splitlines() if "cgroup" not in ln)
    check = _check(diagnose(_in_docker(mountinfo=base + v1 + _VOLUME)), "cgroup-mounts")
    assert check.status == WARN
    assert f"binds of this container's own cgroup ({sub} on /sys/fs/cgroup/cpu" in check.detail
    assert check.fixes == ("docker run --cgroupns=private ... (podman run --cgroupns=private)",)
    # with a cgroup namespace the same hierarchies are rooted at /: steps get cgroups
    ns = _check(
        diagnose(_in_docker(mountinfo=base + v1.replace(sub, "/") + _VOLUME)), "cgroup-mounts"
    )
    assert (ns.status, ns.detail) == (OK, "3 cgroup mounts under /sys/fs/cgroup, writable")


def test_rootless_pasta_needs_a_default_route_to_copy() -> None:
    # docker run --network=none: only lo, no default route
    facts = _in_docker(uid=1000, user="ci", pasta="/usr/bin/pasta", default_route=False)
    net = _check(diagnose(facts), "network")
    assert net.status == FAIL
    assert "pasta (/usr/bin/pasta) needs an interface with a default route" in net.detail
    assert "ip route add default via 192.0.2.1" in net.fixes[0]
    # slirp4netns alone makes its own tap and needs none; root's bridge needs none either
    slirp = dataclasses.replace(facts, pasta=None, slirp4netns="/usr/bin/slirp4netns")
    assert _check(diagnose(slirp), "network").status == OK
    assert _check(diagnose(_in_docker(default_route=False)), "network").status == OK
    # with a default route (or where it is unknown) pasta is fine
    for route in (True, None):
        ok = dataclasses.replace(facts, default_route=route)
        assert _check(diagnose(ok), "network").status == OK
