"""executor.owners: a process's claim lives exactly as long as the process, and
recovery touches dead owners only. Real processes and real flocks: a child
claims, and is either left running or killed with SIGKILL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from ociworker.executor.owners import Owner, live_owners, recover_dead

_CLAIM = (
    "import sys, time\n"
    "from pathlib import Path\n"
    "from ociworker.executor.owners import Owner\n"
    "o = Owner.claim(Path(sys.argv[1]))\n"
    "print(o.ident, flush=True)\n"
    "time.sleep(3600)\n"
)


@pytest.fixture
def claimer(tmp_path: Path) -> Iterator[list[subprocess.Popen[str]]]:
    procs: list[subprocess.Popen[str]] = []
    yield procs
    for p in procs:
        p.kill()
        p.wait()
        assert p.stdout is not None
        p.stdout.close()


def _claim_in_child(owners: Path, procs: list[subprocess.Popen[str]]) -> tuple[str, int]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen(
        [sys.executable, "-c", _CLAIM, str(owners)], stdout=subprocess.PIPE, text=True, env=env
    )
    procs.append(proc)
    assert proc.stdout is not None
    return proc.stdout.readline().strip(), proc.pid


def test_a_killed_owner_is_recovered_once_and_a_live_one_never(
    tmp_path: Path, claimer: list[subprocess.Popen[str]]
) -> None:
    owners = tmp_path / "owners"
    live, _ = _claim_in_child(owners, claimer)
    dead, dead_pid = _claim_in_child(owners, claimer)
    assert (owners / f"{dead}.lock").read_text() == f"{dead_pid}\n"
    assert sorted(live_owners(owners)) == sorted([live, dead])

    os.kill(dead_pid, signal.SIGKILL)
    claimer[1].wait()
    assert live_owners(owners) == [live]
    cleaned: list[str] = []
    assert recover_dead(owners, cleaned.append) == [dead]
    assert cleaned == [dead]
    assert sorted(p.name for p in owners.iterdir()) == [f"{live}.lock"]
    # idempotent: nothing dead is left to recover
    assert recover_dead(owners, cleaned.append) == []
    assert cleaned == [dead]


def test_a_failed_cleanup_keeps_the_claim_for_the_next_start(tmp_path: Path) -> None:
    owners = tmp_path / "owners"
    owners.mkdir()
    (owners / "0badc0de.lock").write_text("12345\n")  # nobody holds it: dead

    def fail(ident: str) -> None:
        raise OSError("device busy")

    assert recover_dead(owners, fail) == []
    assert (owners / "0badc0de.lock").exists()
    assert recover_dead(owners, lambda ident: None) == ["0badc0de"]
    assert list(owners.iterdir()) == []


def test_own_claim_is_live_until_released(tmp_path: Path) -> None:
    owners = tmp_path / "owners"
    me = Owner.claim(owners)
    seen: list[str] = []
    assert recover_dead(owners, seen.append) == []
    assert live_owners(owners) == [me.ident]
    me.release()
    me.release()  # idempotent
    assert live_owners(owners) == []
    assert list(owners.iterdir()) == []
    assert seen == []


def test_a_claim_released_with_something_left_behind_is_recovered_next(tmp_path: Path) -> None:
    owners = tmp_path / "owners"
    me = Owner.claim(owners)
    me.release(left_behind=True)
    seen: list[str] = []
    assert live_owners(owners) == []
    assert recover_dead(owners, seen.append) == [me.ident]
    assert seen == [me.ident]
