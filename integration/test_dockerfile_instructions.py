"""Each Dockerfile instruction built through the CLI on real runc/crun and overlayfs,
checked in the output tree and in the image config of the OCI archive."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path
from typing import Any

import pytest

from conftest import LEGS_MARK, current_cli, exported_ids


def _config(archive: Path) -> dict[str, Any]:
    with tarfile.open(archive) as tf:

        def blob(digest: str) -> Any:
            f = tf.extractfile("blobs/sha256/" + digest.split(":", 1)[1])
            assert f is not None
            return json.load(f)

        index_f = tf.extractfile("index.json")
        assert index_f is not None
        index = json.load(index_f)
        manifest = blob(index["manifests"][0]["digest"])
        config: dict[str, Any] = blob(manifest["config"]["digest"])
        config["_layers"] = len(manifest["layers"])
        return config


class Built:
    def __init__(self, out: Path, config: dict[str, Any], stderr: str) -> None:
        self.out = out
        self.config = config
        self.inner: dict[str, Any] = config.get("config") or {}
        self.stderr = stderr

    def text(self, path: str) -> str:
        return (self.out / path.lstrip("/")).read_text()


def build(
    tmp: Path,
    runtime: str,
    dockerfile: str,
    *args: str,
    files: dict[str, str] | None = None,
    name: str = "b",
) -> Built:
    ctx = tmp / f"ctx-{name}"
    ctx.mkdir()
    (ctx / "Dockerfile").write_text(dockerfile)
    for rel, data in (files or {}).items():
        (ctx / rel).parent.mkdir(parents=True, exist_ok=True)
        (ctx / rel).write_text(data)
    out, img = tmp / f"out-{name}", tmp / f"img-{name}.tar"
    # as root, or as the test user in the rootless leg
    proc = current_cli().run(
        "build", "--root", str(tmp / "state"), "--runtime", runtime, "--progress", "plain",
        "--output", f"type=local,dest={out}", "--output", f"type=oci,dest={img}", *args, str(ctx),
        check=False,
    )  # fmt: skip
    if proc.returncode != 0:
        raise AssertionError(f"build failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return Built(out, _config(img), proc.stderr)


pytestmark = [pytest.mark.usefixtures("require_root"), LEGS_MARK]


def test_env_is_seen_by_run_and_kept_in_config(
    tmp_path: Path, runtime: str, base_image: str
) -> None:
    b = build(
        tmp_path,
        runtime,
        f"FROM {base_image}\nENV GREETING=hello\nENV legacy form value\n"
        'RUN echo "$GREETING/$legacy" > /env.txt\n',
    )
    assert b.text("env.txt") == "hello/form value\n"
    assert "GREETING=hello" in b.inner["Env"] and "legacy=form value" in b.inner["Env"]


def test_workdir_chain_is_created_and_used(tmp_path: Path, runtime: str, base_image: str) -> None:
    b = build(
        tmp_path,
        runtime,
        f"FROM {base_image}\nWORKDIR /a\nWORKDIR b\nRUN pwd > here\n",
    )
    assert b.text("a/b/here") == "/a/b\n"
    assert b.inner["WorkingDir"] == "/a/b"


def test_user_applies_to_run_and_workdir(tmp_path: Path, runtime: str, base_image: str) -> None:
    b = build(
        tmp_path,
        runtime,
        f"FROM {base_image}\nUSER 1234:5678\nWORKDIR /owned\n"
        "RUN id -u > /tmp/uid; id -g >> /tmp/uid\n",
    )
    assert b.text("tmp/uid") == "1234\n5678\n"
    assert (b.out / "owned").stat().st_uid == exported_ids(1234, 5678)[0]
    assert b.inner["User"] == "1234:5678"


def test_onbuild_triggers_run_in_the_child_build(
    tmp_path: Path, runtime: str, base_image: str
) -> None:
    parent = build(
        tmp_path,
        runtime,
        f"FROM {base_image}\nONBUILD COPY hello.txt /from-trigger.txt\n"
        "ONBUILD RUN echo ran > /ran\n",
        "-t",
        "onbuild-parent:1",
        name="parent",
    )
    assert parent.inner["OnBuild"] == ["COPY hello.txt /from-trigger.txt", "RUN echo ran > /ran"]
    assert not (parent.out / "ran").exists()
    child = build(
        tmp_path,
        runtime,
        "FROM onbuild-parent:1\nRUN cat /ran /from-trigger.txt > /both\n",
        files={"hello.txt": "hi from the child context\n"},
        name="child",
    )
    assert child.text("both") == "ran\nhi from the child context\n"
    assert "OnBuild" not in child.inner
    assert "ONBUILD RUN echo ran" in child.stderr


def test_heredocs_in_run_and_copy(tmp_path: Path, runtime: str, base_image: str) -> None:
    df = (
        f"FROM {base_image}\nENV WHO=world\n"
        "RUN <<EOF\necho one > /one\necho $WHO >> /one\nEOF\n"
        "RUN cat <<A > /two && cat <<'B' >> /two\nhello $WHO\nA\nliteral $WHO\nB\n"
        "RUN <<-EOF\n\techo tabs > /three\n\tEOF\n"
        "COPY <<EOF /four\nhi $WHO\nEOF\n"
    )
    b = build(tmp_path, runtime, df)
    assert b.text("one") == "one\nworld\n"
    assert b.text("two") == "hello world\nliteral $WHO\n"
    assert b.text("three") == "tabs\n"
    assert b.text("four") == "hi world\n"


def test_shebang_heredoc_runs_as_a_script_file(
    tmp_path: Path, runtime: str, base_image: str
) -> None:
    # BuildKit runs a #! heredoc as a file bind-mounted at /dev/pipes/NAME.
    df = (
        f"FROM {base_image}\n"
        'RUN <<EOF\n#!/bin/sh\necho "script $0" > /script\nEOF\n'
        "RUN <<EOT sh\necho fed-to-sh > /fed\nEOT\n"
    )
    b = build(tmp_path, runtime, df)
    assert b.text("script") == "script /dev/pipes/EOF\n"
    assert b.text("fed") == "fed-to-sh\n"
    assert not (b.out / "dev" / "pipes").exists()  # the mount point stub is gone


def test_multi_stage_builds_only_what_the_target_needs(
    tmp_path: Path, runtime: str, base_image: str
) -> None:
    df = (
        f"FROM {base_image} AS unused\nRUN exit 7\n"
        f"FROM {base_image} AS builder\nRUN echo built > /artifact\n"
        f"FROM {base_image}\nCOPY --from=builder /artifact /artifact\n"
    )
    b = build(tmp_path, runtime, df)
    assert b.text("artifact") == "built\n"
    assert "exit 7" not in b.stderr


def test_arg_and_env_precedence(tmp_path: Path, runtime: str, base_image: str) -> None:
    df = (
        "ARG TAG=latest\nARG GLOBAL=g\n"
        f"FROM {base_image.rsplit(':', 1)[0]}:$TAG\n"
        "ARG GLOBAL\nARG A=default\nARG B=default\nENV B=env\nARG C\n"
        'RUN echo "$GLOBAL $A $B ${C:-unset}" > /args\n'
    )
    b = build(tmp_path, runtime, df, "--build-arg", "A=cli", "--build-arg", "UNUSED=1")
    assert b.text("args") == "g cli env unset\n"
    assert not any(e.startswith(("A=", "GLOBAL=")) for e in b.inner["Env"])
    assert "UNUSED" in b.stderr  # the unused build-arg warning


def test_healthcheck_stopsignal_volume_shell_expose_label_in_config(
    tmp_path: Path, runtime: str, base_image: str
) -> None:
    df = (
        f"FROM {base_image}\n"
        "HEALTHCHECK --interval=10s --timeout=3s --start-period=2s --retries=4 CMD wget -q x\n"
        'STOPSIGNAL SIGQUIT\nVOLUME /data /logs\nVOLUME ["/cache"]\n'
        'SHELL ["/bin/sh", "-ec"]\nRUN echo "$0 $-" > /shell\nCMD echo hi\n'
        "EXPOSE 8080 53/udp\nLABEL org.example.k=v\nMAINTAINER someone\n"
    )
    b = build(tmp_path, runtime, df)
    c = b.inner
    assert c["Healthcheck"] == {
        "Test": ["CMD-SHELL", "wget -q x"],
        "Interval": 10 * 10**9,
        "Timeout": 3 * 10**9,
        "StartPeriod": 2 * 10**9,
        "Retries": 4,
    }
    assert c["StopSignal"] == "SIGQUIT"
    assert c["Volumes"] == {"/data": {}, "/logs": {}, "/cache": {}}
    assert c["Shell"] == ["/bin/sh", "-ec"]
    assert c["Cmd"] == ["/bin/sh", "-ec", "echo hi"]
    assert "e" in b.text("shell").split()[1]
    assert set(c["ExposedPorts"]) == {"8080/tcp", "53/udp"}
    assert c["Labels"]["org.example.k"] == "v"
    assert b.config["author"] == "someone"


def test_platform_args(tmp_path: Path, runtime: str, base_image: str) -> None:
    df = (
        f'FROM {base_image}\nRUN echo "[$TARGETARCH]" > /before\n'
        "ARG TARGETPLATFORM\nARG TARGETOS\nARG TARGETARCH\nARG BUILDPLATFORM\n"
        'RUN echo "$TARGETPLATFORM $TARGETOS $TARGETARCH $BUILDPLATFORM" > /after\n'
    )
    b = build(tmp_path, runtime, df)
    plat = f"{b.config['os']}/{b.config['architecture']}"
    assert b.text("before") == "[]\n"
    assert b.text("after") == f"{plat} {b.config['os']} {b.config['architecture']} {plat}\n"


def test_copy_from_unknown_name_says_no_stage_or_image(
    tmp_path: Path, runtime: str, base_image: str
) -> None:
    with pytest.raises(AssertionError, match="no stage or image named 'buidler'") as info:
        build(
            tmp_path,
            runtime,
            f"FROM {base_image} AS builder\nFROM {base_image}\nCOPY --from=buidler /a /a\n",
        )
    assert "stages: builder" in str(info.value)
