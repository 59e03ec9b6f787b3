"""``ociworker.graph`` end to end, on real runc, overlayfs and the local registry:
a Python graph and the equivalent Dockerfile share every cache record and make
the same image, and merge/diff have BuildKit's semantics on real snapshots."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from conftest import oci_archive_image, plain_steps
from ociworker import graph as g

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples" / "graph"


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO / "src") + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _run(args: list[str], timeout: float = 600) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=timeout, env=_env()
    )
    assert proc.returncode == 0, f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}"
    return proc


def _dockerfile_build(root: Path, out: Path) -> subprocess.CompletedProcess[str]:
    return _run(
        [
            "-m",
            "ociworker",
            "build",
            "--root",
            str(root),
            "--progress=plain",
            "-o",
            f"type=oci,dest={out}",
            str(REPO / "examples" / "hello"),
        ]
    )


def _python_build(root: Path, out: Path) -> subprocess.CompletedProcess[str]:
    return _run([str(EXAMPLES / "hello.py"), "--root", str(root), "-o", f"type=oci,dest={out}"])


def _graph_v1_build(root: Path, out: Path) -> subprocess.CompletedProcess[str]:
    """``hello.py --definition pb | ociworker build --frontend graph.v1 -``, run
    in examples/hello (the definition's context is the current dir)."""
    script = (
        f"{sys.executable} {EXAMPLES / 'hello.py'} --definition pb | "
        f"{sys.executable} -m ociworker build --root {root} --progress=plain "
        f"--frontend graph.v1 -o type=oci,dest={out} -"
    )
    proc = subprocess.run(
        ["bash", "-e", "-o", "pipefail", "-c", script],
        capture_output=True,
        text=True,
        timeout=600,
        env=_env(),
        cwd=REPO / "examples" / "hello",
    )
    assert proc.returncode == 0, f"graph.v1 build failed ({proc.returncode}):\n{proc.stderr}"
    return proc


BUILDS = {"dockerfile": _dockerfile_build, "python": _python_build, "graph.v1": _graph_v1_build}


def _work_steps(stderr: str) -> list[tuple[str, tuple[str, ...]]]:
    """The steps that do work (RUN, COPY; not the exporters or the context load)."""
    return [
        (s.name, s.states) for s in plain_steps(stderr) if "RUN " in s.name or "COPY " in s.name
    ]


@pytest.mark.parametrize("first", list(BUILDS))
def test_hello_three_ways_share_one_cache_and_image(
    first: str, require_root: None, base_image: str, state_dir: Path, tmp_path: Path
) -> None:
    """examples/hello as its Dockerfile, as hello.py, and as hello.py's graph.v1
    definition: whichever is built first, the other two on the same root run
    nothing (each of the 4 steps CACHED) and write the image the first made."""
    one = BUILDS[first](state_dir, tmp_path / "first.tar")
    ran = _work_steps(one.stderr)
    # the Dockerfile's two RUNs and two COPYs ran the first time
    assert len(ran) == 4 and all(states == ("DONE",) for _, states in ran), one.stderr
    want = oci_archive_image(tmp_path / "first.tar")
    for other in (b for b in BUILDS if b != first):
        out = tmp_path / f"{other}.tar"
        again = BUILDS[other](state_dir, out)
        cached = _work_steps(again.stderr)
        assert len(cached) == 4, again.stderr
        assert all(states == ("CACHED",) for _, states in cached), (other, again.stderr)
        assert oci_archive_image(out) == want, other


def test_matrix_merges_each_bases_report(
    require_root: None, base_image: str, state_dir: Path, tmp_path: Path
) -> None:
    """examples/graph/matrix.py: one base image plus the three runs' reports."""
    out = tmp_path / "out"
    _run([str(EXAMPLES / "matrix.py"), "--root", str(state_dir), "-o", f"type=local,dest={out}"])
    results = out / "results"
    assert sorted(p.name for p in results.iterdir()) == [
        "hardened.txt",
        "plain.txt",
        "tools.txt",
    ]
    # what report.sh prints on each base, as matrix.py makes the bases
    assert (results / "plain.txt").read_text().splitlines() == [
        "base: plain",
        "flavor: plain",
        "user: root",
        "tools: ",
    ]
    assert (results / "tools.txt").read_text().splitlines()[3].split() == ["tools:", "jq", "yq"]
    hardened = (results / "hardened.txt").read_text().splitlines()
    assert hardened[:3] == ["base: hardened", "flavor: hardened", "user: app"]
    # the diffs took only the reports: nothing of the app or of the variants' bases
    assert not (out / "app").exists()
    assert not (out / "opt" / "tools").exists()
    assert not (out / "etc" / "flavor").exists()
    assert (out / "bin" / "busybox").exists()  # the base the results were merged onto

    # built again: every step, merge and diffs included, is found in the cache
    again = _run(
        [str(EXAMPLES / "matrix.py"), "--root", str(state_dir), "-o", f"type=local,dest={out}2"]
    )
    steps = [
        s
        for s in plain_steps(again.stderr)
        if s.name.split(" ")[0] in ("RUN", "COPY", "MKFILE", "MKDIR", "merge", "diff")
    ]
    # per base a COPY, a RUN and a diff; the variants' 1 + 3 steps; the merge
    assert len(steps) == 3 * 3 + 4 + 1, again.stderr
    assert all(s.states == ("CACHED",) for s in steps), again.stderr
    assert sorted(p.name for p in (out.parent / "out2" / "results").iterdir()) == sorted(
        p.name for p in results.iterdir()
    )


def test_diff_takes_changes_and_merge_applies_deletions(
    require_root: None, base_image: str, state_dir: Path, tmp_path: Path
) -> None:
    """BuildKit's semantics: a diff mounted alone holds what upper added or
    changed; merged over another state it also deletes what upper removed."""
    lower = g.scratch().mkfile("/doomed", "x").mkfile("/kept", "k").mkfile("/changed", "old")
    upper = lower.rm("/doomed").mkfile("/new", "n").mkfile("/changed", "new")
    changes = g.diff(lower, upper)
    target = (
        g.scratch().mkfile("/doomed", "theirs").mkfile("/elsewhere", "e").mkfile("/changed", "x")
    )
    merged = g.merge([target, changes])

    alone = tmp_path / "alone"
    g.build(changes, root=state_dir, outputs=[f"type=local,dest={alone}"], context=tmp_path)
    assert sorted(p.name for p in alone.iterdir()) == ["changed", "new"]
    assert (alone / "changed").read_text() == "new"

    # as an image (whatever the compression asked), its one layer deletes too
    archive = tmp_path / "changes.tar"
    g.build(
        changes,
        root=state_dir,
        outputs=[f"type=oci,dest={archive},compression=zstd"],
        context=tmp_path,
    )
    (layer,) = _layers(archive)
    assert sorted(_layer_entries(archive, layer)) == [".wh.doomed", "changed", "new"]

    out = tmp_path / "merged"
    g.build(merged, root=state_dir, outputs=[f"type=local,dest={out}"], context=tmp_path)
    assert sorted(p.name for p in out.iterdir()) == ["changed", "elsewhere", "new"]
    assert (out / "changed").read_text() == "new"
    assert (out / "new").read_text() == "n"


def _layers(archive: Path) -> list[str]:
    """The layer digests of the image in an OCI archive, as its manifest lists them."""
    import json
    import tarfile

    with tarfile.open(archive) as tf:
        index = json.load(tf.extractfile("index.json"))  # type: ignore[arg-type]
        digest = index["manifests"][0]["digest"].split(":")[1]
        manifest = json.load(tf.extractfile(f"blobs/sha256/{digest}"))  # type: ignore[arg-type]
    return [str(layer["digest"]) for layer in manifest["layers"]]


def _layer_entries(archive: Path, digest: str) -> list[str]:
    """The file names in layer ``digest`` of an OCI archive (gzip or zstd)."""
    import io
    import tarfile

    import zstandard

    with tarfile.open(archive) as tf:
        f = tf.extractfile(f"blobs/sha256/{digest.split(':')[1]}")
        assert f is not None
        blob = f.read()
    if blob[:4] == b"\x28\xb5\x2f\xfd":  # zstd's magic
        blob = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(blob)).read()
    with tarfile.open(fileobj=io.BytesIO(blob)) as layer:
        return [m.name.removeprefix("./") for m in layer.getmembers()]


