"""Dockerfile -> graph conversion, pure: no images fetched, no containers."""

from __future__ import annotations

import json
from typing import Any

import pytest

from ociworker.core.graph import Copy, ExecOp, FileOp, Mkdir, Mkfile, SourceOp, Vertex
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
        "FROM busybox\nENV A=1\nENV B=$A\nLABEL k=v\nEXPOSE 80 90-91/udp\nWORKDIR app\n"
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
    # BuildKit resets only a CMD set before this stage (see the same-stage test below).
    plan = _resolve(
        'FROM busybox AS b\nCMD ["x"]\nFROM b\nSHELL ["/bin/bash", "-c"]\nENTRYPOINT echo hi\n'
    )
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
            "defined before the current stage",
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


# --- BuildKit semantics, instruction by instruction ---------------------------------


def _exec(plan: Plan) -> ExecOp:
    assert plan.target is not None and isinstance(plan.target.op, ExecOp)
    return plan.target.op


def _created_by(plan: Plan) -> list[str]:
    return [str(h["created_by"]) for h in plan.config["history"][len(plan.base_history) :]]


def test_env_words_expand_with_the_environment_before_the_instruction() -> None:
    plan = _resolve("FROM busybox\nENV A=1 B=x$A\nENV C=$A\n")
    env = plan.config["config"]["Env"]
    assert "B=x" in env and "C=1" in env


def test_entrypoint_keeps_a_cmd_set_in_the_same_stage() -> None:
    plan = _resolve('FROM busybox\nCMD ["x"]\nENTRYPOINT ["e"]\n')
    assert plan.config["config"]["Cmd"] == ["x"]
    assert _created_by(plan) == ['CMD ["x"]', 'ENTRYPOINT ["e"]']


def test_run_heredoc_that_is_the_whole_command_runs_its_body_in_the_shell() -> None:
    plan = _resolve("FROM busybox\nRUN <<EOF\necho a\necho b\nEOF\n")
    assert _exec(plan).args == ("/bin/sh", "-c", "echo a\necho b\n")
    assert plan.target is not None and plan.target.name.endswith("(echo a...)")


def test_run_heredoc_with_dash_strips_leading_tabs() -> None:
    plan = _resolve("FROM busybox\nRUN <<-EOF\n\techo a\n\t\techo b\nEOF\n")
    assert _exec(plan).args == ("/bin/sh", "-c", "echo a\necho b\n")


def test_run_heredoc_fed_to_a_command_is_reconstituted_for_the_shell() -> None:
    text = "FROM busybox\nRUN cat <<EOF > /f && cat <<-'E2' > /g\nhi $X\nEOF\n\tlit\n\tE2\n"
    args = _exec(_resolve(text)).args
    assert args == (
        "/bin/sh",
        "-c",
        "cat <<EOF > /f && cat <<-'E2' > /g\nhi $X\nEOF\n\tlit\nE2",
    )


def test_run_heredoc_with_shebang_runs_a_mounted_script() -> None:
    plan = _resolve(
        'FROM busybox\nSHELL ["/bin/ash", "-c"]\nRUN <<EOF\n#!/bin/busybox sh\necho\nEOF\n'
    )
    op = _exec(plan)
    assert op.args == ("/bin/ash", "-c", "/dev/pipes/EOF")
    (mount,) = op.mounts
    assert (mount.target, mount.type, mount.input, mount.readonly) == (
        "/dev/pipes/",
        "bind",
        1,
        True,
    )
    assert plan.target is not None
    script = plan.target.inputs[1]
    assert script is not None and isinstance(script.op, FileOp)
    assert script.inputs == (None,)
    assert script.op.actions == (Mkfile("/EOF", "#!/bin/busybox sh\necho\n", 0o755),)


