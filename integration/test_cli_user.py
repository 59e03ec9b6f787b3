"""The CLI as a buildx user meets it: versions, exit codes, message prefixes,
signals, a Dockerfile on stdin, diagnostic logs and words instead of Python.

Each test runs ``ociworker`` as a subprocess and looks only at what a user sees:
the exit code, stdout, stderr and the files around it. Expected values come from
buildx's documented behaviour or from an independent reading of the result
(the archive's own config digest), never from the code under test.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from test_build import wait_for_line

OCIWORKER = [sys.executable, "-m", "ociworker"]


def run(
    *args: str, input: str | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*OCIWORKER, *args], capture_output=True, text=True, input=input, timeout=timeout
    )


def context(tmp: Path, dockerfile: str, **files: str) -> Path:
    ctx = tmp / "ctx"
    ctx.mkdir(exist_ok=True)
    (ctx / "Dockerfile").write_text(dockerfile)
    for name, text in files.items():
        (ctx / name).write_text(text)
    return ctx


def no_python(stderr: str) -> None:
    """Words a user should never read: a traceback, errno, a Python list or exception name."""
    assert "Traceback" not in stderr, stderr
    assert "[Errno" not in stderr, stderr
    assert not re.search(r"\['[^']*'\]", stderr), stderr
    assert not re.search(r"\b[A-Z][a-zA-Z]+(Error|Exception):", stderr), stderr


def oci_config_digest(archive: Path) -> str:
    """The image's config digest read from an OCI archive: index -> manifest -> config."""
    with tarfile.open(archive) as tar:

        def blob(digest: str) -> bytes:
            f = tar.extractfile("blobs/sha256/" + digest.split(":", 1)[1])
            assert f is not None
            return f.read()

        index_file = tar.extractfile("index.json")
        assert index_file is not None
        index = json.load(index_file)
        manifest = json.loads(blob(index["manifests"][0]["digest"]))
        return str(manifest["config"]["digest"])


def test_version_names_the_installed_release() -> None:
    proc = run("--version")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"ociworker {importlib.metadata.version('ociworker')}"


@pytest.mark.parametrize(
    ("args", "help_of"),
    [
        (("build",), "ociworker build"),  # no context
        (("build", "--progress", "fancy", "."), "ociworker build"),
        (("build", "--no-such-flag", "."), "ociworker build"),
        (("bild", "."), "ociworker"),
        ((), "ociworker"),
    ],
)
def test_usage_errors_exit_1_with_one_error_line(args: tuple[str, ...], help_of: str) -> None:
    proc = run(*args)
    assert proc.returncode == 1  # buildx's usage errors exit 1 (argparse's default is 2)
    lines = proc.stderr.strip().splitlines()
    assert lines[0].startswith("ERROR: ") and "failed to solve" not in lines[0]
    assert lines[-1] == f"See '{help_of} --help'."
    assert not any(line.startswith("usage:") for line in lines)
    no_python(proc.stderr)


def test_failed_to_solve_prefixes_solve_errors_only(
    tmp_path: Path, base_image: str, require_root: None
) -> None:
    root = str(tmp_path / "state")
    ctx = context(tmp_path, f"FROM {base_image}\nRUN exit 3\n")
    # not solve errors: a missing context, a prune filter, an unreachable daemon
    for args in (
        ("build", "--root", root, str(tmp_path / "missing")),
        ("prune", "--root", root, "--filter", "until=soon"),
        ("build", "--addr", f"unix://{tmp_path}/nobody.sock", str(ctx)),
        ("du", "--addr", f"unix://{tmp_path}/nobody.sock"),
    ):
        proc = run(*args, timeout=60)
        assert proc.returncode == 1, (args, proc.stderr)
        assert proc.stderr.startswith("ERROR: "), (args, proc.stderr)
        assert "failed to solve" not in proc.stderr, (args, proc.stderr)
        no_python(proc.stderr)
    # a solve error
    proc = run("build", "--root", root, "--progress", "plain", str(ctx))
    assert proc.returncode == 1
    assert proc.stderr.rstrip().splitlines()[-1].startswith("ERROR: failed to solve: ")


def test_runtime_is_checked_before_anything_runs(
    tmp_path: Path, base_image: str, require_root: None
) -> None:
    root = tmp_path / "state"
    ctx = context(tmp_path, f"FROM {base_image}\nRUN echo never\n")
    proc = run("build", "--root", str(root), "--runtime", "nosuch", "--progress", "plain", str(ctx))
    assert proc.returncode == 1
    assert proc.stderr.startswith("ERROR: ") and "'nosuch'" in proc.stderr
    assert "#1 " not in proc.stderr  # no step started: the check came first
    assert not root.exists()
    no_python(proc.stderr)


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_cancels_with_the_shell_exit_code(
    signum: int, code: int, tmp_path: Path, base_image: str, require_root: None
) -> None:
    marker = f"sleep {secrets.randbelow(8000) + 1000}"
    ctx = context(tmp_path, f"FROM {base_image}\nRUN echo started && {marker}\n")
    root = tmp_path / "state"
    with subprocess.Popen(
        [*OCIWORKER, "build", "--root", str(root), "--progress", "plain", str(ctx)],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    ) as proc:
        wait_for_line(proc, "started")
        proc.send_signal(signum)
        assert proc.wait(timeout=30) == code
        assert proc.stderr is not None
        rest = proc.stderr.read()
    assert "ERROR: build cancelled" in rest
    no_python(rest)
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert marker not in ps  # the container died with the build