def test_merge_applies_later_states_over_earlier_ones(
    require_root: None, base_image: str, state_dir: Path, tmp_path: Path
) -> None:
    """Later states win, their deletions included; and the merged image is made
    of the inputs' own layer blobs, a's then b's (base included), as BuildKit's."""
    base = g.image(base_image)
    a = base.run("echo a > /f && echo a > /only-a")
    b = base.run("echo b > /f && rm /bin/true")
    out = tmp_path / "out"
    merged = g.merge([a, b])
    built = {}
    for name, st in (("a", a), ("b", b), ("merged", merged)):
        built[name] = tmp_path / f"{name}.tar"
        g.build(st, root=state_dir, outputs=[f"type=oci,dest={built[name]}"], context=tmp_path)
    g.build(merged, root=state_dir, outputs=[f"type=local,dest={out}"], context=tmp_path)
    assert (out / "f").read_text() == "b\n"  # the later state wins
    assert (out / "only-a").read_text() == "a\n"
    # b's deletion, applied (links to /bin/busybox: lexists, not the host's file)
    assert not os.path.lexists(out / "bin" / "true")
    assert os.path.lexists(out / "bin" / "false")
    assert _layers(built["merged"]) == _layers(built["a"]) + _layers(built["b"])


def test_secret_reaches_its_step_and_nothing_else(
    require_root: None, base_image: str, state_dir: Path, tmp_path: Path
) -> None:
    """``secret()`` with ``build(secrets=[--secret values])``: the step reads the
    value; the exported filesystem holds no trace of it."""
    value = "hunter2-" + os.urandom(4).hex()
    src = tmp_path / "token"
    src.write_text(value)
    st = g.image(base_image).run(
        f'test "$(cat /run/secrets/tok)" = {value} && echo ok > /checked',
        mounts=[g.secret("tok", required=True)],
    )
    out = tmp_path / "out"
    g.build(
        st,
        root=state_dir,
        context=tmp_path,
        secrets=[f"id=tok,src={src}"],
        outputs=[f"type=local,dest={out}"],
    )
    assert (out / "checked").read_text() == "ok\n"
    for path in out.rglob("*"):
        if path.is_file() and not path.is_symlink():
            assert value.encode() not in path.read_bytes(), path


