"""End-to-end builds through the CLI, as a user runs them: real runc/crun, overlayfs,
the local registry, and Docker Engine for the archives."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import tarfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import pytest

from conftest import (
    CLI,
    LEGS_MARK,
    assert_lists_steps,
    buildkit_steps,
    current_cli,
    oci_archive_image,
)
from dockerd import Dockerd

SHARED_BENCH = Path(__file__).resolve().parents[2] / "shared" / "bench"
BENCH_CASES = ("steps", "fanout", "layer-export", "cachemount", "context")

# every test runs as root and as the rootless test user (conftest, "the rootless leg")
pytestmark = LEGS_MARK


def ow(
    root: Path,
    *args: str,
    check: bool = True,
    timeout: float = 600,
    env: Mapping[str, str] | None = None,
    input: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``ociworker`` as a user would, with its own state dir: as root, or as the test
    user in a rootless leg (``conftest.current_cli``)."""
    return current_cli().run(
        *args[:1], "--root", str(root), *args[1:], check=check, timeout=timeout, env=env,
        input=input,
    )  # fmt: skip


def write_runtime_spy(tmp: Path, real: str) -> tuple[Path, Path]:
    """A runtime wrapper that logs every container start, to prove a rebuild starts none."""
    log = tmp / "runtime-calls.log"
    spy = tmp / f"spy-{real}"
    spy.write_text(
        f'#!/bin/sh\ncase "$*" in *" run "*|run*) echo "$*" >> {log};; esac\n'
        f'exec {shutil.which(real)} "$@"\n'
    )
    spy.chmod(0o755)
    return spy, log


def runtime_containers(root: Path, runtime: str) -> str:
    state = root / "executor" / "runtime" / runtime
    out = subprocess.run(
        [runtime, "--root", str(state), "list", "-q"], capture_output=True, text=True
    )
    return out.stdout.strip()


def make_context_case(dest: Path) -> Path:
    ctx = dest / "context"
    shutil.copytree(SHARED_BENCH / "context", ctx)
    for i in range(40):
        d = ctx / f"d{i % 5}"
        d.mkdir(exist_ok=True)
        (d / f"f{i}.txt").write_text(f"file {i}\n" * 100)
    return ctx


def write_context(
    tmp: Path,
    dockerfile: str,
    files: Mapping[str, str | bytes] | None = None,
    *,
    name: str = "ctx",
    mtime: float | None = None,
) -> Path:
    """A build context dir ``tmp/name`` with a Dockerfile and ``files`` (text or
    bytes, parents made), each given ``mtime`` when set."""
    ctx = tmp / name
    ctx.mkdir(parents=True, exist_ok=True)
    (ctx / "Dockerfile").write_text(dockerfile)
    for rel, data in (files or {}).items():
        path = ctx / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(data, bytes):
            path.write_bytes(data)
        else:
            path.write_text(data)
        if mtime is not None:
            os.utime(path, (mtime, mtime))
    return ctx


@pytest.mark.parametrize("case", BENCH_CASES)
def test_bench_case_builds_then_rebuilds_fully_cached(
    case: str,
    runtime: str,
    leg_cli: CLI,
    base_image: str,
    mounts_under: Callable[[Path], list[Path]],
) -> None:
    # Runs as root and as the rootless test user (the ``leg_cli`` fixture's legs): everything the
    # build reads and writes is in ``leg_cli.home``, which that user owns.
    root = leg_cli.home / "state"
    if case == "context":
        ctx = make_context_case(leg_cli.home)
        leg_cli.give(ctx)
    else:
        ctx = leg_cli.own(SHARED_BENCH / case)
    out = f"type=oci,dest={leg_cli.home / 'img.tar'}"
    first = leg_cli.run(
        "build", "--root", str(root), "--progress", "plain", "--runtime", runtime, "-o", out,
        str(ctx),
    )  # fmt: skip
    assert "DONE" in first.stderr

    spy, log = write_runtime_spy(leg_cli.home, runtime)
    leg_cli.give(spy)
    again = leg_cli.run(
        "build", "--root", str(root), "--progress", "plain", "--runtime", str(spy), "-o", out,
        str(ctx),
    )  # fmt: skip
    # Every step BuildKit lists for this Dockerfile is shown, once, CACHED, after its inputs.
    assert_lists_steps(again.stderr, buildkit_steps((ctx / "Dockerfile").read_text()), {})
    assert not log.exists(), f"a container was started on a cached rebuild: {log.read_text()}"
    if not leg_cli.rootless:
        # A rootless worker's mounts and runtime state live in its own namespaces, which end
        # with it: there is nothing left to look at from here.
        assert mounts_under(root) == []
        assert runtime_containers(root, runtime) == ""


