"""Outputs that leave while the build runs: ``type=layers``, and archives on stdout."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import LEGS_MARK, current_cli, oci_archive_image
from test_build import ow, write_context

pytestmark = LEGS_MARK


def _cmd(root: Path, *args: str) -> list[str]:
    """``ociworker build`` as root, or as the test user in the rootless leg (start it with
    ``env=_env()``)."""
    cli = current_cli()
    cli.hand_over()
    return cli.argv("build", "--root", str(root), *args)


def _env() -> dict[str, str]:
    return current_cli().popen_env()


def _descriptors(dest: Path) -> list[dict[str, Any]]:
    """The layers output's descriptors, in step order, each checked against its blob."""
    out = []
    for path in sorted(dest.glob("*.json")):
        desc: dict[str, Any] = json.loads(path.read_text())
        hexd = desc["digest"].removeprefix("sha256:")
        assert (
            path.name == f"{int(desc['annotations']['dev.ociworker.step.index']):03d}-{hexd}.json"
        )
        blob = (dest / "blobs" / "sha256" / hexd).read_bytes()
        assert "sha256:" + hashlib.sha256(blob).hexdigest() == desc["digest"]
        assert len(blob) == desc["size"]
        out.append(desc)
    return out


def _oci_image(archive: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(manifest, config) of the one image in an OCI archive."""
    with tarfile.open(archive) as tar:

        def blob(digest: str) -> dict[str, Any]:
            f = tar.extractfile("blobs/sha256/" + digest.removeprefix("sha256:"))
            assert f is not None
            data: dict[str, Any] = json.load(f)
            return data

        index = tar.extractfile("index.json")
        assert index is not None
        manifest = blob(json.load(index)["manifests"][0]["digest"])
        return manifest, blob(manifest["config"]["digest"])


def _events(proc: subprocess.Popen[str]) -> Iterator[dict[str, Any]]:
    assert proc.stderr is not None
    for line in proc.stderr:
        if line.startswith("{"):
            yield json.loads(line)


def _written_layers(ev: dict[str, Any]) -> list[str]:
    """The layer digests a rawjson line reports written (finished statuses)."""
    return [
        st["id"].removeprefix("writing layer ")
        for st in ev.get("statuses", [])
        if st["id"].startswith("writing layer sha256:") and "completed" in st
    ]


def test_layers_are_written_while_the_build_runs(
    tmp_path: Path, state_dir: Path, base_image: str, require_root: None
) -> None:
    ctx = write_context(
        tmp_path,
        f"FROM {base_image}\nRUN echo a > /a\nRUN sleep 5\nRUN echo c > /c\n",
    )
    layers = tmp_path / "layers"
    archive = tmp_path / "image.oci.tar"
    args = ["--runtime", "runc", "--progress=rawjson", str(ctx)]
    args += ["-o", f"type=layers,dest={layers}", "-o", f"type=oci,dest={archive}"]
    proc = subprocess.Popen(
        _cmd(state_dir, *args), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        env=_env(),
    )  # fmt: skip
    watchdog = threading.Timer(300, proc.kill)  # a hung build fails instead of hanging
    watchdog.start()
    sleep_state = ""
    seen_while_sleeping: list[dict[str, Any]] = []
    events: list[dict[str, Any]] = []
    try:
        for ev in _events(proc):
            events.append(ev)
            # rawjson is BuildKit's SolveStatus: vertexes change state, and a
            # written layer is a status "writing layer sha256:..." of its step.
            for vertex in ev.get("vertexes", []):
                if "RUN sleep 5" in vertex.get("name", ""):
                    if vertex.get("error") or vertex.get("cached"):
                        sleep_state = "failed"
                    else:
                        sleep_state = "done" if "completed" in vertex else "running"
            for digest in _written_layers(ev):
                if sleep_state == "running":
                    # The status is sent after the files are in place, and before
                    # the sleep step's completion: this is what is on disk meanwhile.
                    on_disk = {d["digest"]: d for d in _descriptors(layers)}
                    assert digest in on_disk
                    seen_while_sleeping.append(on_disk[digest])
        assert proc.wait() == 0, json.dumps(events[-5:])
    finally:
        watchdog.cancel()
        proc.kill()
        proc.wait()
        assert proc.stderr is not None
        proc.stderr.close()
    assert sleep_state == "done"
    assert [d["annotations"]["dev.ociworker.step.index"] for d in seen_while_sleeping] == ["1"]
    assert "RUN echo a > /a" in seen_while_sleeping[0]["annotations"]["dev.ociworker.vertex.name"]

    # After the build: one blob per step that changed something, in image order,
    # the same blobs and diffIDs as the image's own top layers.
    descs = _descriptors(layers)
    manifest, config = _oci_image(archive)
    built = [h for h in config["history"] if "RUN " in h["created_by"]]
    assert len(built) == 3
    non_empty = [h for h in built if not h.get("empty_layer")]
    assert len(descs) == len(non_empty) >= 2
    n = len(descs)
    assert [d["annotations"]["containerd.io/uncompressed"] for d in descs] == config["rootfs"][
        "diff_ids"
    ][-n:]
    assert [d["digest"] for d in descs] == [la["digest"] for la in manifest["layers"][-n:]]
    assert [d["mediaType"] for d in descs] == [la["mediaType"] for la in manifest["layers"][-n:]]
    for desc, hist in zip(descs, non_empty, strict=True):
        name = desc["annotations"]["dev.ociworker.vertex.name"]
        assert name.split("RUN ", 1)[1] in hist["created_by"]
    written = [digest for ev in events for digest in _written_layers(ev)]
    assert sorted(written) == sorted(d["digest"] for d in descs)
    assert len(list((layers / "blobs" / "sha256").iterdir())) == n

    # Fully cached, the top step is a hit and its inputs are never run (only shown
    # CACHED): the layers below it are written all the same, identically.
    again = tmp_path / "layers-again"
    rebuilt = ow(
        state_dir,
        "build",
        *["--runtime", "runc", "--progress=plain", str(ctx), "-o", f"type=layers,dest={again}"],
    )
    assert "CACHED" in rebuilt.stderr
    assert _descriptors(again) == descs
    assert sorted(p.name for p in again.glob("*.json")) == sorted(
        p.name for p in layers.glob("*.json")
    )


def test_failed_build_stops_layer_writes_and_releases_everything(
    tmp_path: Path, state_dir: Path, base_image: str, require_root: None
) -> None:
    ctx = write_context(tmp_path, f"FROM {base_image}\nRUN echo a > /a\nRUN exit 3\n")
    layers = tmp_path / "layers"
    proc = ow(
        state_dir,
        "build",
        *["--runtime", "runc", str(ctx), "-o", f"type=layers,dest={layers}"],
        check=False,
    )
    assert proc.returncode == 1
    assert "exit 3" in proc.stderr
    # whatever was written before the failure is whole (state_dir checks the mounts)
    for desc in _descriptors(layers) if layers.exists() else []:
        assert desc["annotations"]["dev.ociworker.step.index"] == "1"
    assert not list(layers.rglob("*.tmp")) if layers.exists() else True


def test_unwritable_layers_dest_fails_the_build_at_once(
    tmp_path: Path, state_dir: Path, base_image: str, require_root: None
) -> None:
    ctx = write_context(tmp_path, f"FROM {base_image}\nRUN echo a > /a\nRUN sleep 60\nRUN echo c\n")
    # The dest is a directory (the preflight lets it pass), but the blobs dir
    # inside it is taken by a file: the first layer write fails mid-build.
    dest = tmp_path / "layers"
    dest.mkdir()
    not_a_dir = dest / "blobs"
    not_a_dir.write_bytes(b"a file where the blobs dir should be")
    proc = ow(
        state_dir,
        "build",
        *["--runtime", "runc", "--progress=rawjson", str(ctx)],
        *["-o", f"type=layers,dest={dest}"],
        check=False,
    )
    assert proc.returncode == 1
    assert f"cannot write output type=layers to {dest}" in proc.stderr
    assert not_a_dir.read_bytes() == b"a file where the blobs dir should be"
    # the failed write cut the build short: the sleep was cancelled, not waited for
    sleep = [
        v
        for line in proc.stderr.splitlines()
        if line.startswith('{"vertexes"')
        for v in json.loads(line)["vertexes"]
        if "RUN sleep 60" in v["name"]
    ]
    assert sleep[-1].get("error") == "cancelled"


def test_archives_stream_to_stdout(
    tmp_path: Path, state_dir: Path, base_image: str, require_root: None
) -> None:
    skopeo = shutil.which("skopeo")
    if skopeo is None:
        pytest.fail("needs skopeo")
    ctx = write_context(tmp_path, f"FROM {base_image}\nRUN echo streamed > /streamed\n")
    as_file = tmp_path / "file.oci.tar"
    from_stdout = tmp_path / "stdout.oci.tar"
    meta = tmp_path / "meta.json"
    with open(from_stdout, "wb") as out:
        proc = subprocess.run(
            _cmd(
                state_dir,
                *["--runtime", "runc", "-q", str(ctx), "-t", "streamed:v1"],
                *["-o", "type=oci,dest=-", "-o", f"type=oci,dest={as_file}"],
                *["--metadata-file", str(meta)],
            ),
            stdout=out,
            stderr=subprocess.PIPE,
            text=True,
            timeout=300,
            env=_env(),
        )
    assert proc.returncode == 0, proc.stderr[-3000:]
    # stdout holds the archive and nothing else: -q's image id went to stderr
    assert from_stdout.read_bytes() == as_file.read_bytes()
    # -q's image ID is the config digest of the image in the archive, as docker computes it
    image = oci_archive_image(from_stdout)
    assert proc.stderr.split() == [image.config_digest]
    assert json.loads(meta.read_text())["containerimage.config.digest"] == image.config_digest
    inspected = subprocess.run(
        [skopeo, "inspect", f"oci-archive:{from_stdout}:v1"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert inspected.returncode == 0, inspected.stderr
    digest = json.loads(inspected.stdout)["Digest"]
    assert json.loads(meta.read_text())["containerimage.digest"] == digest

    # type=tar,dest=- into tar -t: a valid stream of the result's files
    errlog = tmp_path / "stderr.log"
    with open(errlog, "wb") as err:  # a file, so a full stderr pipe cannot stall the build
        build = subprocess.Popen(
            _cmd(
                state_dir,
                "--runtime",
                "runc",
                "--progress=plain",
                str(ctx),
                "-o",
                "type=tar,dest=-",
            ),
            stdout=subprocess.PIPE,
            stderr=err,
            env=_env(),
        )
        assert build.stdout is not None
        with build.stdout:
            listing = subprocess.run(
                ["tar", "-t"], stdin=build.stdout, capture_output=True, text=True, timeout=300
            )
        assert build.wait(timeout=300) == 0, errlog.read_text()[-3000:]
    assert listing.returncode == 0, listing.stderr
    names = listing.stdout.split()
    assert "streamed" in names and "bin/busybox" in names and "etc/" in names
    assert "#1 " in errlog.read_text()