def test_dockerfile_from_stdin(tmp_path: Path, base_image: str, require_root: None) -> None:
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "f.txt").write_text("from the context\n")
    (ctx / "ignored.txt").write_text("x")
    (ctx / ".dockerignore").write_text("ignored.txt\n")
    dockerfile = f"FROM {base_image}\nCOPY . /in/\nRUN cat /in/f.txt > /out.txt\n"
    out = tmp_path / "out"
    proc = run(
        "build", "--root", str(tmp_path / "state"), "-f", "-", "-o", str(out), str(ctx),
        input=dockerfile,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert (out / "out.txt").read_text() == "from the context\n"
    # the context's .dockerignore applies; there is no Dockerfile in the context to copy
    assert sorted(p.name for p in (out / "in").iterdir()) == [".dockerignore", "f.txt"]


def test_quiet_prints_the_image_id_without_any_output(
    tmp_path: Path, base_image: str, require_root: None
) -> None:
    root = tmp_path / "state"
    ctx = context(tmp_path, f"FROM {base_image}\nRUN echo hi > /hi\n")
    proc = run("build", "--root", str(root), "-q", str(ctx))
    assert proc.returncode == 0, proc.stderr
    image_id = proc.stdout.strip()
    # The ID names an image config the worker holds: the blob hashes to it.
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", image_id), proc.stdout
    blob = (root / "content" / "blobs" / "sha256" / image_id[7:]).read_bytes()
    assert "sha256:" + hashlib.sha256(blob).hexdigest() == image_id
    assert json.loads(blob)["rootfs"]["type"] == "layers"
    # With an archive, the ID printed is that archive's config digest.
    archive = tmp_path / "img.tar"
    again = run("build", "--root", str(root), "-q", "-o", f"type=oci,dest={archive}", str(ctx))
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip() == oci_config_digest(archive)
    # --progress=quiet alone silences the progress and prints no ID (buildx: only -q does)
    silent = run("build", "--root", str(root), "--progress=quiet", str(ctx))
    assert silent.returncode == 0, silent.stderr
    assert silent.stdout == "" and "sha256:" not in silent.stderr


def test_debug_and_json_logs(tmp_path: Path, base_image: str, require_root: None) -> None:
    root = str(tmp_path / "state")
    ctx = context(tmp_path, f"FROM {base_image}\nRUN echo one\nRUN echo two\n")
    meta = tmp_path / "meta.json"
    proc = run(
        "--debug", "--log-format", "json", "build", "--root", root, "--progress", "plain",
        "--metadata-file", str(meta), str(ctx),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    logs = [json.loads(line) for line in proc.stderr.splitlines() if line.startswith("{")]
    assert logs and all({"event", "level", "timestamp"} <= set(entry) for entry in logs)
    done = {e["step"] for e in logs if e["event"] == "step done"}
    assert {"[2/3] RUN echo one", "[3/3] RUN echo two"} <= done
    finished = [e for e in logs if e["event"] == "build finished"]
    assert [e["image"] for e in finished] == [json.loads(meta.read_text())["containerimage.digest"]]
    # the console format is key=value lines, and without --debug nothing but warnings
    console = run("--debug", "build", "--root", root, "--progress", "plain", str(ctx))
    assert re.search(r"^timestamp='.*' level='debug' event='step cached'", console.stderr, re.M)
    quiet = run("build", "--root", root, "--progress", "plain", str(ctx))
    assert "level=" not in quiet.stderr


def test_unused_build_arg_warning_in_words(
    tmp_path: Path, base_image: str, require_root: None
) -> None:
    ctx = context(tmp_path, f"FROM {base_image}\n")
    proc = run(
        "build", "--root", str(tmp_path / "state"), "--progress", "plain",
        "--build-arg", "UNUSED=1", "--build-arg", "OTHER=2", str(ctx),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    # BuildKit prints the Go slice: [OTHER UNUSED]
    assert "One or more build-args [OTHER UNUSED] were not consumed" in proc.stderr
    no_python(proc.stderr)


def test_stdout_closed_early_is_reported_in_words(
    tmp_path: Path, base_image: str, require_root: None
) -> None:
    ctx = context(tmp_path, f"FROM {base_image}\nRUN head -c 3000000 /dev/urandom > /big\n")
    root = str(tmp_path / "state")
    cmd = " ".join([*OCIWORKER, "build", "--root", root, "-o", "-", str(ctx)])
    proc = subprocess.run(
        ["bash", "-c", f"set -o pipefail; {cmd} | head -c 10 >/dev/null"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert proc.returncode == 1, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("ERROR: ") and "stdout" in last, proc.stderr
    assert "Exception ignored" not in proc.stderr
    no_python(proc.stderr)


def test_oci_mediatypes_false_gives_docker_media_types(
    tmp_path: Path, base_image: str, require_root: None
) -> None:
    ctx = context(tmp_path, f"FROM {base_image}\nRUN echo x > /x\n")
    archive = tmp_path / "img.tar"
    out = f"type=oci,dest={archive},oci-mediatypes=false"
    proc = run("build", "--root", str(tmp_path / "state"), "-o", out, str(ctx))
    assert proc.returncode == 0, proc.stderr
    with tarfile.open(archive) as tar:
        index_file = tar.extractfile("index.json")
        assert index_file is not None
        desc = json.load(index_file)["manifests"][0]
        blob = tar.extractfile("blobs/sha256/" + desc["digest"].split(":", 1)[1])
        assert blob is not None
        manifest = json.load(blob)
    docker = "application/vnd.docker."
    assert manifest["mediaType"] == docker + "distribution.manifest.v2+json"
    assert manifest["config"]["mediaType"] == docker + "container.image.v1+json"
    assert {la["mediaType"] for la in manifest["layers"]} == {docker + "image.rootfs.diff.tar.gzip"}
