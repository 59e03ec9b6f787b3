"""Build history (issue 14 items 4-6): a scripted edit sequence on a multi-stage
Dockerfile gives, at each step, the ran/cached pattern of dockerd's BuildKit on
the same sequence, every miss ``--explain-cache`` reports names the input that
changed; ``history ls|inspect|logs|rm|trace`` work embedded and over a daemon."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import normalize_step_name, plain_steps
from dockerd import Dockerd
from test_daemon import Daemon, start_daemon, stop_daemon

DOCKERFILE = """\
ARG BASE
FROM $BASE AS deps
ARG VERSION=1
RUN echo "deps $VERSION" > /deps
FROM $BASE AS app
ENV MODE={mode}
COPY . /ctx/
RUN {run}
COPY --from=deps /deps /deps
"""
RUN_1 = "cat /ctx/app.txt > /out && echo $MODE >> /out"
RUN_2 = "cat /ctx/app.txt > /out && echo $MODE-edited >> /out"


def _write_dockerfile(ctx: Path, mode: str = "a", run: str = RUN_1) -> None:
    (ctx / "Dockerfile").write_text(DOCKERFILE.format(mode=mode, run=run))


def _ow(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, "-m", "ociworker", *args], capture_output=True, text=True, timeout=600
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"ociworker {args} exited {proc.returncode}:\n{proc.stderr[-4000:]}")
    return proc


def _pattern(stderr: str) -> dict[str, str]:
    """Each Dockerfile step as the plain output showed it: ran or cached (the
    [internal] and exporting steps left out)."""
    out: dict[str, str] = {}
    for s in plain_steps(stderr):
        if not s.name.startswith("[") or s.name.startswith("[internal]"):
            continue
        key = _key(s.name)
        state = "cached" if "CACHED" in s.states else "ran"
        # both stages start FROM the same image: one step, which BuildKit names
        # after either stage
        out[key] = "ran" if out.get(key) == "ran" else state
    return out


def _no_from(pattern: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in pattern.items() if k != "FROM"}


def _key(name: str) -> str:
    """A step by its place (``[app 3/4]``): BuildKit 20.10 prints a RUN with its
    variables expanded, ociworker as written; a FROM is the base image's step."""
    prefix = normalize_step_name(name).split("]", 1)[0] + "]"
    return "FROM" if " FROM " in name else prefix


def _explained(stderr: str) -> dict[str, list[str]]:
    """The ``--explain-cache`` block: step name -> reasons."""
    out: dict[str, list[str]] = {}
    lines = stderr.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("explain-cache:"))
    step = ""
    for line in lines[start + 1 :]:
        if line.startswith("    - "):
            out[step].append(line[6:])
        elif line.startswith("  ") and not line.startswith("   "):
            step = _key(line.strip())
            out.setdefault(step, [])
        else:
            break
    return out


@pytest.fixture
def bases(dockerd: Dockerd, registry: str, base_image: str) -> Iterator[tuple[str, str]]:
    """A base image tag in the test registry, and a function-free way to bump it:
    (the tag, the reference of a second image pushed under the same tag later)."""
    repo = f"{registry}/h11-{uuid.uuid4().hex[:8]}"
    dockerd.docker("pull", base_image, timeout=300)
    dockerd.docker("tag", base_image, f"{repo}:latest")
    dockerd.docker("push", f"{repo}:latest", timeout=300)
    yield f"{repo}:latest", repo
    dockerd.docker("rmi", "-f", f"{repo}:latest", check=False)


def _bump(dockerd: Dockerd, tmp: Path, base: str) -> None:
    """A second image pushed under ``base``'s tag, with a layer more (dockerd's
    BuildKit keys a base image by its layers: a config-only change is no miss there)."""
    d = tmp / "bump"
    d.mkdir(exist_ok=True)
    (d / "Dockerfile").write_text(f"FROM {base}\nRUN echo {uuid.uuid4().hex} > /bumped\n")
    dockerd.docker("build", "--network=host", "-t", base, str(d), timeout=600)
    dockerd.docker("push", base, timeout=300)