def test_run_exit_code_fails_naming_step_command_and_code(
    runtime: str,
    leg_cli: CLI,
    base_image: str,
    mounts_under: Callable[[Path], list[Path]],
) -> None:
    # The README's example, word for word (section "Errors"), as root and rootless alike.
    ctx = write_context(leg_cli.home, f"FROM {base_image}\nRUN exit 3\n")
    leg_cli.give(ctx)
    root = leg_cli.home / "state"
    proc = leg_cli.run(
        "build", "--root", str(root), "--progress", "plain", "--runtime", runtime, str(ctx),
        check=False,
    )  # fmt: skip
    assert proc.returncode == 1
    readme_line = (
        "ERROR: failed to solve: step [2/2] RUN exit 3: "
        "process '/bin/sh -c exit 3' did not complete successfully: exit code: 3"
    )
    assert readme_line in proc.stderr.splitlines(), proc.stderr[-2000:]
    bundles = root / "executor" / "bundles"
    assert not bundles.exists() or not any(bundles.iterdir())
    if not leg_cli.rootless:  # a rootless worker's mounts and containers end with its namespaces
        assert mounts_under(root) == []
        assert runtime_containers(root, runtime) == ""


def _image_config_from_oci(archive: Path) -> dict[str, object]:
    with tarfile.open(archive) as tf:
        index = json.load(tf.extractfile("index.json"))  # type: ignore[arg-type]
        mdesc = index["manifests"][0]["digest"].split(":")[1]
        manifest = json.load(tf.extractfile(f"blobs/sha256/{mdesc}"))  # type: ignore[arg-type]
        cdesc = manifest["config"]["digest"].split(":")[1]
        config: dict[str, object] = json.load(tf.extractfile(f"blobs/sha256/{cdesc}"))  # type: ignore[arg-type]
        return config


