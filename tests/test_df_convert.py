"""Dockerfile -> graph conversion, pure: no images fetched, no containers."""

from __future__ import annotations

from typing import Any

import pytest

from ociworker.core.graph import Copy, ExecOp, FileOp, Mkdir, SourceOp, Vertex
from ociworker.errors import DockerfileError, UnsupportedError
from ociworker.frontend.dockerfile.convert import ImageInfo, Options, Plan, convert
from ociworker.frontend.dockerfile.parser import parse

BASE_CONFIG: dict[str, Any] = {
    "config": {"Env": ["PATH=/bin", "FROMBASE=1"], "WorkingDir": "/"},
    "rootfs": {"type": "layers", "diff_ids": ["sha256:" + "a" * 64]},
    "history": [{"created_by": "base"}],
}


def _resolve(text: str, **opts: Any) -> Plan:
    parsed = parse(text)
    images: dict[str, ImageInfo] = {}
    for _ in range(5):
        plan = convert(parsed, Options(**opts), images)
        if not plan.missing:
            return plan
        for m in plan.missing:
            images[m] = ImageInfo(ref=f"{m}@sha256:" + "b" * 64, config=BASE_CONFIG)
    raise AssertionError("did not converge")


def _ops(v: Vertex | None) -> list[Vertex]:
    return list(v.walk()) if v else []


def test_missing_images_are_reported_then_resolved() -> None:
    parsed = parse("FROM busybox\nRUN true\n")
    first = convert(parsed, Options(), {})
    assert first.missing == ("busybox",)
    plan = _resolve("FROM busybox\nRUN true\n")
    assert plan.missing == ()
    assert isinstance(plan.target, Vertex) and isinstance(plan.target.op, ExecOp)
    src = plan.target.inputs[0]
    assert src is not None and isinstance(src.op, SourceOp)
    assert src.op.identifier == "docker-image://busybox@sha256:" + "b" * 64


def test_stages_the_target_does_not_need_are_not_converted() -> None:
    text = (
        "FROM never-pulled AS unused\nRUN exit 1\n"
        "FROM busybox AS a\nRUN echo a > /a\n"
        "FROM busybox\nCOPY --from=a /a /a\n"
    )
    parsed = parse(text)
    plan = convert(parsed, Options(), {})
    assert "never-pulled" not in plan.missing
    full = _resolve(text)
    runs = [v.op.args for v in _ops(full.target) if isinstance(v.op, ExecOp)]
    assert runs == [("/bin/sh", "-c", "echo a > /a")]


def test_target_selects_a_named_stage_and_unknown_target_errors() -> None:
    text = "FROM busybox AS one\nRUN echo 1\nFROM busybox AS two\nRUN echo 2\n"
    plan = _resolve(text, target="one")
    assert isinstance(plan.target.op, ExecOp)  # type: ignore[union-attr]
    assert plan.target.op.args[-1] == "echo 1"  # type: ignore[union-attr]
    with pytest.raises(DockerfileError, match="nosuch"):
        _resolve(text, target="nosuch")


def test_arg_before_from_build_arg_precedence_and_env_over_arg() -> None:
    text = (
        "ARG TAG=1.0\nFROM busybox:$TAG\nARG TAG\nARG OTHER=default\n"
        "ENV OTHER=fromenv\nRUN echo $TAG $OTHER\n"
    )
    plan = _resolve(text, build_args={"TAG": "2.0", "UNUSED": "x"})
    src = next(v for v in _ops(plan.target) if isinstance(v.op, SourceOp))
    assert isinstance(src.op, SourceOp)
    assert src.op.identifier.startswith("docker-image://busybox:2.0@")
    run = plan.target
    assert run is not None and isinstance(run.op, ExecOp)
    assert "TAG=2.0" in run.op.env
    assert "OTHER=fromenv" in run.op.env  # ENV beats ARG of the same name
    assert any("UNUSED" in w for w in plan.warnings)