@pytest.mark.usefixtures("require_root")
def test_edit_sequence_matches_buildkit_and_every_miss_is_explained(
    dockerd: Dockerd,
    bases: tuple[str, str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    base, _ = bases
    monkeypatch.setenv("DOCKER_BUILDKIT", "1")
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "app.txt").write_text("hello\n")
    (ctx / "ignored.txt").write_text("x\n")
    (ctx / ".dockerignore").write_text("ignored.txt\n")
    _write_dockerfile(ctx)
    root = tmp_path / "state"
    args = {"BASE": base, "VERSION": "1"}

    def build() -> tuple[dict[str, str], dict[str, str], str]:
        flags = [f for k, v in args.items() for f in ("--build-arg", f"{k}={v}")]
        theirs = dockerd.docker(
            "build", "--progress=plain", "--network=host", *flags, str(ctx), timeout=600
        )
        ours = _ow(
            "build", "--root", str(root), "--progress", "plain", "--explain-cache", *flags,
            str(ctx),
        )  # fmt: skip
        return _pattern(theirs.stderr), _pattern(ours.stderr), ours.stderr

    theirs, ours, _ = build()
    assert set(ours) == set(theirs), (ours, theirs)
    assert set(ours.values()) == {"ran"}, ours

    def edit(what: str) -> None:
        if what == "touch a context file":
            os.utime(ctx / "app.txt", (1, 1))
        elif what == "edit a context file":
            (ctx / "app.txt").write_text("hello again\n")
        elif what == "edit an ignored file":
            (ctx / "ignored.txt").write_text("y\n")
        elif what == "change a build-arg":
            args["VERSION"] = "2"
        elif what == "change an ENV":
            _write_dockerfile(ctx, mode="b")
        elif what == "bump the base image":
            _bump(dockerd, tmp_path, base)
        elif what == "edit the Dockerfile":
            _write_dockerfile(ctx, mode="b", run=RUN_2)

    # what each edit's miss must name (a substring of the reason of the step it hits)
    named = {
        "edit a context file": ("[app 2/4]", "context files changed: app.txt"),
        "change a build-arg": ("[deps 2/2]", "build-arg VERSION changed"),
        "change an ENV": ("[app 3/4]", "env MODE changed"),
        "bump the base image": ("FROM", "base image changed"),
        "edit the Dockerfile": ("[app 3/4]", "the Dockerfile changed"),
    }
    for what in (
        "touch a context file",
        "edit a context file",
        "edit an ignored file",
        "change a build-arg",
        "change an ENV",
        "bump the base image",
        "edit the Dockerfile",
    ):
        edit(what)
        theirs, ours, stderr = build()
        # dockerd's BuildKit shows a FROM of an image in its store DONE on every
        # build, cached or not: the FROM is compared by its explanation only
        assert _no_from(ours) == _no_from(theirs), f"after '{what}': ours {ours}, BuildKit {theirs}"
        assert ours["FROM"] == ("ran" if what == "bump the base image" else "cached"), what
        ran = {n for n, state in ours.items() if state == "ran"}
        explained = _explained(stderr)
        # every step that ran is explained, each by an input (never "no reason")
        assert {n for n in explained if not n.startswith("[internal]")} == ran, (what, stderr)
        for name, reasons in explained.items():
            assert reasons, (what, name)
            for r in reasons:
                assert re.match(
                    r"(context files changed: \S|build-arg \S+ changed|env \S+ changed|"
                    r"base image changed: |parent step '|the Dockerfile changed)",
                    r,
                ), (what, name, r)
        if what in named:
            step, reason = named[what]
            assert any(reason in r for r in explained.get(step, [])), (what, explained)


def _history(*args: str, root: Path | None = None, addr: str = "") -> str:
    where = ["--addr", addr] if addr else ["--root", str(root)]
    return _ow("history", args[0], *where, *args[1:]).stdout


def _check_history_commands(build_dir: Path, *, root: Path | None = None, addr: str = "") -> None:
    """Two builds of a 3-stage Dockerfile, the second failing; then every
    history command against what the builds printed."""
    where = ["--addr", addr] if addr else ["--root", str(root)]
    first = _ow("build", *where, "--progress", "plain", str(build_dir))
    (build_dir / "Dockerfile").write_text(
        (build_dir / "Dockerfile").read_text() + "RUN echo failing && exit 3\n"
    )
    second = _ow(
        "build", *where, "--progress", "plain", "--explain-cache", str(build_dir), check=False
    )
    assert second.returncode != 0
    # a failed build is explained too: its new step is a Dockerfile edit
    tail = second.stderr[second.stderr.index("explain-cache: 1 step(s) ran") :]
    assert "  [stage-2 5/5] RUN echo failing && exit 3\n    - the Dockerfile changed" in tail

    ls = _history("ls", "--format", "json", root=root, addr=addr).splitlines()
    rows = [json.loads(x) for x in ls]
    assert [r["status"] for r in rows] == ["Error", "Completed"]
    newest, older = rows[0]["ref"], rows[1]["ref"]
    table = _history("ls", root=root, addr=addr)
    assert table.splitlines()[0].split() == ["BUILD", "ID", "NAME", "STATUS", "CREATED", "AT",
                                            "DURATION"]  # fmt: skip
    assert newest in table and older in table

    # inspect: every step the first build printed, and its outputs' digest
    shown = [s.name for s in plain_steps(first.stderr)]
    pretty = _history("inspect", older, root=root, addr=addr)
    for name in shown:
        assert name in pretty, (name, pretty)
    record = json.loads(_history("inspect", older, "--format", "json", root=root, addr=addr))
    assert {s["name"] for s in record["steps"]} == set(shown)
    failed = json.loads(_history("inspect", "^0", "--format", "json", root=root, addr=addr))
    assert "exit code: 3" in failed["error"] or "3" in failed["error"], failed["error"]

    # logs: the same plain output the build printed (step names and log lines)
    logs = _history("logs", newest, root=root, addr=addr)
    assert "failing" in logs
    raw = _history("logs", newest, "--progress", "rawjson", root=root, addr=addr)
    assert all(json.loads(line) for line in raw.splitlines())
    assert [s.name for s in plain_steps(logs)] == [s.name for s in plain_steps(second.stderr)]

    # trace: an SVG naming every step, and Chrome trace JSON
    svg = tmp_svg = build_dir.parent / f"trace-{uuid.uuid4().hex[:6]}.svg"
    _history("trace", older, "-o", str(tmp_svg), root=root, addr=addr)
    tree = ET.parse(svg)
    texts = {"".join(t.itertext()) for t in tree.iter("{http://www.w3.org/2000/svg}title")}
    for name in shown:
        assert any(t.startswith(name) for t in texts), (name, texts)
    trace = json.loads(_history("trace", older, "--format", "json", root=root, addr=addr))
    complete = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    assert {e["name"] for e in complete} == set(shown)
    assert all(isinstance(e["ts"], int) and e["dur"] > 0 for e in complete)
    assert any(e["args"]["critical_path"] for e in complete)

    # rm: the record is gone, the other stays; a name that is not there is an error
    assert _history("rm", older, root=root, addr=addr).split() == [older]
    rows = [
        json.loads(x) for x in _history("ls", "--format", "json", root=root, addr=addr).splitlines()
    ]
    assert [r["ref"] for r in rows] == [newest]
    where_args = ["--addr", addr] if addr else ["--root", str(root)]
    bad = _ow("history", "inspect", *where_args, older, check=False)
    assert bad.returncode != 0 and "no build record" in bad.stderr
    assert "Traceback" not in bad.stderr


def _three_stages(tmp: Path, base: str) -> Path:
    ctx = tmp / "three"
    ctx.mkdir()
    (ctx / "Dockerfile").write_text(
        f"FROM {base} AS one\nRUN echo one > /one\n"
        f"FROM {base} AS two\nRUN echo two > /two\n"
        f"FROM {base}\nCOPY --from=one /one /one\nCOPY --from=two /two /two\n"
        "RUN cat /one /two\n"
    )
    return ctx


@pytest.mark.usefixtures("require_root")
def test_history_commands_embedded(tmp_path: Path, base_image: str) -> None:
    _check_history_commands(_three_stages(tmp_path, base_image), root=tmp_path / "state")


@pytest.mark.usefixtures("require_root")
def test_history_commands_over_the_daemon(tmp_path: Path, base_image: str) -> None:
    d: Daemon = start_daemon(tmp_path / "droot", tmp_path / "d.sock")
    try:
        _check_history_commands(_three_stages(tmp_path, base_image), addr=d.addr)
    finally:
        assert stop_daemon(d) == 0


CHROMIUM = "/usr/bin/chromium"


@pytest.mark.usefixtures("require_root")
def test_trace_svg_of_a_three_stage_build_opens_in_chromium(
    tmp_path: Path, base_image: str
) -> None:
    """The SVG opens in a headless Chromium (a screenshot is left next to it, in
    the test's tmp dir), and the DOM Chromium parsed names every step the build printed."""
    if not os.path.exists(CHROMIUM):
        pytest.fail("chromium is not installed: run scripts/setup-host")
    ctx, root = _three_stages(tmp_path, base_image), tmp_path / "state"
    built = _ow("build", "--root", str(root), "--progress", "plain", str(ctx))
    shown = [s.name for s in plain_steps(built.stderr)]
    stages = {n.split()[0] for n in shown if n.startswith("[") and not n.startswith("[int")}
    assert stages == {"[one", "[two", "[stage-2"}, shown
    svg, png = tmp_path / "trace.svg", tmp_path / "trace.png"
    _history("trace", "^0", "-o", str(svg), root=root)
    browser = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--window-size=1240,400"]
    shot = subprocess.run(
        [*browser, f"--screenshot={png}", svg.as_uri()], capture_output=True, text=True, timeout=120
    )
    assert shot.returncode == 0, shot.stderr[-2000:]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    dom = subprocess.run(
        [*browser, "--dump-dom", svg.as_uri()], capture_output=True, text=True, timeout=120
    )
    assert dom.returncode == 0, dom.stderr[-2000:]
    parsed = ET.fromstring(dom.stdout)
    assert parsed.tag == "{http://www.w3.org/2000/svg}svg"
    titles = ["".join(t.itertext()) for t in parsed.iter("{http://www.w3.org/2000/svg}title")]
    for name in shown:
        assert any(t.startswith(name) for t in titles), (name, titles)


@pytest.mark.usefixtures("require_root")
def test_a_context_url_password_never_reaches_the_history(tmp_path: Path) -> None:
    root = tmp_path / "state"
    url = "http://user:hunter2pw@127.0.0.1:9/repo.git#main"  # port 9: nobody answers
    proc = _ow("build", "--root", str(root), "--progress", "plain", url, check=False)
    assert proc.returncode != 0
    record = json.loads(_history("inspect", "^0", "--format", "json", root=root))
    assert record["error"], record
    assert record["context"] == "http://user:xxxxx@127.0.0.1:9/repo.git#main"
    for f in root.glob("history.db*"):
        assert b"hunter2pw" not in f.read_bytes(), f