def test_run_exec_form_network_security_and_mounts() -> None:
    op = _exec(_resolve('FROM busybox\nRUN --network=none ["echo", "x y"]\n'))
    assert op.args == ("echo", "x y") and op.network == "none"
    op = _exec(_resolve("FROM busybox\nRUN --mount=type=tmpfs,target=/t --security=sandbox true\n"))
    assert [m.type for m in op.mounts] == ["tmpfs"] and op.security == "sandbox"
    # the entitlement is checked when the step is solved (ops.exec), not here
    assert _exec(_resolve("FROM busybox\nRUN --security=insecure true\n")).security == "insecure"
    with pytest.raises(DockerfileError, match="--network=bridge"):
        _resolve("FROM busybox\nRUN --network=bridge true\n")


def test_run_history_lists_build_args_and_args_reach_the_env() -> None:
    plan = _resolve("FROM busybox\nARG V=1\nRUN echo $V\n", build_args={"V": "2"})
    assert "V=2" in _exec(plan).env
    assert _created_by(plan) == ["ARG V=2", "RUN |1 V=2 /bin/sh -c echo $V # buildkit"]


def test_arg_after_env_of_the_same_name_wins_for_run_but_not_in_the_image() -> None:
    plan = _resolve("FROM busybox\nENV X=env\nARG X=arg\nRUN true\n")
    assert "X=arg" in _exec(plan).env
    assert "X=env" in plan.config["config"]["Env"]


def test_global_and_platform_args_are_visible_in_a_stage_only_after_arg() -> None:
    text = (
        "ARG BASE=busybox\nARG V=g\nFROM $BASE\nRUN echo 1\nARG V\nARG TARGETARCH\n"
        "ARG BUILDPLATFORM\nRUN echo 2\n"
    )
    plan = _resolve(text)
    first = plan.target.inputs[0]  # type: ignore[union-attr]
    assert first is not None and isinstance(first.op, ExecOp)
    assert not any(e.startswith(("V=", "TARGETARCH=")) for e in first.op.env)
    env = _exec(plan).env
    assert "V=g" in env and "TARGETARCH=amd64" in env and "BUILDPLATFORM=linux/amd64" in env


def test_platform_args_in_from_and_unused_build_arg_warning() -> None:
    plan = _resolve("FROM busybox:$TARGETARCH\n", build_args={"NOPE": "1"})
    src = plan.target
    assert src is not None and isinstance(src.op, SourceOp)
    assert src.op.identifier.startswith("docker-image://busybox:amd64@")
    assert any("NOPE" in w and "not consumed" in w for w in plan.warnings)


def test_each_stage_redeclares_args_and_build_arg_beats_default() -> None:
    text = "ARG V=global\nFROM busybox AS a\nARG V=a\nRUN echo\nFROM busybox\nARG V\nRUN echo b\n"
    assert "V=global" in _exec(_resolve(text)).env
    assert "V=a" in _exec(_resolve(text, target="a")).env
    assert "V=cli" in _exec(_resolve(text, target="a", build_args={"V": "cli"})).env


def test_copy_flags_map_to_copy_fields() -> None:
    text = (
        "FROM busybox\nCOPY --link --parents --exclude=*.tmp --exclude=x/ a/./b c/ /d/\n"
        "ADD --chmod=0755 arch.tar /e\n"
    )
    plan = _resolve(text)
    assert plan.target is not None and isinstance(plan.target.op, FileOp)
    (add,) = plan.target.op.actions
    assert isinstance(add, Copy) and add.unpack_archive and add.chmod == 0o755
    prev = plan.target.inputs[0]
    assert prev is not None and isinstance(prev.op, FileOp)
    copies = [a for a in prev.op.actions if isinstance(a, Copy)]
    assert all(c.parents and c.exclude == ("*.tmp", "x/") for c in copies)
    assert not any(c.unpack_archive for c in copies)
    assert _created_by(plan) == [
        "COPY --parents a/./b c/ /d/ # buildkit",
        "ADD --chmod=0755 arch.tar /e # buildkit",
    ]


def test_add_from_another_stage_is_not_a_flag_and_copy_from_is_not_unpacked() -> None:
    with pytest.raises(DockerfileError, match="unknown flag: --from"):
        _resolve("FROM busybox AS a\nFROM busybox\nADD --from=a x y\n")
    plan = _resolve("FROM busybox AS a\nRUN true\nFROM busybox\nCOPY --from=a x.tar y\n")
    assert plan.target is not None and isinstance(plan.target.op, FileOp)
    (c,) = plan.target.op.actions
    assert isinstance(c, Copy) and not c.unpack_archive


