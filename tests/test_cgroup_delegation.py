"""A rootless worker's cgroups (issue 12 item 4): limits where systemd delegates a cgroup
v2 subtree to the user, a warning where not. The trees below are shaped as systemd
leaves them (cgroup.controllers, cgroup.procs, cgroup.subtree_control, the delegated
ones chowned to the user), in tmp dirs: what the worker then writes is read back from
the files, and the expectations come from the trees, not from the planner."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ociworker.core.cgroupdelegation import (
    DELEGATE_FIX,
    SCOPE_FIX,
    Delegated,
    NotDelegated,
    parse_proc_cgroup,
    plan,
    warning,
)
from ociworker.executor import runtime
from ociworker.executor.base import StepLimits
from ociworker.executor.cgroups import Hierarchy, StepCgroup, delegated_hierarchies
from ociworker.executor.runtime import _spec_limits, _step_hierarchies
from ociworker.fs.userns import CGROUP_BASE
from ociworker.rootless.cgroups import apply, fs_type, gather

UID, PID = 1000, 4242
SERVICE = f"/user.slice/user-{UID}.slice/user@{UID}.service"
SCOPE = f"{SERVICE}/app.slice/run-r1.scope"  # systemd-run --user --scope -p Delegate=yes
SESSION = f"/user.slice/user-{UID}.slice/session-3.scope"  # a login session: root's

#: /proc/self/cgroup of a hybrid host (v1 controllers, a controller-less v2)
HYBRID_PROC = (
    "12:pids:/user.slice/user-1000.slice/session-3.scope\n"
    "1:name=systemd:/user.slice/user-1000.slice/session-3.scope\n"
    "0::/user.slice/user-1000.slice/session-3.scope\n"
)


def _cgroup(
    root: Path, path: str, controllers: str, procs: list[int], owner: int | None = None
) -> Path:
    d = root / path.lstrip("/")
    d.mkdir(parents=True, exist_ok=True)
    (d / "cgroup.controllers").write_text(controllers + "\n")
    (d / "cgroup.procs").write_text("".join(f"{p}\n" for p in procs))
    (d / "cgroup.subtree_control").write_text("")
    (d / "cgroup.threads").write_text("")
    if owner is not None:
        # systemd's delegation: the dir and the files that move processes and enable
        # controllers belong to the user
        for p in (d, d / "cgroup.procs", d / "cgroup.subtree_control", d / "cgroup.threads"):
            os.chown(p, owner, owner)
    return d


@pytest.fixture
def v2(tmp_path: Path) -> Path:
    """A pure v2 host's /sys/fs/cgroup: the user's systemd owns user@UID.service."""
    root = tmp_path / "cgroup"
    _cgroup(root, "/", "cpuset cpu io memory hugetlb pids rdma misc", [1])
    _cgroup(root, f"/user.slice/user-{UID}.slice", "cpuset cpu io memory pids", [])
    _cgroup(root, SESSION, "cpu io memory pids", [999, PID])
    _cgroup(root, SERVICE, "cpu io memory pids", [], owner=UID)
    _cgroup(root, f"{SERVICE}/app.slice", "cpu io memory pids", [], owner=UID)
    return root


def _proc(path: str) -> str:
    return f"0::{path}\n"


def test_a_scope_of_its_own_is_used_after_the_worker_moves_into_a_leaf(v2: Path) -> None:
    scope = _cgroup(v2, SCOPE, "cpu io memory pids", [PID], owner=UID)
    p = plan(gather(UID, PID, _proc(SCOPE), "cgroup2", v2), "alice")
    assert p == Delegated(SCOPE, f"{SCOPE}/ociworker", ("cpu", "memory", "pids"))
    assert warning(p) is None
    assert apply(p, PID, v2) == p
    # itself in the leaf first, then the controllers enabled for the step cgroups beside it
    assert (scope / "ociworker" / "cgroup.procs").read_text() == str(PID)
    assert (scope / "cgroup.subtree_control").read_text() == "+cpu +memory +pids"


def test_the_step_cgroups_go_below_the_delegated_one(
    v2: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _cgroup(v2, SCOPE, "cpu io memory pids", [], owner=UID)
    (base,) = delegated_hierarchies(SCOPE, (Hierarchy(v2, 2),), mount=v2)
    assert base.path == v2 / SCOPE.lstrip("/")
    step = StepCgroup("ociw-1234-step", (base,), SCOPE)
    step.create()
    assert (v2 / SCOPE.lstrip("/") / "ociw-1234-step").is_dir()
    # runc's and crun's cgroupsPath is from the hierarchy's root (no cgroup namespace)
    assert step.runtime_path == f"{SCOPE}/ociw-1234-step/ctr"
    step.remove()
    assert not (v2 / SCOPE.lstrip("/") / "ociw-1234-step").exists()


def test_the_worker_takes_the_base_from_its_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    v1_memory = Hierarchy(Path("/sys/fs/cgroup/memory"), 1, frozenset({"memory"}))
    pure_v2 = (Hierarchy(Path("/sys/fs/cgroup"), 2),)
    hybrid = (v1_memory, Hierarchy(Path("/sys/fs/cgroup/unified"), 2))
    monkeypatch.setenv(CGROUP_BASE, SCOPE)
    monkeypatch.setattr(runtime, "host_hierarchies", lambda: pure_v2)
    assert _step_hierarchies(rootless=True) == (
        SCOPE,
        (Hierarchy(Path("/sys/fs/cgroup" + SCOPE), 2),),
    )
    # root ignores it (the variable is the rootless worker's)
    assert _step_hierarchies(rootless=False) == ("", pure_v2)
    # the base is a path in the hierarchy on /sys/fs/cgroup: nowhere else
    monkeypatch.setattr(runtime, "host_hierarchies", lambda: hybrid)
    assert _step_hierarchies(rootless=True) == (SCOPE, ())
    monkeypatch.delenv(CGROUP_BASE)
    assert _step_hierarchies(rootless=True) == ("", hybrid)


def test_limits_of_controllers_not_handed_down_are_left_out(v2: Path) -> None:
    scope = _cgroup(v2, SCOPE, "cpu pids", [], owner=UID)
    # what the kernel shows in a new cgroup below one that enables cpu and pids
    _cgroup(scope, "/ociw-1-step", "cpu pids", [])
    step = StepCgroup("ociw-1-step", (Hierarchy(scope, 2),), SCOPE)
    step.create()
    assert (scope / "ociw-1-step" / "cgroup.subtree_control").read_text() == "+cpu +pids"
    limits = StepLimits(memory=64 << 20, pids=100, cpus=0.5)
    spec = _spec_limits(limits, step, own_pids=False, rootless=True)
    assert (spec.memory, spec.pids, spec.cpus) == (None, 100, 0.5)
    assert spec.cgroups_path == f"{SCOPE}/ociw-1-step/ctr"
    # root's limits are not filtered (its runtime reports a missing controller itself)
    assert _spec_limits(limits, step, own_pids=False).memory == 64 << 20


def test_a_shared_cgroup_is_not_reorganized(v2: Path) -> None:
    # a terminal's service: the shell lives there too
    term = f"{SERVICE}/app.slice/terminal.service"
    d = _cgroup(v2, term, "cpu io memory pids", [777, PID], owner=UID)
    p = plan(gather(UID, PID, _proc(term), "cgroup2", v2), "alice")
    assert isinstance(p, NotDelegated)
    assert "holds 1 other process," in p.reason and SCOPE_FIX in p.fix
    assert apply(p, PID, v2) == p
    assert not (d / "ociworker").exists()
    assert (d / "cgroup.subtree_control").read_text() == ""
    text = warning(p)
    assert text is not None and text.startswith(
        "rootless: RUN steps run without --step-memory/--step-pids/--step-cpus limits"
    )


def test_a_session_scope_owned_by_root_is_not_delegated(v2: Path) -> None:
    p = plan(gather(UID, PID, _proc(SESSION), "cgroup2", v2), "alice")
    assert p == NotDelegated(
        f"its cgroup {SESSION} is not delegated to alice",
        "start it in a delegated cgroup: " + SCOPE_FIX,
    )


def test_owned_but_not_writable_is_not_delegated(v2: Path) -> None:
    d = _cgroup(v2, SCOPE, "cpu io memory pids", [PID], owner=UID)
    (d / "cgroup.subtree_control").chmod(0o444)
    p = plan(gather(UID, PID, _proc(SCOPE), "cgroup2", v2), "alice")
    assert p == NotDelegated(
        f"its cgroup {SCOPE} is not delegated to alice",
        "start it in a delegated cgroup: " + SCOPE_FIX,
    )
    # and one owned by someone else (another user's scope) neither
    _cgroup(v2, f"{SERVICE}/app.slice/other.scope", "cpu memory pids", [PID], owner=UID + 1)
    p = plan(gather(UID, PID, _proc(f"{SERVICE}/app.slice/other.scope"), "cgroup2", v2), "a")
    assert isinstance(p, NotDelegated) and "not delegated" in p.reason


def test_delegated_without_memory_applies_the_other_limits(v2: Path) -> None:
    scope = _cgroup(v2, SCOPE, "cpu pids", [PID], owner=UID)
    p = plan(gather(UID, PID, _proc(SCOPE), "cgroup2", v2), "alice")
    assert p == Delegated(SCOPE, f"{SCOPE}/ociworker", ("cpu", "pids"), ("memory",))
    apply(p, PID, v2)
    assert (scope / "cgroup.subtree_control").read_text() == "+cpu +pids"
    text = warning(p)
    assert text is not None and "lacks the memory controller" in text
    assert DELEGATE_FIX in text


def test_delegated_without_any_wanted_controller_still_accounts(v2: Path) -> None:
    scope = _cgroup(v2, SCOPE, "io", [PID], owner=UID)
    p = plan(gather(UID, PID, _proc(SCOPE), "cgroup2", v2), "alice")
    # cpu.stat is in every v2 cgroup: the steps' CPU time is still accounted
    assert p == Delegated(SCOPE, f"{SCOPE}/ociworker", (), ("cpu", "memory", "pids"))
    apply(p, PID, v2)
    assert (scope / "ociworker" / "cgroup.procs").read_text() == str(PID)
    assert (scope / "cgroup.subtree_control").read_text() == ""
    text = warning(p)
    assert text is not None and "lacks the cpu, memory, pids controllers" in text


def test_hybrid_host_warns_and_touches_nothing(tmp_path: Path) -> None:
    # /sys/fs/cgroup is a tmpfs of v1 mounts; the v2 one (unified) has no controllers
    root = tmp_path / "cgroup"
    unified = _cgroup(root / "unified", SESSION, "", [PID], owner=UID)
    p = plan(gather(UID, PID, HYBRID_PROC, "tmpfs", root), "alice")
    assert isinstance(p, NotDelegated) and "cgroup v1 (or hybrid)" in p.reason
    assert p.fix == "boot with systemd.unified_cgroup_hierarchy=1"
    assert apply(p, PID, root) == p
    assert sorted(os.listdir(unified)) == [
        "cgroup.controllers", "cgroup.procs", "cgroup.subtree_control", "cgroup.threads"
    ]  # fmt: skip


def test_a_failing_move_becomes_the_warning(v2: Path) -> None:
    # the cgroup went away between reading and moving (its scope stopped)
    p = Delegated(SCOPE, f"{SCOPE}/ociworker", ("cpu",))
    done = apply(p, PID, v2)
    assert isinstance(done, NotDelegated)
    assert done.reason.startswith(f"cannot set up the delegated cgroup {SCOPE}: ")


def test_proc_cgroup_v2_line() -> None:
    assert parse_proc_cgroup(HYBRID_PROC) == SESSION
    assert parse_proc_cgroup(_proc(SCOPE)) == SCOPE
    assert parse_proc_cgroup("0::/\n") == "/"
    # pure v1: no 0:: line
    assert parse_proc_cgroup("4:memory:/user.slice\n1:name=systemd:/user.slice\n") is None


def test_fs_type_of_the_cgroup_mount() -> None:
    mountinfo = (
        "25 1 0:23 / /sys rw,nosuid - sysfs sysfs rw\n"
        "30 25 0:26 / /sys/fs/cgroup ro,nosuid shared:9 - tmpfs tmpfs ro,mode=755\n"
        "31 30 0:27 / /sys/fs/cgroup/unified rw shared:10 - cgroup2 cgroup2 rw,nsdelegate\n"
    )
    assert fs_type(Path("/sys/fs/cgroup"), mountinfo) == "tmpfs"
    v2 = "30 25 0:26 / /sys/fs/cgroup rw,nosuid shared:4 - cgroup2 cgroup2 rw,nsdelegate\n"
    assert fs_type(Path("/sys/fs/cgroup"), v2) == "cgroup2"
    assert fs_type(Path("/sys/fs/cgroup"), "") == ""