SHARED_BENCH = REPO.parent / "shared" / "bench"


@pytest.mark.parametrize("case", ["steps", "fanout", "cachemount", "context"])
def test_bench_case_in_python_is_all_cached_after_its_dockerfile(
    case: str, require_root: None, base_image: str, state_dir: Path, tmp_path: Path
) -> None:
    """The bench case's Dockerfile, then examples/graph/bench.py's graph of it on
    the same root: every RUN and COPY CACHED, the same image. (layer-export's
    graph is compared vertex for vertex in the unit tests: 128 MiB is no test.)"""
    dockerfile = SHARED_BENCH / case / "Dockerfile"
    if not dockerfile.exists():
        pytest.fail(f"missing bench case {dockerfile}")
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    if case == "context":
        for i in range(40):
            d = ctx / f"d{i % 5}"
            d.mkdir(exist_ok=True)
            (d / f"f{i}.txt").write_text(f"file {i}\n" * 100)
    # the steps BuildKit would list for it: its RUN and COPY instructions
    want = sum(
        1 for line in dockerfile.read_text().splitlines() if line.startswith(("RUN", "COPY"))
    )
    first = _run(
        [
            "-m",
            "ociworker",
            "build",
            "--root",
            str(state_dir),
            "--progress=plain",
            "-f",
            str(dockerfile),
            "-o",
            f"type=oci,dest={tmp_path / 'df.tar'}",
            str(ctx),
        ]
    )
    assert len(_work_steps(first.stderr)) == want, first.stderr
    again = _run(
        [
            str(EXAMPLES / "bench.py"),
            case,
            "--context",
            str(ctx),
            "--root",
            str(state_dir),
            "-o",
            f"type=oci,dest={tmp_path / 'py.tar'}",
        ]
    )
    steps = _work_steps(again.stderr)
    assert len(steps) == want, again.stderr
    assert all(states == ("CACHED",) for _, states in steps), again.stderr
    assert oci_archive_image(tmp_path / "py.tar") == oci_archive_image(tmp_path / "df.tar")


def test_build_on_a_daemon_shares_its_cache_with_the_dockerfile(
    require_root: None, base_image: str, tmp_path: Path
) -> None:
    """``build(addr=)``: the graph goes to the daemon as a graph.v1 definition; a
    Dockerfile build there first leaves nothing for it to run, and the image is
    the same."""
    import io
    import signal

    from ociworker.progress_ui import PlainPrinter
    from ociworker.testing.daemon import spawn_daemon

    sock = tmp_path / "d.sock"
    addr = f"unix://{sock}"
    daemon = spawn_daemon(
        ("--addr", addr, "--root", str(tmp_path / "droot")), tmp_path / "daemon.log"
    )
    try:
        _run(
            [
                "-m",
                "ociworker",
                "build",
                "--addr",
                addr,
                "-o",
                f"type=oci,dest={tmp_path / 'df.tar'}",
                str(REPO / "examples" / "hello"),
            ]
        )
        shown = io.StringIO()
        hello = _example_module("hello").hello(base_image)
        g.build(
            hello,
            addr=addr,
            context=REPO / "examples" / "hello",
            outputs=[f"type=oci,dest={tmp_path / 'py.tar'}"],
            events=PlainPrinter(shown),
        )
    finally:
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=60) == 0
    steps = _work_steps(shown.getvalue())
    assert len(steps) == 4, shown.getvalue()
    assert all(states == ("CACHED",) for _, states in steps), shown.getvalue()
    assert oci_archive_image(tmp_path / "py.tar") == oci_archive_image(tmp_path / "df.tar")


