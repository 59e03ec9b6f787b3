"""Frontends end to end: a serialized graph (graph.v1) built from stdin and from
a file, embedded and over a daemon that refuses hostile definitions and stays
healthy; and a third-party frontend installed with pip into a venv made here,
picked by ``--frontend`` and by ``# syntax=`` (embedded, and by a daemon whose
Python has it while the client's does not). Real runc, overlayfs, registry."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import subprocess
import sys
import sysconfig
import tarfile
import textwrap
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

import ociworker
from conftest import oci_archive_image
from ociworker.core.graph import Copy, ExecOp, FileOp, Mkdir, Mkfile, SourceOp, Vertex
from ociworker.definition import encode
from ociworker.testing.daemon import spawn_daemon

SRC = Path(ociworker.__file__).resolve().parents[1]
ENV_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
ACCEPT = (
    "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, "
    "application/vnd.docker.distribution.manifest.list.v2+json, "
    "application/vnd.docker.distribution.manifest.v2+json"
)


def _registry_get(url: str) -> tuple[bytes, str]:
    req = urllib.request.Request(url, headers={"Accept": ACCEPT})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return resp.read(), str(resp.headers["Docker-Content-Digest"])


@pytest.fixture(scope="module")
def pinned_base(registry: str) -> str:
    """busybox pinned by the digest the registry itself answers."""
    _, digest = _registry_get(f"http://{registry}/v2/busybox/manifests/latest")
    return f"{registry}/busybox:latest@{digest}"


def _base_layer_count(registry: str) -> int:
    body, _ = _registry_get(f"http://{registry}/v2/busybox/manifests/latest")
    doc = json.loads(body)
    if "manifests" in doc:  # an index: the amd64 manifest
        (m,) = [x for x in doc["manifests"] if x.get("platform", {}).get("architecture") == "amd64"]
        doc = json.loads(_registry_get(f"http://{registry}/v2/busybox/manifests/{m['digest']}")[0])
    return len(doc["layers"])


def _graph(base: str, greeting: str) -> Vertex:
    src = Vertex(SourceOp("docker-image://" + base), name="FROM busybox")
    run = Vertex(
        ExecOp(("/bin/sh", "-c", "echo $((6 * 7)) > /answer"), env=(ENV_PATH,)),
        (src,),
        name="RUN answer",
    )
    return Vertex(
        FileOp((Mkdir("/greet", 0o755), Mkfile("/greet/hello", greeting, 0o644))),
        (run,),
        name="greeting",
    )


CONFIG = {"config": {"Cmd": ["cat", "/answer"], "Env": [ENV_PATH]}}


def ow(
    *args: str, stdin: bytes | None = None, python: str = sys.executable
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [python, "-m", "ociworker", *args], input=stdin, capture_output=True, timeout=600
    )


def _ok(proc: subprocess.CompletedProcess[bytes]) -> str:
    err = proc.stderr.decode(errors="replace")
    assert proc.returncode == 0, err[-4000:]
    return err


def test_graph_from_stdin_builds_what_it_declares(
    tmp_path: Path, state_dir: Path, pinned_base: str, require_root: None
) -> None:
    # the README's shape: python my_build.py | ociworker build --frontend graph.v1 -
    script = tmp_path / "my_build.py"
    script.write_text(
        textwrap.dedent(f"""
        import sys
        from ociworker.definition import encode
        from ociworker.core.graph import ExecOp, FileOp, Mkdir, Mkfile, SourceOp, Vertex

        src = Vertex(SourceOp("docker-image://{pinned_base}"), name="FROM busybox")
        run = Vertex(ExecOp(("/bin/sh", "-c", "echo $((6 * 7)) > /answer"),
                            env=({ENV_PATH!r},)), (src,), name="RUN answer")
        files = FileOp((Mkdir("/greet", 0o755), Mkfile("/greet/hello", "hi\\n", 0o644)))
        top = Vertex(files, (run,), name="greeting")
        sys.stdout.buffer.write(encode(top, {{"config": {{"Cmd": ["cat", "/answer"]}}}}, "pb"))
        """)
    )
    made = subprocess.run([sys.executable, str(script)], capture_output=True, check=True)
    out = tmp_path / "out"
    _ok(
        ow(
            "build", "--root", str(state_dir), "--frontend", "graph.v1", "-",
            "-o", f"type=local,dest={out}", "--progress", "plain",
            stdin=made.stdout,
        )
    )  # fmt: skip
    assert (out / "answer").read_text() == "42\n"  # the shell's arithmetic, run by runc
    assert (out / "greet" / "hello").read_text() == "hi\n"
    assert (out / "bin" / "busybox").is_file()  # the base image's files
    # the history record names the definition by its bytes' digest (a protobuf
    # document is no text: the digest of what came in on stdin)
    assert _recorded_digest(state_dir) == "sha256:" + hashlib.sha256(made.stdout).hexdigest()


def _recorded_digest(state_dir: Path) -> str:
    """The definition digest the newest build's history record shows."""
    proc = ow("history", "inspect", "--root", str(state_dir), "^0", "--format", "json")
    _ok(proc)
    return str(json.loads(proc.stdout)["dockerfile_digest"])


