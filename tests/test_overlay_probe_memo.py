"""The overlay probe's pass is remembered in the root until the next boot: an
embedded build (a new process each time) does not mount and unmount a probe on
every start. A failure is never remembered."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest

import ociworker.snapshot as snap


@dataclass
class Probe:
    ok: bool = True
    calls: list[Path] = field(default_factory=list)

    def __call__(self, root: Path, userxattr: bool, mount_type: str = "overlay") -> bool:
        self.calls.append(root)
        return self.ok


@pytest.fixture
def probe(monkeypatch: pytest.MonkeyPatch) -> Probe:
    p = Probe()
    monkeypatch.setattr(snap, "_probe", p)
    monkeypatch.setattr(snap, "_probed", {})
    monkeypatch.setattr(snap, "_boot_id", lambda: "boot-1")
    return p


def _new_process(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(snap, "_probed", {})


def test_a_pass_is_probed_once_per_boot(
    tmp_path: Path, probe: Probe, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert snap.overlay_supported(tmp_path)
    _new_process(monkeypatch)
    assert snap.overlay_supported(tmp_path)
    assert probe.calls == [tmp_path]  # the second process trusted the first one's pass
    monkeypatch.setattr(snap, "_boot_id", lambda: "boot-2")  # a reboot: maybe a new kernel
    _new_process(monkeypatch)
    assert snap.overlay_supported(tmp_path)
    assert probe.calls == [tmp_path, tmp_path]


def test_a_failure_is_probed_again(
    tmp_path: Path, probe: Probe, monkeypatch: pytest.MonkeyPatch
) -> None:
    probe.ok = False
    assert not snap.overlay_supported(tmp_path)
    _new_process(monkeypatch)
    assert not snap.overlay_supported(tmp_path)
    assert probe.calls == [tmp_path, tmp_path]
    assert list(tmp_path.iterdir()) == []  # nothing left in the root


def test_a_user_namespace_probes_for_itself(
    tmp_path: Path, probe: Probe, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a rootless worker needs userxattr: root's pass says nothing about it
    monkeypatch.setattr(snap, "in_user_namespace", lambda: False)
    assert snap.overlay_supported(tmp_path)
    monkeypatch.setattr(snap, "in_user_namespace", lambda: True)
    _new_process(monkeypatch)
    assert snap.overlay_supported(tmp_path)
    assert len(probe.calls) == 2