def test_oci_archive_image_config_and_skopeo(
    tmp_path: Path, base_image: str, require_root: None
) -> None:
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "a.txt").write_text("a\n")
    (ctx / "Dockerfile").write_text(
        f"ARG BASE={base_image}\nFROM $BASE\n"
        "ENV GREETING=hi OTHER=x\nLABEL org.example.k=v\nEXPOSE 8080 53/udp\n"
        "WORKDIR /app\nCOPY a.txt .\nUSER user\nRUN id -u > /tmp/uid\n"
        'ENTRYPOINT ["/bin/sh", "-c"]\nCMD ["echo $GREETING"]\n'
    )
    out = tmp_path / "img.oci.tar"
    root = tmp_path / "state"
    ow(
        root,
        "build",
        "--progress",
        "plain",
        "-t",
        "example/cfg:1",
        "--output",
        f"type=oci,dest={out}",
        "--iidfile",
        str(tmp_path / "iid"),
        "--metadata-file",
        str(tmp_path / "md.json"),
        str(ctx),
    )
    inspect = subprocess.run(
        ["skopeo", "inspect", f"oci-archive:{out}"], capture_output=True, text=True, check=True
    )
    assert json.loads(inspect.stdout)["Architecture"] == "amd64"
    config = _image_config_from_oci(out)
    c = config["config"]
    assert isinstance(c, dict)
    assert "GREETING=hi" in c["Env"] and "OTHER=x" in c["Env"]
    assert c["Labels"] == {"org.example.k": "v"}
    assert c["ExposedPorts"] == {"8080/tcp": {}, "53/udp": {}}
    assert c["WorkingDir"] == "/app"
    assert c["User"] == "user"
    assert c["Entrypoint"] == ["/bin/sh", "-c"]
    assert c["Cmd"] == ["echo $GREETING"]
    history = config["history"]
    assert isinstance(history, list)
    ours = [h["created_by"] for h in history[-10:]]
    assert any(h.startswith("RUN /bin/sh -c id -u") for h in ours)
    assert any(h.startswith("COPY a.txt .") for h in ours)
    rootfs = config["rootfs"]
    assert isinstance(rootfs, dict)
    assert len([h for h in history if not h.get("empty_layer")]) == len(rootfs["diff_ids"])
    # The image ID is the config digest of the archive's image, as docker computes it.
    image = oci_archive_image(out)
    assert (tmp_path / "iid").read_text() == image.config_digest
    md = json.loads((tmp_path / "md.json").read_text())
    assert md["containerimage.config.digest"] == image.config_digest
    assert md["containerimage.digest"] == image.manifest_digest


def test_docker_archive_loads_runs_cmd_and_removed_file_is_gone(
    tmp_path: Path, base_image: str, require_root: None, dockerd: Dockerd
) -> None:
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "Dockerfile").write_text(
        f"FROM {base_image}\nRUN echo doomed > /doomed && mkdir -p /keep && echo kept > /keep/k\n"
        "RUN rm /doomed\n"
        'CMD ["/bin/sh", "-c", "cat /keep/k; '
        'test -e /doomed && echo doomed-present || echo doomed-absent"]\n'
    )
    out = tmp_path / "img.docker.tar"
    ow(
        tmp_path / "state",
        "build",
        "--progress",
        "plain",
        "-t",
        "ociworker-test/loaded:v1",
        "--output",
        f"type=docker,dest={out}",
        str(ctx),
    )
    load = dockerd.docker("load", "-i", str(out))
    assert "ociworker-test/loaded:v1" in load.stdout
    run = dockerd.docker("run", "--rm", "--network=none", "ociworker-test/loaded:v1")
    assert run.stdout.split() == ["kept", "doomed-absent"]
    dockerd.docker("rmi", "ociworker-test/loaded:v1")


def test_changed_context_file_invalidates_exactly_its_steps(
    tmp_path: Path, base_image: str, require_root: None
) -> None:
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "a.txt").write_text("a1\n")
    (ctx / "b.txt").write_text("b1\n")
    (ctx / "Dockerfile").write_text(
        f"FROM {base_image}\nCOPY a.txt /a\nRUN cat /a > /a2\nCOPY b.txt /b\nRUN cat /b > /b2\n"
    )
    root = tmp_path / "state"
    ow(root, "build", "--progress", "plain", str(ctx))
    (ctx / "b.txt").write_text("b2\n")
    (ctx / "unrelated").write_text("x")
    out = ow(
        root,
        "build",
        "--progress",
        "plain",
        "--output",
        f"type=local,dest={tmp_path / 'o'}",
        str(ctx),
    )
    # From the Dockerfile: the steps up to the one copying b.txt are cache hits (their
    # inputs did not change), it and every step after it run again.
    steps = buildkit_steps((ctx / "Dockerfile").read_text())
    first_changed = next(i for i, st in enumerate(steps) if "b.txt" in st.name)
    ran = {st.name: ("DONE",) for st in steps[first_changed:]}
    assert first_changed == 3 and len(ran) == 2  # the Dockerfile is what this test thinks
    assert_lists_steps(out.stderr, steps, ran)
    assert (tmp_path / "o" / "b2").read_text() == "b2\n"
    assert (tmp_path / "o" / "a2").read_text() == "a1\n"