def test_image_config_fields_and_history() -> None:
    text = (
        "FROM busybox\nENV A=1 B=$A\nLABEL k=v\nEXPOSE 80 90-91/udp\nWORKDIR app\n"
        'USER 1000:1000\nCMD ["run"]\nSTOPSIGNAL SIGTERM\nRUN true\n'
    )
    plan = _resolve(text)
    c = plan.config["config"]
    assert "A=1" in c["Env"] and "B=1" in c["Env"] and "FROMBASE=1" in c["Env"]
    assert c["Labels"] == {"k": "v"}
    assert set(c["ExposedPorts"]) == {"80/tcp", "90/udp", "91/udp"}
    assert c["WorkingDir"] == "/app"
    assert c["User"] == "1000:1000"
    assert c["Cmd"] == ["run"]
    history = plan.config["history"]
    assert history[0] == {"created_by": "base"}
    layered = [h for h in history[1:] if not h.get("empty_layer")]
    assert [h["created_by"].split()[0] for h in layered] == ["WORKDIR", "RUN"]
    assert plan.base_layers == 1


def test_entrypoint_resets_inherited_cmd_and_shell_form_uses_shell() -> None:
    plan = _resolve('FROM busybox\nCMD ["x"]\nSHELL ["/bin/bash", "-c"]\nENTRYPOINT echo hi\n')
    c = plan.config["config"]
    assert c["Entrypoint"] == ["/bin/bash", "-c", "echo hi"]
    assert "Cmd" not in c


def test_copy_builds_file_op_with_flags_and_workdir_relative_dest() -> None:
    plan = _resolve("FROM busybox\nWORKDIR /w\nCOPY --chown=1:2 --chmod=640 a b sub/\n")
    v = plan.target
    assert v is not None and isinstance(v.op, FileOp)
    copies = [a for a in v.op.actions if isinstance(a, Copy)]
    assert [c.src for c in copies] == ["a", "b"]
    assert all(c.dest == "/w/sub/" and c.chown == "1:2" and c.chmod == 0o640 for c in copies)
    ctx = v.inputs[1]
    assert ctx is not None and isinstance(ctx.op, SourceOp)
    assert ctx.op.identifier == "local://context"
    wd = v.inputs[0]
    assert wd is not None and isinstance(wd.op, FileOp)
    assert isinstance(wd.op.actions[0], Mkdir)


def test_identical_steps_in_two_stages_share_one_vertex() -> None:
    text = "FROM busybox AS a\nRUN echo same\nFROM busybox AS b\nRUN echo same\nFROM a\n"
    plan_a = _resolve(text, target="a")
    plan_b = _resolve(text, target="b")
    assert plan_a.target is not None and plan_b.target is not None
    assert plan_a.target.digest == plan_b.target.digest


@pytest.mark.parametrize(
    ("text", "match"),
    [
        (
            "FROM busybox AS first\nCOPY --from=later /x /y\nFROM busybox AS later\nFROM first\n",
            "after this one",
        ),
        ("FROM busybox AS a\nCOPY --from=a /x /y\n", "circular"),
        ("FROM busybox\nCOPY --bogus=1 a b\n", "unknown flag: --bogus"),
        ("RUN true\nFROM busybox\n", "before the first FROM"),
        ("FROM busybox\nCOPY onlyone\n", "at least two arguments"),
        ("FROM busybox\nEXPOSE 99999\n", "invalid port"),
    ],
)
def test_errors_name_file_line_and_problem(text: str, match: str) -> None:
    with pytest.raises(DockerfileError, match=match) as info:
        _resolve(text)
    assert info.value.line is not None


def test_foreign_platform_is_refused_clearly() -> None:
    with pytest.raises(UnsupportedError, match="not supported on this worker"):
        _resolve("FROM --platform=linux/s390x busybox\nRUN true\n")


def test_stage_from_stage_keeps_parent_steps_as_its_own_layers() -> None:
    text = "FROM busybox AS base\nRUN mkdir /out\nFROM base\nRUN echo > /out/x\n"
    plan = _resolve(text)
    assert plan.base_layers == 1
    steps = [h for h in plan.config["history"][len(plan.base_history) :]]
    assert [h["created_by"].split()[0] for h in steps if not h.get("empty_layer")] == [
        "RUN",
        "RUN",
    ]
