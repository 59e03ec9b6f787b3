"""The executor's host-independent parts: runtime lookup, error mapping, mount stubs.

Running containers is covered by integration/test_executor_runtime.py (root, real
runc and crun); these need neither.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from ociworker.errors import ConfigError, HostError, RuntimeFailure, UserError
from ociworker.executor import runtime as rt
from ociworker.executor.runtime import OCIRuntimeExecutor


def _script(path: Path, version_line: str) -> Path:
    path.write_text(f"#!/bin/sh\necho '{version_line}'\n")
    path.chmod(0o755)
    return path


def test_missing_runtime_is_a_host_error(tmp_path: Path) -> None:
    with pytest.raises(HostError, match="not found"):
        OCIRuntimeExecutor(tmp_path, "/nonexistent/bin/runc")
    with pytest.raises(HostError, match="not found in PATH"):
        OCIRuntimeExecutor(tmp_path, "no-such-runtime-xyz")


def test_flavour_from_name_then_version(tmp_path: Path) -> None:
    named = _script(tmp_path / "crun", "something else")
    assert OCIRuntimeExecutor(tmp_path, str(named)).flavour == "crun"
    odd = _script(tmp_path / "oci-rt", "runc version 1.1.5")
    ex = OCIRuntimeExecutor(tmp_path / "state", str(odd))
    assert ex.flavour == "runc"
    assert ex.runtime_root == tmp_path / "state" / "runtime" / "runc"
    other = _script(tmp_path / "youki-ish", "youki version 0.3")
    with pytest.raises(ConfigError, match="neither runc nor crun"):
        OCIRuntimeExecutor(tmp_path, str(other))


def _log(path: Path, *entries: dict[str, str]) -> Path:
    path.write_text("".join(json.dumps(e) + "\n" for e in entries) + "not json\n")
    return path


def test_runtime_errors_reads_only_error_entries(tmp_path: Path) -> None:
    log = _log(
        tmp_path / "log",
        {"level": "warning", "msg": "ignored"},
        {"level": "error", "msg": "boom"},
    )
    assert rt._runtime_errors(log) == ["boom"]
    assert rt._runtime_errors(tmp_path / "absent") == []


def _executor(tmp_path: Path, name: str) -> OCIRuntimeExecutor:
    return OCIRuntimeExecutor(tmp_path, str(_script(tmp_path / name, "")))


def test_error_mapping(tmp_path: Path) -> None:
    ex = _executor(tmp_path, "crun")
    ex._raise_runtime_error([])  # a plain non-zero exit is the command's, not an error
    with pytest.raises(HostError) as info:
        ex._raise_runtime_error(["mount `/sys/fs/cgroup/hugetlb`: Device or resource busy"])
    assert "mount -t cgroup -o hugetlb cgroup /sys/fs/cgroup/hugetlb" in str(info.value)
    # runc: the crun-only host check for hugetlb does not apply, whatever this host is.
    runc = _executor(tmp_path, "runc")
    with pytest.raises(UserError, match="not found"):
        runc._raise_runtime_error(['exec: "nope": executable file not found in $PATH'])
    with pytest.raises(RuntimeFailure, match="runc run failed: pivot_root: EINVAL"):
        runc._raise_runtime_error(["pivot_root: EINVAL"])


def test_stubs_remove_only_what_the_run_created(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "passwd").write_text("x")
    os.utime(root / "etc", ns=(1_000_000_000, 2_000_000_000))
    stubs = rt._Stubs(root, ["/proc", "/sys/fs/cgroup", "/etc/passwd", "/etc/hosts", "/data"])
    # What a runtime does: create the mount points.
    (root / "proc").mkdir()
    (root / "sys" / "fs" / "cgroup").mkdir(parents=True)
    (root / "etc" / "hosts").touch()
    (root / "data").mkdir()
    (root / "data" / "written-by-the-step").write_text("keep me")
    stubs.remove()
    assert sorted(p.name for p in root.iterdir()) == ["data", "etc"]
    assert sorted(p.name for p in (root / "etc").iterdir()) == ["passwd"]
    assert (root / "etc").stat().st_mtime_ns == 2_000_000_000
    assert (root / "data" / "written-by-the-step").exists()


def test_stubs_keep_non_empty_files(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    stubs = rt._Stubs(root, ["/etc/resolv.conf"])
    (root / "etc").mkdir()
    (root / "etc" / "resolv.conf").write_text("nameserver 1.1.1.1\n")
    stubs.remove()
    assert (root / "etc" / "resolv.conf").read_text() == "nameserver 1.1.1.1\n"


def test_stubs_never_leave_the_root(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    root = tmp_path / "root"
    root.mkdir()
    # An absolute symlink in the rootfs points at the host path of `outside`.
    (root / "link").symlink_to(str(outside))
    stubs = rt._Stubs(root, ["/link/sub"])
    (outside / "sub").mkdir()
    stubs.remove()
    assert (outside / "sub").is_dir()


def test_stubs_whose_parent_became_a_symlink_are_left_alone(tmp_path: Path) -> None:
    # CVE-2024-23652 class: during the run the step moves the stubs' top dir away
    # and leaves a symlink to a host dir shaped like them; removing the stubs
    # afterwards must not reach through it.
    outside = tmp_path / "outside"
    (outside / "b" / "c").mkdir(parents=True)
    (outside / "f").write_bytes(b"")
    root = tmp_path / "root"
    root.mkdir()
    stubs = rt._Stubs(root, ["/a/b/c", "/a/f"])
    (root / "a" / "b" / "c").mkdir(parents=True)  # what the runtime makes
    (root / "a" / "f").write_bytes(b"")
    (root / "a").rename(root / "a2")  # what the step does
    (root / "a").symlink_to(str(outside))
    stubs.remove()
    assert (outside / "b" / "c").is_dir()
    assert (outside / "f").is_file()
    assert (root / "a").is_symlink()  # not ours any more: kept


def test_stubs_are_removed_through_the_rootfs_when_nothing_was_swapped(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    stubs = rt._Stubs(root, ["/a/b/c", "/a/f"])
    (root / "a" / "b" / "c").mkdir(parents=True)
    (root / "a" / "f").write_bytes(b"")
    stubs.remove()
    assert list(root.iterdir()) == []