def test_copy_heredoc_sources_become_files_expanded_unless_quoted() -> None:
    text = "FROM busybox\nENV N=v\nCOPY <<A <<'B' /dst/\nn=$N\nA\nn=$N\nB\nCOPY <<-C /one\n\tx\nC\n"
    plan = _resolve(text)
    assert plan.target is not None and isinstance(plan.target.op, FileOp)

    def documents(v: Vertex) -> list[tuple[str, str, str]]:
        # As BuildKit: each document is a file made on its own, then copied to dest
        out = []
        for a in v.op.actions:  # type: ignore[attr-defined]
            assert isinstance(a, Copy) and not a.allow_wildcard
            doc = v.inputs[a.src_input]
            assert doc is not None and isinstance(doc.op, FileOp) and doc.inputs == (None,)
            (mk,) = doc.op.actions
            assert (
                isinstance(mk, Mkfile) and mk.mode == 0o644 and "/" + mk.path.lstrip("/") == a.src
            )
            out.append((a.src, mk.data, a.dest))
        return out

    assert documents(plan.target) == [("/C", "x\n", "/one")]
    assert len(plan.target.inputs) == 2  # no build context: nothing is copied from it
    prev = plan.target.inputs[0]
    assert prev is not None and isinstance(prev.op, FileOp)
    assert documents(prev) == [("/A", "n=v\n", "/dst/"), ("/B", "n=$N\n", "/dst/")]
    assert _created_by(plan)[-2] == "COPY <<A <<B /dst/ # buildkit"


def test_volume_healthcheck_stopsignal_shell_expose_label_maintainer() -> None:
    text = (
        'FROM busybox\nVOLUME /a /b\nVOLUME ["/c"]\nEXPOSE 80/TCP 53/udp 1-2\nLABEL "a b"="c d"\n'
        "HEALTHCHECK --interval=5s --timeout=1m30s --start-period=1s --retries=3 CMD wget -q x\n"
        'STOPSIGNAL SIGKILL\nSHELL ["/bin/ash", "-eo", "pipefail", "-c"]\nMAINTAINER me <m@e>\n'
        "RUN echo\n"
    )
    plan = _resolve(text)
    c = plan.config["config"]
    assert c["Volumes"] == {"/a": {}, "/b": {}, "/c": {}}
    assert set(c["ExposedPorts"]) == {"80/tcp", "53/udp", "1/tcp", "2/tcp"}
    assert c["Labels"] == {"a b": "c d"}
    assert c["Healthcheck"] == {
        "Test": ["CMD-SHELL", "wget -q x"],
        "Interval": 5 * 10**9,
        "Timeout": 90 * 10**9,
        "StartPeriod": 10**9,
        "Retries": 3,
    }
    assert c["StopSignal"] == "SIGKILL"
    assert c["Shell"] == ["/bin/ash", "-eo", "pipefail", "-c"]
    assert c["_maintainer"] == "me <m@e>"
    assert _exec(plan).args == ("/bin/ash", "-eo", "pipefail", "-c", "echo")
    assert "VOLUME [/a /b]" in _created_by(plan)
    assert _resolve("FROM busybox\nHEALTHCHECK NONE\n").config["config"]["Healthcheck"] == {
        "Test": ["NONE"]
    }


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("FROM busybox\nSTOPSIGNAL SIGNOPE\n", "invalid signal"),
        ("FROM busybox\nHEALTHCHECK --interval=1us CMD true\n", "less than 1ms"),
        ("FROM busybox\nHEALTHCHECK --retries=x CMD true\n", "--retries"),
        ("FROM busybox\nHEALTHCHECK --retries=1 NONE\n", "takes no arguments"),
        ("FROM busybox\nSHELL /bin/sh -c\n", "JSON form"),
        ("FROM busybox\nCOPY --chmod=99 a b\n", "invalid chmod"),
        ("FROM busybox\nADD --checksum=sha256:00 a b\n", "checksum requires"),
        ("FROM busybox\nCOPY --from=$X a b\n", "variable expansion is not supported"),
        ("FROM busybox\nCOPY --from=7 a b\n", "invalid stage index 7"),
        ("FROM busybox\nCOPY --chown=1 --chown=2 a b\n", "duplicate flag"),
        ("FROM busybox\nRUN --mount=type=tmpfs,target=/t,bogus=1 true\n", "bogus"),
        ("FROM busybox\nCOPY http://x/y /z\n", "use ADD"),
        ("FROM busybox\nEXPOSE 80/xdp\n", "invalid proto"),
    ],
)
def test_bad_flags_and_values_are_located_errors(text: str, match: str) -> None:
    with pytest.raises(DockerfileError, match=match) as info:
        _resolve(text)
    assert info.value.line == 2 and info.value.source_line