@pytest.mark.parametrize("where", ["embedded", "daemon"])
def test_python_build_of_a_context_reads_its_dockerignore_as_the_dockerfile_does(
    where: str, require_root: None, base_image: str, state_dir: Path, tmp_path: Path
) -> None:
    """A context with a .dockerignore: its Dockerfile build, then the same
    steps in Python on the same root (or daemon) run nothing (the same files
    selected, the same source vertex), and neither copies what the file names."""
    import io
    import signal

    from ociworker.progress_ui import PlainPrinter
    from ociworker.testing.daemon import spawn_daemon

    addr = f"unix://{tmp_path / 'd.sock'}"
    daemon = None
    if where == "daemon":
        daemon = spawn_daemon(("--addr", addr, "--root", str(state_dir)), tmp_path / "daemon.log")
    on = ["--addr", addr] if daemon else ["--root", str(state_dir)]

    ctx = tmp_path / "ctx"
    for rel in ("app/main.txt", "app/debug.log", "secret.env"):
        (ctx / rel).parent.mkdir(parents=True, exist_ok=True)
        (ctx / rel).write_text(f"{rel}\n")
    (ctx / ".dockerignore").write_text("**/*.log\nsecret.env\n")
    dockerfile = tmp_path / "Dockerfile"  # outside the context: COPY . sees only ctx
    listing = "find /app -type f | sort > /listing"
    dockerfile.write_text(f"FROM {base_image}\nCOPY . /app\nRUN {listing}\n")
    df_out, py_out = tmp_path / "df", tmp_path / "py"
    shown = io.StringIO()
    try:
        first = _run(
            ["-m", "ociworker", "build", *on, "--progress=plain",
             "-f", str(dockerfile), "-o", f"type=local,dest={df_out}", str(ctx)]
        )  # fmt: skip
        ran = _work_steps(first.stderr)
        assert len(ran) == 2 and all(states == ("DONE",) for _, states in ran), first.stderr
        g.build(
            g.image(base_image).copy(g.local(), ".", "/app").run(listing),
            root=None if daemon else state_dir,
            addr=addr if daemon else None,
            context=ctx,
            outputs=[f"type=local,dest={py_out}"],
            events=PlainPrinter(shown),
        )
    finally:
        if daemon is not None:
            daemon.send_signal(signal.SIGTERM)
            assert daemon.wait(timeout=60) == 0
    steps = _work_steps(shown.getvalue())
    assert len(steps) == 2, shown.getvalue()
    assert all(states == ("CACHED",) for _, states in steps), shown.getvalue()
    # what docker build sends of this context: everything but what .dockerignore names
    want = ["/app/.dockerignore", "/app/app/main.txt"]
    for out in (df_out, py_out):
        assert (out / "listing").read_text().split() == want
        assert not (out / "app" / "secret.env").exists()
        assert not (out / "app" / "app" / "debug.log").exists()


def _example_module(name: str) -> Any:
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"graph_example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_layers_output_of_a_merged_graph_writes_the_steps_above_the_merge(
    require_root: None, base_image: str, state_dir: Path, tmp_path: Path
) -> None:
    """``type=layers`` treats a merge as a base: the step on top of it is written
    (index 001, the image's top layer), the merged inputs' blobs are not."""
    import json

    base = g.image(base_image)
    st = g.merge([base.run("echo a > /a"), base.run("echo b > /b")]).run("echo top > /top")
    g.build(
        st,
        root=state_dir,
        context=tmp_path,
        outputs=[f"type=layers,dest={tmp_path / 'lay'}", f"type=oci,dest={tmp_path / 'i.tar'}"],
    )
    written = sorted(p.name for p in (tmp_path / "lay").glob("*.json"))
    assert len(written) == 1 and written[0].startswith("001-"), written
    desc = json.loads((tmp_path / "lay" / written[0]).read_text())
    assert desc["digest"] == _layers(tmp_path / "i.tar")[-1]