def test_target_builds_only_needed_stages_and_dockerignore_applies(
    tmp_path: Path, base_image: str, require_root: None
) -> None:
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "keep.txt").write_text("keep")
    (ctx / "secret.key").write_text("nope")
    (ctx / ".dockerignore").write_text("*.key\n")
    (ctx / "Dockerfile").write_text(
        f"FROM {base_image} AS broken\nRUN exit 1\n"
        f"FROM {base_image} AS good\nCOPY . /ctx/\nRUN ls /ctx > /listing\n"
        "FROM good AS final\nRUN exit 2\n"
    )
    root = tmp_path / "state"
    out = ow(
        root,
        "build",
        "--progress",
        "plain",
        "--target",
        "good",
        "--output",
        f"type=local,dest={tmp_path / 'o'}",
        str(ctx),
    )
    assert "exit 1" not in out.stderr and "exit 2" not in out.stderr
    listing = (tmp_path / "o" / "listing").read_text().split()
    assert "keep.txt" in listing and "secret.key" not in listing
    bad = ow(root, "build", "--progress", "plain", "--target", "nosuch", str(ctx), check=False)
    assert bad.returncode == 1 and "nosuch" in bad.stderr


def test_tagged_image_is_usable_by_a_later_from(
    tmp_path: Path, base_image: str, require_root: None
) -> None:
    root = tmp_path / "state"
    one = tmp_path / "one"
    one.mkdir()
    (one / "Dockerfile").write_text(f"FROM {base_image}\nRUN echo from-one > /one\n")
    ow(root, "build", "--progress", "plain", "-t", "local/one:latest", str(one))
    two = tmp_path / "two"
    two.mkdir()
    (two / "Dockerfile").write_text("FROM local/one:latest\nRUN cat /one > /two\n")
    ow(
        root,
        "build",
        "--progress",
        "plain",
        "--output",
        f"type=local,dest={tmp_path / 'o'}",
        str(two),
    )
    assert (tmp_path / "o" / "two").read_text() == "from-one\n"


def test_user_from_image_passwd_and_network_none(
    runtime: str, tmp_path: Path, base_image: str, require_root: None
) -> None:
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "Dockerfile").write_text(
        f"FROM {base_image}\nUSER user\nRUN id -u > /tmp/uid && id -g > /tmp/gid\n"
        "USER root\nRUN --network=none ls /sys/class/net > /ifaces"
        " && cat /sys/class/net/lo/operstate > /lo\n"
    )
    ow(
        tmp_path / "state",
        "build",
        "--progress",
        "plain",
        "--runtime",
        runtime,
        "--output",
        f"type=local,dest={tmp_path / 'o'}",
        str(ctx),
    )
    o = tmp_path / "o"
    assert (o / "tmp" / "uid").read_text().strip() == "1000"
    assert (o / "tmp" / "gid").read_text().strip() == "1000"
    assert (o / "ifaces").read_text().split() == ["lo"]
    assert (o / "lo").read_text().strip() in ("unknown", "up")


def test_hostile_context_paths_fail_and_touch_nothing_outside(
    tmp_path: Path, base_image: str, require_root: None
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "host-secret").write_text("host secret")
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    os.symlink(str(outside), ctx / "evil-link")
    os.symlink("../outside", ctx / "evil-rel")
    root = tmp_path / "state"
    for src in ("evil-link/host-secret", "evil-rel/host-secret", "../outside/host-secret"):
        (ctx / "Dockerfile").write_text(f"FROM {base_image}\nCOPY {src} /x\n")
        proc = ow(
            root,
            "build",
            "--progress",
            "plain",
            "--output",
            f"type=local,dest={tmp_path / 'o'}",
            str(ctx),
            check=False,
        )
        assert proc.returncode == 1, proc.stderr
        assert "not found" in proc.stderr
        assert not (tmp_path / "o" / "x").exists()
    # A COPY destination through a symlink in the image stays in the image.
    (ctx / "f").write_text("payload")
    (ctx / "Dockerfile").write_text(
        f"FROM {base_image}\nRUN ln -s {outside} /escape\nCOPY f /escape/written\n"
    )
    ow(
        root,
        "build",
        "--progress",
        "plain",
        "--output",
        f"type=local,dest={tmp_path / 'o2'}",
        str(ctx),
    )
    assert sorted(p.name for p in outside.iterdir()) == ["host-secret"]
    assert (tmp_path / "o2" / str(outside).lstrip("/") / "written").read_text() == "payload"