def test_onbuild_is_stored_without_history_and_triggers_of_a_base_run_after_from() -> None:
    plan = _resolve("FROM busybox\nONBUILD RUN echo hi\nONBUILD COPY a /b\n")
    assert plan.config["config"]["OnBuild"] == ["RUN echo hi", "COPY a /b"]
    assert _created_by(plan) == []

    base = dict(BASE_CONFIG, config={"Env": ["PATH=/bin"], "OnBuild": ["RUN echo trig"]})
    parsed = parse("FROM onb\nRUN echo mine\n")
    images = {"onb": ImageInfo("onb@sha256:" + "c" * 64, base)}
    child = convert(parsed, Options(), images)
    assert "OnBuild" not in child.config["config"]  # triggers are not inherited
    run = child.target
    assert run is not None and isinstance(run.op, ExecOp)
    assert run.op.args[-1] == "echo mine"
    trig = run.inputs[0]
    assert trig is not None and isinstance(trig.op, ExecOp)
    assert trig.op.args[-1] == "echo trig" and "ONBUILD RUN echo trig" in trig.name
    assert [h["created_by"] for h in child.config["history"][1:]] == [
        "RUN /bin/sh -c echo trig # buildkit",
        "RUN /bin/sh -c echo mine # buildkit",
    ]


def test_onbuild_of_a_stage_runs_in_a_stage_built_from_it() -> None:
    plan = _resolve("FROM busybox AS t\nONBUILD RUN echo t\nFROM t\n")
    assert _exec(plan).args[-1] == "echo t"
    assert "OnBuild" not in plan.config["config"]


def test_bad_onbuild_trigger_of_a_base_image_names_the_from_line() -> None:
    base = dict(BASE_CONFIG, config={"OnBuild": ["FROM x"]})
    with pytest.raises(DockerfileError, match="ONBUILD trigger") as info:
        convert(parse("ARG A\nFROM onb\n"), Options(), {"onb": ImageInfo("onb@x", base)})
    assert info.value.line == 2


def test_unknown_from_name_carries_a_stage_hint_for_the_resolver() -> None:
    plan = convert(
        parse("FROM busybox AS builder\nFROM busybox\nCOPY --from=buidler a b\n"), Options(), {}
    )
    hints = dict(plan.from_errors)
    assert "buidler" in plan.missing
    assert "no stage or image named 'buidler'" in str(hints["buidler"])
    assert "builder" in str(hints["buidler"]) and hints["buidler"].line == 3


def test_syntax_directive_warns_for_foreign_frontends_and_escape_is_honoured() -> None:
    plan = _resolve("# syntax=docker/dockerfile:1.7\nFROM busybox\n")
    assert not any("syntax" in w for w in plan.warnings)
    plan = _resolve("# syntax=example.com/other:1\nFROM busybox\n")
    assert any("example.com/other" in w for w in plan.warnings)
    plan = _resolve("# escape=`\nFROM busybox\nENV A=x B=`$A\nRUN echo `\n  hi\n")
    assert "B=$A" in plan.config["config"]["Env"]


