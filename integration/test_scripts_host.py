"""The prepared host, checked with real parts: the registry's base image, runc and crun."""

from __future__ import annotations

import gzip
import io
import json
import os
import pwd
import subprocess
import sys
import tarfile
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

_OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def _get(url: str, accept: str | None = None) -> bytes:
    req = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
    with urllib.request.urlopen(req, timeout=10) as resp:
        data: bytes = resp.read()
        return data


def _pull_layer(registry: str) -> tuple[dict[str, object], bytes]:
    manifest = json.loads(_get(f"http://{registry}/v2/busybox/manifests/latest", _OCI_MANIFEST))
    config = json.loads(_get(f"http://{registry}/v2/busybox/blobs/{manifest['config']['digest']}"))
    (layer,) = manifest["layers"]
    return config, gzip.decompress(_get(f"http://{registry}/v2/busybox/blobs/{layer['digest']}"))


def test_base_image_content(registry: str) -> None:
    config, layer = _pull_layer(registry)
    assert config["os"] == "linux"
    inner = config["config"]
    assert isinstance(inner, dict)
    assert inner["Cmd"] == ["sh"]
    assert any(e.startswith("PATH=") for e in inner["Env"])
    with tarfile.open(fileobj=io.BytesIO(layer)) as tar:
        members = {m.name: m for m in tar.getmembers()}
        passwd = tar.extractfile("etc/passwd")
        assert passwd is not None
        users = {line.split(":")[0]: line.split(":")[2] for line in passwd.read().decode().split()}
    assert members["bin/sh"].issym() and members["bin/sh"].linkname == "/bin/busybox"
    assert members["bin/busybox"].isfile()
    assert members["tmp"].mode == 0o1777
    assert members["home/user"].uid == 1000
    assert users == {"root": "0", "user": "1000", "nobody": "65534"}
    assert {m.mtime for m in members.values()} == {members["bin/busybox"].mtime}


def test_base_image_runs_under_runtime(
    require_root: None, registry: str, runtime: str, state_dir: Path
) -> None:
    _, layer = _pull_layer(registry)
    bundle = state_dir / "bundle"
    (bundle / "rootfs").mkdir(parents=True)
    with tarfile.open(fileobj=io.BytesIO(layer)) as tar:
        # Our own image: keep the sticky /tmp and absolute applet symlinks as they are.
        if hasattr(tarfile, "fully_trusted_filter"):
            tar.extractall(bundle / "rootfs", filter="fully_trusted")
        else:  # pragma: no cover - Python < 3.11.4 has no extraction filters
            tar.extractall(bundle / "rootfs")
    subprocess.run([runtime, "spec"], cwd=bundle, check=True)
    spec = json.loads((bundle / "config.json").read_text())
    spec["process"]["terminal"] = False
    spec["process"]["user"] = {"uid": 1000, "gid": 1000}
    spec["process"]["args"] = ["sh", "-c", "id -un; touch /home/user/ok && echo wrote"]
    spec["process"]["env"] = ["PATH=/usr/sbin:/usr/bin:/sbin:/bin"]
    spec["root"]["readonly"] = False
    (bundle / "config.json").write_text(json.dumps(spec))
    proc = subprocess.run(
        [runtime, "--root", str(state_dir / "runtime"), "run", "--bundle", str(bundle), "t1"],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["user", "wrote"]


def test_state_dir_sees_mounts(
    require_root: None, tmp_path: Path, mounts_under: Callable[[Path], list[Path]]
) -> None:
    # The leak check in state_dir is only worth having if it can see a real mount.
    target = tmp_path / "a dir"
    target.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(target)], check=True)
    try:
        assert mounts_under(tmp_path) == [target]
    finally:
        subprocess.run(["umount", str(target)], check=True)
    assert mounts_under(tmp_path) == []


REPO = Path(__file__).resolve().parent.parent


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL, check=False
    )


def test_start_registry_is_idempotent(require_root: None, registry: str) -> None:
    proc = _run([str(REPO / "scripts" / "start-registry")])
    assert proc.returncode == 0, proc.stderr
    assert "already answering" in proc.stderr


def test_base_image_is_reproducible(base_image: str, tmp_path: Path) -> None:
    # A fresh build from the host's busybox must land on the digest the registry holds; that is
    # what lets scripts/make-base-image skip the push on re-runs.
    layout = tmp_path / "oci"
    argv = [sys.executable, str(REPO / "scripts" / "make_base_image.py")]
    proc = _run([*argv, "--layout", str(layout), "--ref", base_image])
    assert proc.returncode == 0, proc.stderr
    assert "registry already has this digest" in proc.stderr
    assert (layout / "index.json").is_file()


def _subid_lines(user: str, kind: str) -> list[str]:
    return [
        ln for ln in Path(f"/etc/sub{kind}").read_text().splitlines() if ln.split(":")[0] == user
    ]


def test_setup_host_made_the_rootless_test_user(require_root: None) -> None:
    pw = pwd.getpwnam("ociw-test")
    assert pw.pw_dir == "/home/ociw-test"
    assert Path(pw.pw_dir).stat().st_uid == pw.pw_uid
    for kind in ("uid", "gid"):
        # the range the rootless tests expect comes first (the one newuidmap is given)
        assert _subid_lines("ociw-test", kind)[0] == "ociw-test:200000:65536"
    for pkg, tool in (("passt", "pasta"), ("slirp4netns", "slirp4netns")):
        status = _run(["dpkg-query", "-W", "-f=${Status}", pkg]).stdout
        assert status == "install ok installed", (pkg, status)
        assert _run([tool, "--version"]).returncode == 0, tool


def _ensure_test_user(user: str, subid: str) -> subprocess.CompletedProcess[str]:
    script = f'set -euo pipefail; source "{REPO}/scripts/lib.sh"; ensure_test_user'
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "OCIWORKER_TEST_USER": user,
           "OCIWORKER_TEST_SUBID": subid}  # fmt: skip
    return subprocess.run(
        ["bash", "-c", script], capture_output=True, text=True, env=env, timeout=60, check=False
    )


def test_test_user_set_up_is_idempotent(require_root: None) -> None:
    # A user of this test's own (and a range far from anyone's), removed at the end.
    user = f"ociw-st{os.getpid() % 100000}"
    subid = f"{3_000_000_000 + os.getpid() % 1000 * 65536}:65536"
    watched = [Path(p) for p in ("/etc/passwd", "/etc/group", "/etc/subuid", "/etc/subgid")]
    try:
        first = _ensure_test_user(user, subid)
        assert first.returncode == 0, first.stderr
        assert f"creating {user}" in first.stderr
        start, count = map(int, subid.split(":"))
        for kind in ("uid", "gid"):
            assert _subid_lines(user, kind) == [f"{user}:{start}:{count}"]
        before = {p: p.read_bytes() for p in watched}
        again = _ensure_test_user(user, subid)
        assert again.returncode == 0, again.stderr
        assert again.stderr.splitlines() == [
            f"==> test user: {user} ready (sub-ids {start}-{start + count - 1})"
        ]
        assert {p: p.read_bytes() for p in watched} == before
        # A range that overlaps another user's is refused, naming the owner.
        clash = _ensure_test_user(f"{user}x", f"{start + 10}:65536")
        assert clash.returncode == 1
        assert f"overlaps {user}'s in /etc/subuid" in clash.stderr
        with pytest.raises(KeyError):  # refused before anything changed
            pwd.getpwnam(f"{user}x")
    finally:
        for name in (user, f"{user}x"):
            subprocess.run(["userdel", "--remove", name], capture_output=True, check=False)
    assert _subid_lines(user, "uid") == []