def wait_for_line(proc: subprocess.Popen[str], marker: str, timeout: float = 120) -> list[str]:
    """Read ``proc``'s stderr up to the line holding ``marker``; the lines read."""
    assert proc.stderr is not None
    deadline = time.time() + timeout
    seen: list[str] = []
    for line in proc.stderr:
        seen.append(line)
        if marker in line:
            return seen
        assert time.time() < deadline, "".join(seen)
    raise AssertionError(f"{marker!r} never printed:\n{''.join(seen)}")


def _interrupt_after(proc: subprocess.Popen[str], marker: str) -> None:
    """Send Ctrl-C once ``marker`` shows in the build log; wait for the CLI to exit."""
    wait_for_line(proc, marker)
    current_cli().interrupt(proc)
    assert proc.wait(timeout=10) == 130


def test_ctrl_c_kills_container_and_leaves_no_state(
    runtime: str,
    tmp_path: Path,
    base_image: str,
    require_root: None,
    mounts_under: Callable[[Path], list[Path]],
) -> None:
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    # a duration no other process on the machine uses: ps must find exactly ours
    marker = f"sleep {secrets.randbelow(8000) + 1000}"
    (ctx / "Dockerfile").write_text(f"FROM {base_image}\nRUN echo started && {marker}\n")
    root = tmp_path / "state"
    cli = current_cli()
    cli.hand_over()
    argv = cli.argv("build", "--root", str(root), "--progress", "plain", "--runtime", runtime)
    with subprocess.Popen(
        [*argv, str(ctx)], stderr=subprocess.PIPE, text=True, env=cli.popen_env(), cwd=cli.home
    ) as proc:
        assert proc.stderr is not None
        _interrupt_after(proc, "started")
    assert mounts_under(root) == []
    assert runtime_containers(root, runtime) == ""
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert marker not in ps


def test_du_lists_cache_and_prune_all_empties_it(
    tmp_path: Path, base_image: str, require_root: None
) -> None:
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "Dockerfile").write_text(f"FROM {base_image}\nRUN head -c 100000 /dev/zero > /z\n")
    root = tmp_path / "state"
    ow(root, "build", "--progress", "plain", str(ctx))
    # where the state dir keeps snapshots and blobs (docs/architecture.md, "State dir")
    on_disk = (root / "snapshots" / "snapshots", root / "content" / "blobs" / "sha256")
    for d in on_disk:
        assert any(d.iterdir()), f"the build left nothing in {d}: wrong place to look"
    du = ow(root, "du", "--verbose").stdout
    assert "RUN head -c 100000" in du
    assert "Total:" in ow(root, "du").stdout
    pruned = ow(root, "prune", "--all").stdout
    assert pruned.splitlines()[-1].startswith("Total:")
    after = ow(root, "du", "--verbose").stdout
    assert "RUN head" not in after
    # no image is stored (no -t), so nothing on disk is kept
    for d in on_disk:
        assert sorted(p.name for p in d.iterdir()) == [], f"prune --all left files in {d}"
    rebuilt = ow(root, "build", "--progress", "plain", str(ctx)).stderr
    assert "CACHED" not in rebuilt.split("RUN head", 1)[1]