def test_graph_file_image_and_cached_rebuild(
    tmp_path: Path, state_dir: Path, pinned_base: str, registry: str, require_root: None
) -> None:
    definition = tmp_path / "build.json"
    definition.write_bytes(encode(_graph(pinned_base, "json\n"), CONFIG, "json"))
    archive = tmp_path / "img.tar"
    args = ["build", "--root", str(state_dir), "--frontend", "graph.v1", str(definition)]
    args += ["-o", f"type=oci,dest={archive}", "--progress", "plain"]
    _ok(ow(*args))
    image = oci_archive_image(archive)
    with tarfile.open(archive) as tf:
        blob = tf.extractfile("blobs/sha256/" + image.config_digest.split(":")[1])
        assert blob is not None
        config = json.load(blob)
    assert config["config"]["Cmd"] == ["cat", "/answer"]
    assert config["os"] == "linux" and config["architecture"] == "amd64"
    # the base's layers, the RUN's and the file op's
    assert len(config["rootfs"]["diff_ids"]) == _base_layer_count(registry) + 2
    assert len(config["history"]) == len(config["rootfs"]["diff_ids"])
    again = _ok(ow(*args))
    assert "#3 RUN answer\n#3 CACHED" in again and "#4 greeting\n#4 CACHED" in again
    want = "sha256:" + hashlib.sha256(definition.read_bytes()).hexdigest()
    assert _recorded_digest(state_dir) == want
    pretty = ow("history", "inspect", "--root", str(state_dir), "^0").stdout.decode()
    assert f"Dockerfile digest: {want}" in pretty, pretty


def test_graph_frontend_refuses_bad_definitions_before_any_step(
    tmp_path: Path, state_dir: Path, require_root: None
) -> None:
    (tmp_path / "empty.pb").write_bytes(b"")
    for arg, words in ((str(tmp_path), "is a directory"), (str(tmp_path / "empty.pb"), "empty")):
        proc = ow("build", "--root", str(state_dir), "--frontend", "graph.v1", arg)
        err = proc.stderr.decode()
        assert proc.returncode != 0 and words in err and "Traceback" not in err, err
    # embedded, as over a daemon: a hostile definition fails before any step
    for what, (data, words) in _hostile().items():
        proc = ow("build", "--root", str(state_dir), "--frontend", "graph.v1", "-", stdin=data)
        err = proc.stderr.decode()
        assert proc.returncode == 1 and words in err and "Traceback" not in err, (what, err)
        assert "#2 " not in err, (what, err)  # no step after loading the definition


# --- over a daemon ------------------------------------------------------------------------


@pytest.fixture
def daemon_addr(tmp_path: Path, require_root: None, registry: str) -> Iterator[str]:
    sock = tmp_path / "d.sock"
    log = tmp_path / f"daemon-{uuid.uuid4().hex[:6]}.log"
    proc = spawn_daemon(("--addr", f"unix://{sock}", "--root", str(tmp_path / "droot")), log)
    yield f"unix://{sock}"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0