def test_workdir_root_adds_no_step_and_relative_chains_join() -> None:
    plan = _resolve("FROM busybox\nWORKDIR /\nWORKDIR a\nWORKDIR ../b/c\n")
    assert plan.config["config"]["WorkingDir"] == "/b/c"
    assert _created_by(plan) == ["WORKDIR /", "WORKDIR /a", "WORKDIR /b/c"]
    mk = [v.op for v in _ops(plan.target) if isinstance(v.op, FileOp)]
    assert [a.path for op in mk for a in op.actions if isinstance(a, Mkdir)] == ["/a", "/b/c"]


def test_missing_target_lists_the_stages() -> None:
    with pytest.raises(DockerfileError, match=r"'nope' could not be found \(stages: a, b\)"):
        _resolve("FROM busybox AS a\nFROM busybox AS b\n", target="nope")


def test_null_maps_of_a_base_image_config_are_replaced_not_updated() -> None:
    base = dict(BASE_CONFIG, config={"Labels": None, "ExposedPorts": None, "Volumes": None})
    parsed = parse("FROM nullish\nLABEL a=b\nEXPOSE 1\nVOLUME /v\n")
    plan = convert(parsed, Options(), {"nullish": ImageInfo("nullish@x", base)})
    c = plan.config["config"]
    assert (c["Labels"], c["ExposedPorts"], c["Volumes"]) == ({"a": "b"}, {"1/tcp": {}}, {"/v": {}})


def test_run_mounts_of_every_type_and_their_defaults() -> None:
    plan = _resolve(
        "FROM busybox AS b\nFROM busybox\nWORKDIR /w\n"
        "RUN --mount=target=rel,source=../../x --mount=type=bind,from=b,dst=/s,rw"
        " --mount=type=cache,target=/c,from=b,source=/pkg,ro"
        " --mount=type=tmpfs,target=/t,size=10m"
        " --mount=type=secret,id=tok --mount=type=secret,target=/k/key.pem,mode=0440"
        " --mount=type=secret,id=e,env=TOKEN"
        " --mount=type=ssh --mount=type=ssh,id=gh,required true\n"
    )
    assert plan.target is not None
    op = _exec(plan)
    ctx, stage, cache, tmpfs, tok, pem, env, ssh0, ssh1 = op.mounts
    assert (ctx.target, ctx.type, ctx.selector, ctx.readonly) == ("/w/rel", "bind", "/x", True)
    ctx_input = plan.target.inputs[ctx.input]
    assert ctx_input is not None and isinstance(ctx_input.op, SourceOp)
    assert ctx_input.op.identifier == "local://context"
    assert (stage.readonly, stage.input) == (False, 2)
    assert (cache.input, cache.selector, cache.readonly) == (3, "/pkg", True)
    assert dict(cache.options) == {"id": "/c", "sharing": "shared"}
    assert dict(tmpfs.options) == {"size": "10m"}
    assert (tok.target, dict(tok.options)) == (
        "/run/secrets/tok",
        {"id": "tok", "mode": "0400", "required": "false"},
    )
    assert dict(pem.options)["id"] == "key.pem" and dict(pem.options)["mode"] == "0440"
    assert env.target == "" and dict(env.options)["env"] == "TOKEN"  # env only
    assert (ssh0.target, dict(ssh0.options)["id"]) == ("/run/buildkit/ssh_agent.0", "default")
    assert (ssh1.target, dict(ssh1.options)["required"]) == ("/run/buildkit/ssh_agent.1", "true")
    # the definitions are in the vertex (so in the cache key); no value ever is
    assert "TOKEN" in json.dumps(op.to_json())


@pytest.mark.parametrize(
    ("mount", "match"),
    [
        ("type=nope,target=/x", "unknown mount type"),
        ("type=cache,target=/x,sharing=sometimes", "invalid sharing"),
        ("type=secret", "id or target is required"),
        ("type=bind,source=/x", "target is required"),
        ("type=cache,target=/x,mode=999", "invalid mode"),
        ("type=secret,id=x,uid=root", "invalid uid"),
        ("type=tmpfs,target=/t,size=big", "invalid size"),
        ("type=ssh,size=1", "unknown option"),
    ],
)
def test_bad_run_mounts_are_located_errors(mount: str, match: str) -> None:
    with pytest.raises(DockerfileError, match=match):
        _resolve(f"FROM busybox\nRUN --mount={mount} true\n")
