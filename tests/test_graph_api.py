"""``ociworker.graph``: a build written in Python lowers to the same vertices
(digests, hence cache keys) and the same image config as the equivalent
Dockerfile, whose conversion is the expectation (pure: nothing runs)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from ociworker import graph as g
from ociworker.api.v1 import graph_pb2
from ociworker.core.graph import DiffOp, ExecOp, FileOp, MergeOp, Vertex
from ociworker.definition import DefinitionError, decode, encode
from ociworker.errors import UnsupportedError, UserError
from ociworker.frontend.dockerfile.convert import ImageInfo, Options, Plan, convert
from ociworker.frontend.dockerfile.parser import parse

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO.parent / "shared" / "bench"
BASE = "127.0.0.1:5000/busybox:latest"
#: a base image config as a registry serves one (PATH set, one layer, history)
BASE_CONFIG: dict[str, Any] = {
    "architecture": "amd64",
    "os": "linux",
    "config": {"Env": ["PATH=/usr/sbin:/usr/bin:/sbin:/bin", "FROMBASE=1"], "Cmd": ["sh"]},
    "rootfs": {"type": "layers", "diff_ids": ["sha256:" + "a" * 64]},
    "history": [{"created_by": "base layer"}],
}
IMAGES = {BASE: ImageInfo(ref="127.0.0.1:5000/busybox@sha256:" + "b" * 64, config=BASE_CONFIG)}


def _dockerfile(text: str, **opts: Any) -> Plan:
    plan = convert(parse(text), Options(**opts), IMAGES)
    assert not plan.missing
    return plan


def _python(state: g.State) -> Plan:
    plan = g.lower(state, IMAGES)
    assert not plan.missing
    return plan


def _digests(v: Vertex | None) -> list[str]:
    return [x.digest for x in v.walk()] if v is not None else []


def _same(df: Plan, py: Plan) -> None:
    """Same graph (every vertex, in order) and the same image config."""
    assert _digests(py.target) == _digests(df.target)
    assert py.target is not None and df.target is not None
    assert py.target.digest == df.target.digest
    assert py.config == df.config
    assert (py.base_history, py.base_layers) == (df.base_history, df.base_layers)


def _bench(name: str) -> str:
    path = BENCH / name / "Dockerfile"
    if not path.exists():  # the bench cases live beside the repository
        pytest.fail(f"missing bench case {path}")
    return path.read_text()


def _example(name: str) -> ModuleType:
    """A module of examples/graph, loaded from its file (examples are no package)."""
    path = REPO / "examples" / "graph" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"graph_example_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("case", ["steps", "fanout", "cachemount", "layer-export", "context"])
def test_bench_cases_in_python_equal_their_dockerfiles(case: str) -> None:
    """examples/graph/bench.py against ../shared/bench/CASE/Dockerfile."""
    state = _example("bench").CASES[case](BASE)
    _same(_dockerfile(_bench(case)), _python(state))


def test_bench_context_with_dockerignore() -> None:
    state = _example("bench").context(BASE, exclude=("*.tmp",))
    _same(_dockerfile(_bench("context"), ignore_patterns=("*.tmp",)), _python(state))


def test_examples_hello() -> None:
    """examples/graph/hello.py is examples/hello: two stages, an ARG, a CMD."""
    text = (REPO / "examples" / "hello" / "Dockerfile").read_text()
    _same(_dockerfile(text), _python(_example("hello").hello(BASE)))


def test_examples_mounts() -> None:
    """examples/mounts: secret (file and env), ssh (two agents), cache, tmpfs, bind."""
    st = (
        g.image(BASE)
        .run(
            'echo "npmrc: $(test -s /run/secrets/npmrc && echo mounted), '
            'GH_TOKEN: ${GH_TOKEN:+set}"',
            mounts=[g.secret("npmrc", required=True), g.secret("token", env="GH_TOKEN")],
        )
        .run("echo /run/buildkit/ssh_agent.*", mounts=[g.ssh(), g.ssh("deploy")])
        .run(
            'date >>/var/cache/app/builds && echo "builds in the cache: '
            '$(wc -l </var/cache/app/builds)"',
            mounts=[
                g.cache("/var/cache/app"),
                g.tmpfs("/scratch"),
                g.bind(g.local(), "/Dockerfile", source="Dockerfile"),
            ],
        )
    )
    text = (REPO / "examples" / "mounts" / "Dockerfile").read_text()
    _same(_dockerfile(text), _python(st))


def test_config_instructions_and_file_steps() -> None:
    """ENV, WORKDIR (relative, with a step), USER, LABEL, ENTRYPOINT after CMD,
    exec-form RUN with the per-step cwd/user/network, COPY flags."""
    text = (
        f"FROM {BASE}\n"
        "ENV A=1 B=two\n"
        "WORKDIR app\n"
        "USER nobody\n"
        "LABEL org.example=yes\n"
        'CMD ["run"]\n'
        'ENTRYPOINT ["/bin/app"]\n'
        'RUN --network=none ["ls", "-l"]\n'
        "COPY --chown=1:2 --chmod=0755 a b sub/\n"
        "COPY --chmod=u+x --exclude=*.md --parents x/ /opt/\n"
        "WORKDIR /\n"
    )
    st = (
        g.image(BASE)
        .with_env({"A": "1", "B": "two"})
        .with_workdir("app")
        .with_user("nobody")
        .with_label("org.example", "yes")
        .with_cmd(["run"])
        .with_entrypoint(["/bin/app"])
        .run(["ls", "-l"], network="none")
        .copy(g.local(), ["a", "b"], "sub/", chown="1:2", chmod="0755")
        .copy(g.local(), "x/", "/opt/", chmod="u+x", exclude=["*.md"], parents=True)
        .with_workdir("/")
    )
    _same(_dockerfile(text), _python(st))


def test_from_scratch_and_named_context() -> None:
    text = (
        "FROM scratch\n"
        "COPY --from=assets /logo.png /logo.png\n"
        "FROM assets AS copied\n"
        "RUN true\n"
        "FROM scratch\n"
        "COPY --from=copied / /\n"
    )
    from ociworker.core.build import NamedContext

    df = _dockerfile(text, named_contexts={"assets": NamedContext.of("assets", "/tmp/x")})
    copied = g.local("assets").run("true")
    st = g.scratch().copy(copied, "/", "/")
    _same(df, _python(st))


def test_a_state_is_immutable_and_shared() -> None:
    base = g.image(BASE)
    a = base.run("echo a")
    b = base.run("echo b")
    pa, pb = _python(a), _python(b)
    assert pa.target is not None and pb.target is not None
    assert pa.target.inputs[0] == pb.target.inputs[0]  # one base vertex, two users
    assert _python(base).config == _python(g.image(BASE)).config


def test_merge_and_diff_vertices() -> None:
    base = g.image(BASE)
    a = base.run("echo a > /a")
    b = base.run("echo b > /b")
    m = _python(g.merge([a, b]))
    assert m.target is not None and isinstance(m.target.op, MergeOp)
    pa, pb = _python(a), _python(b)
    assert [i.digest if i else None for i in m.target.inputs] == [
        pa.target.digest if pa.target else None,
        pb.target.digest if pb.target else None,
    ]
    # a's chain, then every layer of b's (its base image's and its step's):
    # the image lists b's whole history after a's
    assert m.config["history"] == pa.config["history"] + pb.config["history"]
    assert (m.base_layers, m.base_history) == (pa.base_layers, pa.base_history)
    d = _python(g.diff(base, a))
    assert d.target is not None and isinstance(d.target.op, DiffOp)
    assert d.base_layers == 0 and d.base_history == ()
    assert [h["created_by"] for h in d.config["history"]] == ["DIFF"]
    # a merge's key changes with its order: later inputs win
    assert _python(g.merge([b, a])).target != m.target


def test_local_as_root_is_copied_into_scratch() -> None:
    st = _python(g.local("ctx2").run("ls"))
    assert st.target is not None and isinstance(st.target.op, ExecOp)
    root = st.target.inputs[0]
    assert root is not None and isinstance(root.op, FileOp)
    assert root.inputs[0] is None


def test_missing_images_are_listed() -> None:
    st = g.image("other:1").copy(g.image("third:2"), "/x", "/x")
    assert g.image_refs(st) == ["other:1", "third:2"]
    assert g.lower(st, {}).missing == ("other:1", "third:2")


def test_bad_input_is_refused_with_a_clear_error() -> None:
    base = g.image(BASE)
    with pytest.raises(UserError, match="network"):
        base.run("x", network="bridge")
    with pytest.raises(UserError, match="command"):
        base.run([])
    with pytest.raises(UserError, match="sharing"):
        g.cache("/c", sharing="bad")
    with pytest.raises(UserError, match="chmod"):
        _python(base.copy(g.local(), "a", "/a", chmod="x+9"))
    with pytest.raises(UserError, match="State"):
        base.copy("not a state", "a", "/a")  # type: ignore[arg-type]
    with pytest.raises(UserError, match="scratch"):
        _python(g.diff(base, g.scratch()))
    with pytest.raises(UnsupportedError, match="cross-building"):
        _python(g.image(BASE, platform="linux/s390x"))
    with pytest.raises(UserError, match="credential"):
        _python(g.scratch().copy(g.git("https://user:pw@example.com/r.git"), "/", "/"))


class _Pinned:
    """Resolves as the test's registry would: the fixed IMAGES."""

    async def resolve(self, ref: str) -> ImageInfo:
        return IMAGES[ref]