def _hostile() -> dict[str, tuple[bytes, str]]:
    a, b = "sha256:" + "1" * 64, "sha256:" + "2" * 64
    run = {"exec": {"args": ["true"]}}
    cycle = {
        "version": "graph.v1",
        "target": a,
        "vertices": [
            {"digest": a, "inputs": [b], "op": run},
            {"digest": b, "inputs": [a], "op": run},
        ],
    }
    unknown = {
        "version": "graph.v1",
        "target": a,
        "vertices": [{"digest": a, "inputs": [], "op": {"build": {"def": ""}}}],
    }
    escape = encode(
        Vertex(
            FileOp((Mkfile("/../../../etc/cron.d/pwn", "* * * * * root id\n", 0o644),)), (None,)
        ),
        None,
        "json",
    )
    million = b"\x0a\x08graph.v1" + b"\x12\x00" * 1_000_000
    return {
        "cycle": (json.dumps(cycle).encode(), "cycle"),
        "unknown op": (json.dumps(unknown).encode(), "unknown op type 'build'"),
        "path escape": (escape, "escapes its root"),
        "10^6 vertices": (million, "more than 100000 vertices"),
        "version": (b'{"version": "graph.v7"}', "unsupported definition version 'graph.v7'"),
    }


def test_daemon_refuses_hostile_definitions_then_builds(
    tmp_path: Path, daemon_addr: str, pinned_base: str
) -> None:
    for what, (data, words) in _hostile().items():
        proc = ow("build", "--addr", daemon_addr, "--frontend", "graph.v1", "-", stdin=data)
        err = proc.stderr.decode(errors="replace")
        assert proc.returncode == 1, (what, err)
        assert words in err and "Traceback" not in err, (what, err)
    # the worker is healthy: a good definition builds, through the CLI and the Client
    out = tmp_path / "out"
    data = encode(_graph(pinned_base, "daemon\n"), CONFIG, "pb")
    _ok(
        ow("build", "--addr", daemon_addr, "--frontend", "graph.v1", "-",
           "-o", f"type=local,dest={out}", stdin=data)
    )  # fmt: skip
    assert (out / "answer").read_text() == "42\n"
    assert (out / "greet" / "hello").read_text() == "daemon\n"

    async def via_client() -> str | None:
        async with ociworker.Client(daemon_addr) as client:
            result = await client.build(
                tmp_path, frontend="graph.v1", definition=data, want_image=True
            )
        return result.manifest.digest if result.manifest else None

    assert asyncio.run(via_client()) is not None
    # a definition past gRPC's 4 MiB default message size travels whole
    big = "0123456789abcdef" * (6 << 16)  # 6 MiB
    top = Vertex(FileOp((Mkfile("/big", big, 0o644),)), (None,), name="big file")
    out = tmp_path / "big-out"
    _ok(
        ow("build", "--addr", daemon_addr, "--frontend", "graph.v1", "-",
           "-o", f"type=local,dest={out}", stdin=encode(top, None, "pb"))
    )  # fmt: skip
    assert (out / "big").read_text() == big


# --- a third-party frontend, installed with pip ---------------------------------------------

PLUGIN = '''
"""A toy frontend: each "PATH=TEXT" line of the definition is a file; "@NAME"
copies a context file's text (read through the confined reader)."""
from ociworker.core.graph import FileOp, Mkfile, Vertex
from ociworker.frontend.base import FrontendResult


class LinesFrontend:
    def solve(self, inputs):
        actions = []
        for line in inputs.definition.decode().splitlines():
            if not line.strip() or line.startswith("#"):
                continue
            if line.startswith("@"):
                name = line[1:]
                data = inputs.context.read(name).decode()
                actions.append(Mkfile("/from-context/" + name.replace("/", "_"), data, 0o644))
                continue
            path, _, text = line.partition("=")
            actions.append(Mkfile(path, text + "\\n", 0o644))
        who = inputs.opts.get("build-arg:WHO", "nobody")
        actions.append(Mkfile("/who", who + "\\n", 0o644))
        target = Vertex(FileOp(tuple(actions)), (None,), name="lines")
        return FrontendResult(target, {"config": {"Cmd": ["/who"]}})
'''