def _build_with_each_snapshotter(tmp_path: Path, base_image: str) -> dict[str, Path]:
    """One Dockerfile built with the native and the overlayfs snapshotter; kind -> the
    output path (``P`` a local dir, ``P.tar`` an OCI archive)."""
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    # Every path a step changes gets a fixed mtime, so the layers depend on the files
    # alone and the two snapshotters must give byte-identical layers (same diff_ids).
    (ctx / "Dockerfile").write_text(
        f"FROM {base_image}\n"
        "RUN echo one > /one && rm /bin/vi && touch -d @1000000000 /one /bin\n"
        "RUN echo two > /two && touch -d @1000000000 /two\n"
    )
    outs: dict[str, Path] = {}
    for kind in ("native", "overlayfs"):
        out = outs[kind] = tmp_path / f"out-{kind}"
        ow(
            tmp_path / f"state-{kind}",
            "build",
            *["--snapshotter", kind, "--progress", "plain"],
            *["--output", f"type=oci,dest={out}.tar", "--output", f"type=local,dest={out}"],
            str(ctx),
        )
    return outs


def test_native_snapshotter_builds_the_same_files(
    tmp_path: Path, base_image: str, require_root: None
) -> None:
    for out in _build_with_each_snapshotter(tmp_path, base_image).values():
        assert (out / "one").read_text() == "one\n"
        assert (out / "two").read_text() == "two\n"
        assert not (out / "bin" / "vi").exists()
        assert (out / "bin" / "sh").exists()


def test_native_and_overlay_snapshotters_give_the_same_layers(
    tmp_path: Path, base_image: str, require_root: None
) -> None:
    diff_ids: dict[str, list[str]] = {}
    for kind, out in _build_with_each_snapshotter(tmp_path, base_image).items():
        rootfs = _image_config_from_oci(Path(f"{out}.tar"))["rootfs"]
        assert isinstance(rootfs, dict)
        diff_ids[kind] = rootfs["diff_ids"]
    assert len(diff_ids["native"]) == len(diff_ids["overlayfs"]) >= 3
    assert diff_ids["native"] == diff_ids["overlayfs"]


def test_zstd_compression_output(tmp_path: Path, base_image: str, require_root: None) -> None:
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "Dockerfile").write_text(f"FROM {base_image}\nRUN echo z > /z\n")
    out = tmp_path / "z.tar"
    ow(
        tmp_path / "state",
        "build",
        "--progress",
        "plain",
        "--output",
        f"type=oci,dest={out},compression=zstd,compression-level=3",
        str(ctx),
    )
    raw = subprocess.run(
        ["skopeo", "inspect", "--raw", f"oci-archive:{out}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    types = [layer["mediaType"] for layer in json.loads(raw)["layers"]]
    # the pulled base layer is kept as it came (gzip); our own layer is zstd
    assert types[-1] == "application/vnd.oci.image.layer.v1.tar+zstd"


def test_copy_parents_key_covers_files_reached_by_double_star(
    tmp_path: Path, base_image: str, require_root: None
) -> None:
    ctx = tmp_path / "ctx"
    deep = ctx / "src" / "a" / "b"
    deep.mkdir(parents=True)
    (deep / "x.txt").write_text("v1\n")
    (ctx / "Dockerfile").write_text(f"FROM {base_image}\nCOPY --parents src/**/*.txt /out/\n")
    root = tmp_path / "state"
    out = tmp_path / "o"
    ow(root, "build", "--progress", "plain", "--output", f"type=local,dest={out}", str(ctx))
    assert (out / "out" / "src" / "a" / "b" / "x.txt").read_text() == "v1\n"
    (deep / "x.txt").write_text("v2\n")
    again = ow(
        root, "build", "--progress", "plain", "--output", f"type=local,dest={out}2", str(ctx)
    )
    assert "COPY --parents" in again.stderr
    assert (tmp_path / "o2" / "out" / "src" / "a" / "b" / "x.txt").read_text() == "v2\n"