@pytest.mark.parametrize("fmt", ["pb", "json"])
@pytest.mark.parametrize("case", ["steps", "fanout", "cachemount", "layer-export", "context"])
def test_bench_cases_three_ways_have_the_same_digests(case: str, fmt: str) -> None:
    """The three ways: the Dockerfile, the Python graph, and the Python graph's
    serialized definition read back give the same vertices and image config."""
    state = _example("bench").CASES[case](BASE)
    back = decode(g.definition(state, fmt, resolver=_Pinned()))
    df = _dockerfile(_bench(case))
    assert _digests(back.target) == _digests(df.target)
    assert back.image_config == df.config


@pytest.mark.parametrize("fmt", ["pb", "json"])
def test_merge_and_diff_serialize_and_round_trip(fmt: str) -> None:
    base = g.image(BASE)
    a = base.run("echo a > /a")
    st = g.merge([base, g.diff(base, a), g.scratch()])
    plan = _python(st)
    data = g.definition(st, fmt, resolver=_Pinned())
    back = decode(data)
    assert _digests(back.target) == _digests(plan.target)
    if fmt == "pb":
        msg = graph_pb2.Definition.FromString(data)
        kinds = [v.op.WhichOneof("op") for v in msg.vertices]
        assert kinds.count("merge") == 1 and kinds.count("diff") == 1