@pytest.fixture(scope="module")
def plugin_python(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A venv (made here, on the system site-packages) with ociworker importable
    through a .pth and the plugin package pip-installed: its Python finds the
    ``lines.v1`` frontend through the entry-point group, this one does not."""
    tmp = tmp_path_factory.mktemp("plugin")
    pkg = tmp / "lines-frontend"
    pkg.mkdir()
    (pkg / "lines_frontend.py").write_text(PLUGIN)
    (pkg / "pyproject.toml").write_text(
        textwrap.dedent("""
        [build-system]
        requires = ["setuptools"]
        build-backend = "setuptools.build_meta"

        [project]
        name = "lines-frontend"
        version = "1.0"

        [project.entry-points."ociworker.frontends"]
        "lines.v1" = "lines_frontend:LinesFrontend"

        [tool.setuptools]
        py-modules = ["lines_frontend"]
        """)
    )
    venv = tmp / "venv"
    subprocess.run(
        # no pip of its own: the .pth below lends it this interpreter's pip and
        # setuptools (ensurepip's older setuptools cannot build a wheel alone)
        [sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)],
        check=True,
        capture_output=True,
    )
    py = venv / "bin" / "python"
    site = subprocess.run(
        [py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    # this worktree's ociworker first, then the dependencies this interpreter has
    (Path(site) / "ociworker_dev.pth").write_text(f"{SRC}\n{sysconfig.get_paths()['purelib']}\n")
    subprocess.run(
        [py, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", str(pkg)],
        check=True,
        capture_output=True,
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
    )
    return str(py)


def _plugin_context(tmp_path: Path) -> Path:
    ctx = tmp_path / "ctx"
    (ctx / "notes").mkdir(parents=True)
    (ctx / "notes" / "n.txt").write_text("from the context")
    (ctx / "spec.lines").write_text("/a.txt=alpha\n@notes/n.txt\n")
    (ctx / "Dockerfile").write_text("# syntax=lines.v1\n/b.txt=beta\n")
    return ctx


def test_plugin_frontend_picked_by_flag_and_by_syntax(
    tmp_path: Path, state_dir: Path, plugin_python: str, require_root: None
) -> None:
    ctx = _plugin_context(tmp_path)
    out1, out2 = tmp_path / "out1", tmp_path / "out2"
    root = ["--root", str(state_dir)]
    _ok(
        ow("build", *root, "--frontend", "lines.v1", "-f", str(ctx / "spec.lines"), str(ctx),
           "--build-arg", "WHO=flag", "-o", f"type=local,dest={out1}", python=plugin_python)
    )  # fmt: skip
    assert (out1 / "a.txt").read_text() == "alpha\n"
    assert (out1 / "from-context" / "notes_n.txt").read_text() == "from the context"
    assert (out1 / "who").read_text() == "flag\n"
    # no --frontend: the Dockerfile's "# syntax=lines.v1" names the plugin
    _ok(ow("build", *root, str(ctx), "-o", f"type=local,dest={out2}", python=plugin_python))
    assert sorted(p.name for p in out2.iterdir()) == ["b.txt", "who"]
    assert (out2 / "b.txt").read_text() == "beta\n"
    # the same Dockerfile where no plugin is installed: the Dockerfile frontend, which
    # reads "/b.txt=beta" as an instruction and fails
    proc = ow("build", *root, str(ctx), "-o", f"type=local,dest={tmp_path / 'x'}")
    assert proc.returncode != 0 and b"Traceback" not in proc.stderr
    # a frontend cannot read the host through its reader
    (ctx / "evil.lines").write_text("@../../../../etc/hostname\n")
    proc = ow("build", *root, "--frontend", "lines.v1", "-f", str(ctx / "evil.lines"), str(ctx),
              python=plugin_python)  # fmt: skip
    err = proc.stderr.decode()
    assert proc.returncode != 0 and "want a path inside the context" in err, err
    assert "Traceback" not in err
    # an unknown name is refused, naming what is registered
    proc = ow("build", *root, "--frontend", "nosuch.v1", str(ctx), python=plugin_python)
    err = proc.stderr.decode()
    assert proc.returncode != 0 and "unknown frontend 'nosuch.v1'" in err and "lines.v1" in err


def test_daemon_with_the_plugin_serves_a_client_without_it(
    tmp_path: Path, plugin_python: str, require_root: None, registry: str
) -> None:
    ctx = _plugin_context(tmp_path)
    sock, log = tmp_path / "p.sock", tmp_path / "pd.log"
    args = ("--addr", f"unix://{sock}", "--root", str(tmp_path / "proot"))
    proc = spawn_daemon(args, log, python=plugin_python)
    try:
        out = tmp_path / "out"
        _ok(ow("build", "--addr", f"unix://{sock}", str(ctx), "-o", f"type=local,dest={out}"))
        assert (out / "b.txt").read_text() == "beta\n"
        _ok(
            ow("build", "--addr", f"unix://{sock}", "--frontend", "lines.v1", "-f",
               str(ctx / "spec.lines"), str(ctx), "-o", f"type=local,dest={tmp_path / 'o2'}")
        )  # fmt: skip
        assert (tmp_path / "o2" / "from-context" / "notes_n.txt").read_text() == "from the context"
        # the daemon names the frontends it has, this client's Python has no say
        bad = ow("build", "--addr", f"unix://{sock}", "--frontend", "nosuch.v1", str(ctx))
        err = bad.stderr.decode()
        assert bad.returncode == 1 and "unknown frontend 'nosuch.v1'" in err, err
        assert "lines.v1" in err and "Traceback" not in err
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0


def test_fleet_builds_a_graph_from_stdin(
    tmp_path: Path, pinned_base: str, require_root: None, registry: str
) -> None:
    # the definition is read once (stdin) and handed to the worker the fleet picks
    procs, addrs = [], []
    for name in ("a", "b"):
        sock = tmp_path / f"{name}.sock"
        args = ("--addr", f"unix://{sock}", "--root", str(tmp_path / f"root-{name}"))
        procs.append(spawn_daemon(args, tmp_path / f"{name}.log"))
        addrs += ["--addr", f"unix://{sock}"]
    try:
        out = tmp_path / "out"
        data = encode(_graph(pinned_base, "fleet\n"), CONFIG, "pb")
        err = _ok(
            ow("build", *addrs, "--frontend", "graph.v1", "-", "-o", f"type=local,dest={out}",
               "--progress", "plain", stdin=data)
        )  # fmt: skip
        assert 'building with worker "unix://' in err
        assert (out / "greet" / "hello").read_text() == "fleet\n"
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        assert [p.wait(timeout=60) for p in procs] == [0, 0]


def test_graph_context_is_the_definition_files_directory(
    tmp_path: Path, state_dir: Path, require_root: None
) -> None:
    project = tmp_path / "project"
    (project / "src").mkdir(parents=True)
    (project / "src" / "app.txt").write_text("the app\n")
    (project / "secret.env").write_text("TOKEN=1\n")
    (project / ".dockerignore").write_text("secret.env\n")
    ctx = Vertex(SourceOp("local://context"), name="context")
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()

    def build(src: str, name: str) -> subprocess.CompletedProcess[bytes]:
        top = Vertex(FileOp((Copy(1, src, "/app/"),)), (None, ctx), name=f"COPY {src}")
        (project / name).write_bytes(encode(top, None, "pb"))
        return subprocess.run(
            [sys.executable, "-m", "ociworker", "build", "--root", str(state_dir), "--frontend",
             "graph.v1", str(project / name), "-o", f"type=local,dest={tmp_path / name}.out"],
            cwd=elsewhere, capture_output=True, timeout=600,
        )  # fmt: skip

    _ok(build("/src/app.txt", "app.pb"))
    assert (tmp_path / "app.pb.out" / "app" / "app.txt").read_text() == "the app\n"
    # the context's .dockerignore holds for a graph's local source too
    proc = build("/secret.env", "secret.pb")
    err = proc.stderr.decode()
    assert proc.returncode == 1 and "excluded by .dockerignore" in err, err


def test_graph_context_is_synced_to_a_daemon(tmp_path: Path, daemon_addr: str) -> None:
    project = tmp_path / "project"
    project.mkdir()
    (project / "app.txt").write_text("synced\n")
    ctx = Vertex(SourceOp("local://context"), name="context")
    top = Vertex(FileOp((Copy(1, "/app.txt", "/app/"),)), (None, ctx), name="COPY app.txt")
    (project / "build.json").write_bytes(encode(top, None, "json"))
    out = tmp_path / "out"
    _ok(
        ow("build", "--addr", daemon_addr, "--frontend", "graph.v1",
           str(project / "build.json"), "-o", f"type=local,dest={out}")
    )  # fmt: skip
    assert (out / "app" / "app.txt").read_text() == "synced\n"


def test_a_dockerfile_holding_a_json_graph_under_its_syntax_line(
    tmp_path: Path, state_dir: Path, require_root: None
) -> None:
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    top = Vertex(FileOp((Mkfile("/made-by", "graph.v1\n", 0o644),)), (None,), name="mkfile")
    (ctx / "Dockerfile").write_text("# syntax=graph.v1\n" + encode(top, None, "json").decode())
    out = tmp_path / "out"
    err = _ok(ow("build", "--root", str(state_dir), str(ctx), "-o", f"type=local,dest={out}"))
    assert (out / "made-by").read_text() == "graph.v1\n"
    assert "(graph.v1)" in err and "syntax directive" not in err