def test_a_diff_with_one_input_is_refused_before_anything_runs() -> None:
    lone = Vertex(DiffOp(), (None,))
    with pytest.raises(DefinitionError, match="diff takes 2 inputs"):
        decode(encode(lone, None, "json"))


def test_local_include_and_exclude_select_what_the_worker_reads(tmp_path: Path) -> None:
    """``local(include=, exclude=)`` become the context's ignore rules: only what
    an include names is read, minus what an exclude names."""
    from ociworker.fs import walk
    from ociworker.graph.build import local_dirs

    for rel in ("src/a.py", "src/skip.tmp", "docs/x.md", "top.txt"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(rel)
    st = g.scratch().copy(g.local(include=["src"], exclude=["**/*.tmp"]), ".", "/app/")
    dirs = local_dirs(st, tmp_path, {})
    ctx = dirs["context"]
    source = walk.Source(ctx.root, ctx.ignore, is_context=True)
    seen = sorted(p.removeprefix("./") for p, _ in walk.walk_selected(source, ".", follow=True))
    assert seen == [".", "src", "src/a.py"]
    with pytest.raises(UserError, match="no such context"):
        local_dirs(g.local("other").run("ls"), tmp_path, {})


def test_the_contexts_dockerignore_is_the_dockerfiles_unless_patterns_are_given(
    tmp_path: Path,
) -> None:
    """A ``local()`` of the context with no include / exclude takes the
    .dockerignore the Dockerfile build reads: the same source vertex as the
    converter makes with those patterns, and the same files read. Patterns
    given to ``local()`` are the whole selection."""
    from ociworker.fs import walk
    from ociworker.fs.ignore import parse_ignore
    from ociworker.graph.build import local_dirs

    ignore_text = "# build junk\n**/*.log\nsecret.env\n"
    patterns = parse_ignore(ignore_text)
    for rel in ("app/main.txt", "app/debug.log", "secret.env"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(rel)
    (tmp_path / ".dockerignore").write_text(ignore_text)
    text = f"FROM {BASE}\nCOPY . /app\nRUN ls -R /app\n"
    st = g.image(BASE).copy(g.local(), ".", "/app").run("ls -R /app")
    _same(_dockerfile(text, ignore_patterns=patterns), g.lower(st, IMAGES, context_ignore=patterns))

    def read(state: g.State) -> list[str]:
        ctx = local_dirs(state, tmp_path, {}, patterns)["context"]
        source = walk.Source(ctx.root, ctx.ignore, is_context=True)
        return sorted(p.removeprefix("./") for p, _ in walk.walk_selected(source, ".", follow=True))

    # the files a `docker build` of this context sends (its .dockerignore applied)
    assert read(st) == [".", ".dockerignore", "app", "app/main.txt"]
    explicit = g.image(BASE).copy(g.local(exclude=["app"]), ".", "/app")
    assert read(explicit) == [".", ".dockerignore", "secret.env"]
    lowered = g.lower(explicit, IMAGES, context_ignore=patterns).target
    assert lowered is not None
    ctx_source = next(v for v in lowered.walk() if v.name == "[internal] load build context")
    assert ctx_source.op.to_json()["source"]["attrs"] == {"excludepatterns": '["app"]'}


def test_a_chain_of_thousands_of_steps_lowers_and_digests() -> None:
    """Deep graphs hit no recursion limit (lowering nor digests), and a long
    Python chain still equals its Dockerfile."""
    n = 3000
    text = f"FROM {BASE}\n" + "".join(f"RUN echo {i} >> /log\n" for i in range(n))
    st = g.image(BASE)
    for i in range(n):
        st = st.run(f"echo {i} >> /log")
    py = _python(st)
    df = _dockerfile(text)
    assert py.target is not None and df.target is not None
    assert py.target.digest == df.target.digest
    assert len(py.config["history"]) == 1 + n


def test_with_arg_is_a_dockerfile_arg() -> None:
    """ARG: in later RUNs' environment and history (``|N``), not in the config;
    ENV of the same name after it wins in both."""
    text = (
        f'FROM {BASE}\nARG A=1\nRUN echo $A\nARG B=two\nENV A=3\nRUN ["sh", "-c", "echo $A $B"]\n'
    )
    st = (
        g.image(BASE)
        .with_arg("A", "1")
        .run("echo $A")
        .with_arg("B", "two")
        .with_env("A", "3")
        .run(["sh", "-c", "echo $A $B"])
    )
    df, py = _dockerfile(text), _python(st)
    _same(df, py)
    runs = [h["created_by"] for h in py.config["history"] if h["created_by"].startswith("RUN")]
    assert runs == [
        "RUN |1 A=1 /bin/sh -c echo $A # buildkit",
        "RUN |2 A=3 B=two sh -c echo $A $B # buildkit",
    ]


def test_add_of_a_url_and_of_a_git_repository_are_copies_of_sources() -> None:
    """``ADD URL`` and ``ADD GIT_URL#REF`` as copies from ``http()`` and ``git()``:
    the same vertices (the history says COPY, so only the graph is compared)."""
    pin = "sha256:" + "c" * 64
    text = (
        f"FROM {BASE}\n"
        f"ADD --checksum={pin} https://example.com/dl/tool.tgz /opt/\n"
        "ADD https://example.com/org/repo.git#v1.2 /src/\n"
    )
    st = (
        g.image(BASE)
        .copy(g.http("https://example.com/dl/tool.tgz", checksum=pin), "/tool.tgz", "/opt/")
        .copy(g.git("https://example.com/org/repo.git", "v1.2"), "/", "/src/")
    )
    df, py = _dockerfile(text), _python(st)
    assert _digests(py.target) == _digests(df.target)


def test_a_state_shows_in_one_line_without_credentials() -> None:
    deep = g.image(BASE)
    for i in range(2000):
        deep = deep.run(f"echo {i}")
    assert repr(deep) == "State(run 'echo 1999')"
    shown = repr(g.scratch().copy(g.git("https://user:s3cret@example.com/r.git"), "/", "/"))
    assert "s3cret" not in repr(g.git("https://user:s3cret@example.com/r.git"))
    assert shown == "State(copy)"


@pytest.mark.parametrize(
    "make",
    [
        lambda s: s.mkfile("../../etc/passwd", "x"),
        lambda s: s.mkdir("/a/../../b"),
        lambda s: s.rm(".."),
        lambda s: s.copy(g.local(), "../secret", "/x"),
        lambda s: s.copy(g.local(), "a", "/x/../../y"),
    ],
)
def test_paths_that_climb_out_are_refused_where_written(make: Any) -> None:
    with pytest.raises(UserError, match=r"escapes its root"):
        make(g.scratch())


def test_a_relative_workdir_may_go_up_as_a_dockerfiles() -> None:
    text = f"FROM {BASE}\nWORKDIR /a/b\nWORKDIR ../c\nRUN pwd\n"
    st = g.image(BASE).with_workdir("/a/b").with_workdir("../c").run("pwd")
    _same(_dockerfile(text), _python(st))
