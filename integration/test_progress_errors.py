"""What a user sees of progress when things go wrong, and ``rawjson`` as a
BuildKit tool reads it.

- ``--progress=rawjson`` prints only BuildKit ``SolveStatus`` objects, one per
  line, checked against the schema of moby/buildkit client/graph.go written
  out here (key sets, types, base64 logs, RFC 3339 times).
- A base image that cannot be resolved ends its ``load metadata`` step
  ``ERROR`` with one line in BuildKit's words; a failing RUN, a COPY of a
  missing file and a cancelled RUN each end with one ERROR line for their step.
- ``--progress=tty`` on a stderr that is no terminal is refused, as buildx does.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import json
import re
import secrets
import signal
import socket
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from conftest import LEGS_MARK, current_cli
from test_build import ow, wait_for_line
from test_progress_views import terminal_build

pytestmark = LEGS_MARK

_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
# Go's time.Time JSON: RFC 3339, up to 9 fraction digits, UTC off the wire
_RFC3339 = re.compile(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d{1,9}))?Z")
_ANSI = re.compile(r"\x1b(?:\[[0-?]*[ -/]*[@-~]|\][^\x07]*\x07|[@-Z\\-_])")
#: Python's names for things, which must never reach a user
_PYTHON_WORDS = re.compile(
    r"ConnectError|ConnectTimeout|OSError|gaierror|SSLError|Errno|Traceback|httpx|httpcore"
)


def _time(value: object) -> datetime.datetime:
    assert isinstance(value, str), value
    m = _RFC3339.fullmatch(value)
    assert m, f"not RFC 3339 as Go writes it: {value!r}"
    frac = (m.group(2) or "").ljust(6, "0")[:6]
    return datetime.datetime.fromisoformat(f"{m.group(1)}.{frac}+00:00")


def _b64(value: object) -> bytes:
    assert isinstance(value, str), value
    try:
        return base64.b64decode(value, validate=True)
    except binascii.Error as exc:
        raise AssertionError(f"not base64: {value!r}") from exc


def _nonempty_str(value: object) -> None:
    assert isinstance(value, str) and value, value


def _str(value: object) -> None:
    assert isinstance(value, str), value


def _int(value: object) -> int:
    assert isinstance(value, int) and not isinstance(value, bool), value
    return value


def _nonzero_int(value: object) -> None:
    assert _int(value) != 0, value


def _stream(value: object) -> None:
    assert _int(value) in (1, 2), value


def _true(value: object) -> None:
    assert value is True, value


def _object(value: object) -> None:
    assert isinstance(value, dict), value


def _list(value: object) -> None:
    assert isinstance(value, list), value


def _digest(value: object) -> None:
    assert isinstance(value, str) and _DIGEST.fullmatch(value), value


def _digests(value: object) -> None:
    assert isinstance(value, list) and value, value
    for d in value:
        _digest(d)


def _b64s(value: object) -> None:
    assert isinstance(value, list) and value, value
    for d in value:
        _b64(d)


Check = Callable[[object], object]

# client.Vertex / VertexStatus / VertexLog / VertexWarning: (required keys,
# optional keys), each with its check. ``omitempty`` keys must be absent rather
# than empty, which the checks enforce (an empty string, [], 0 or false fails).
_SCHEMA: dict[str, tuple[dict[str, Check], dict[str, Check]]] = {
    "vertexes": (
        {},
        {
            "digest": _digest,
            "inputs": _digests,
            "name": _nonempty_str,
            "started": _time,
            "completed": _time,
            "cached": _true,
            "error": _nonempty_str,
            "progressGroup": _object,
        },
    ),
    "statuses": (
        {"id": _str, "current": _int, "timestamp": _time},
        {
            "vertex": _digest,
            "name": _nonempty_str,
            "total": _nonzero_int,
            "started": _time,
            "completed": _time,
        },
    ),
    "logs": (
        {"data": _b64, "timestamp": _time},
        {"vertex": _digest, "stream": _stream},
    ),
    "warnings": (
        {},
        {
            "vertex": _digest,
            "level": _nonzero_int,
            "short": _b64,
            "detail": _b64s,
            "url": _nonempty_str,
            "sourceInfo": _object,
            "range": _list,
        },
    ),
}


def _solve_statuses(stderr: str) -> list[dict[str, list[dict[str, Any]]]]:
    """Every line of ``stderr`` parsed and checked as a ``client.SolveStatus``."""
    out = []
    for line in stderr.splitlines():
        try:
            obj = json.loads(line)
        except ValueError as exc:
            raise AssertionError(f"not a JSON line in rawjson output: {line!r}") from exc
        assert isinstance(obj, dict) and obj, line
        assert set(obj) <= set(_SCHEMA), line
        for key, entries in obj.items():
            assert isinstance(entries, list) and entries, line  # omitempty: never []
            required, optional = _SCHEMA[key]
            for entry in entries:
                assert isinstance(entry, dict), line
                assert set(required) <= set(entry) <= set(required) | set(optional), line
                for k, v in entry.items():
                    try:
                        (required.get(k) or optional[k])(v)
                    except AssertionError as exc:
                        raise AssertionError(f"bad {key}.{k} in {line!r}") from exc
        out.append(obj)
    return out


def test_rawjson_is_buildkit_solve_status(
    tmp_path: Path, base_image: str, require_root: None
) -> None:
    marker = f"printed {secrets.token_hex(4)}"
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    first = "RUN echo one > /one"
    (ctx / "Dockerfile").write_text(f"FROM {base_image}\n{first}\n")
    root = tmp_path / "state"
    ow(root, "build", "--progress=plain", str(ctx))  # the first RUN is cached from now on
    (ctx / "Dockerfile").write_text(
        f"FROM {base_image}\n{first}\nRUN echo '{marker} <&>' && echo to-stderr >&2\n"
    )
    meta = tmp_path / "meta.json"
    proc = ow(
        root,
        "build",
        "--progress=rawjson",
        "--build-arg",
        "NOBODY_USES_ME=1",
        "--output",
        f"type=oci,dest={tmp_path / 'img.tar'}",
        "--metadata-file",
        str(meta),
        str(ctx),
    )
    statuses = _solve_statuses(proc.stderr)  # nothing but SolveStatus lines

    vertexes = [v for s in statuses for v in s.get("vertexes", [])]
    names = {v["digest"]: v["name"] for v in vertexes}
    assert len(set(names.values())) == len(names)  # one digest per step
    by_name = {n: d for d, n in names.items()}
    run = by_name["[3/3] RUN echo '" + marker + " <&>' && echo to-stderr >&2"]
    cached = [v for v in vertexes if v.get("cached")]
    assert [v["name"] for v in cached if v["name"].endswith(first)] == ["[2/3] " + first]
    # every step ends completed, none failed; completed is not before started
    for digest in names:
        last = [v for v in vertexes if v["digest"] == digest][-1]
        assert "error" not in last
        assert _time(last["completed"]) >= _time(last["started"])

    logs = [lg for s in statuses for lg in s.get("logs", [])]
    assert {lg["vertex"] for lg in logs} == {run}
    stdout = b"".join(_b64(lg["data"]) for lg in logs if lg["stream"] == 1)
    stderr = b"".join(_b64(lg["data"]) for lg in logs if lg["stream"] == 2)
    assert stdout == f"{marker} <&>\n".encode()
    assert stderr == b"to-stderr\n"
    # Go's encoder escapes <, > and & (and the raw text shows it)
    assert "\\u003c" in proc.stderr and "<" not in proc.stderr

    warnings = [w for s in statuses for w in s.get("warnings", [])]
    shorts = [_b64(w["short"]).decode() for w in warnings]
    assert any("NOBODY_USES_ME" in s for s in shorts), shorts

    image = json.loads(meta.read_text())["containerimage.digest"]
    exported = [
        st
        for s in statuses
        for st in s.get("statuses", [])
        if image in st["id"] and names.get(st.get("vertex", "")) == "exporting to oci image format"
    ]
    assert exported, "no status names the written image under its export step"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if re.match(r"#\d+ ERROR", line)]


def _step_number(stderr: str, name: str) -> str:
    found = [line.split(" ", 1)[0] for line in stderr.splitlines() if line.endswith(" " + name)]
    assert len(found) == 1, f"{name!r} not announced once in:\n{stderr}"
    return found[0]


def _unresolvable(case: str, registry: str) -> tuple[str, list[str]]:
    """(a FROM reference, words its error must say)"""
    if case == "refused":
        port = _free_port()
        return f"127.0.0.1:{port}/x:latest", ["connection refused", f"127.0.0.1:{port}"]
    if case == "dns":
        return "nosuch.invalid/x:latest", ["no such host", "nosuch.invalid"]
    return f"{registry}/nosuch/never:latest", ["not found", f"{registry}/nosuch/never:latest"]


def _no_resolver() -> str | None:
    """Why no DNS server answers here (None: one does, an unknown name is NXDOMAIN)."""
    try:
        socket.getaddrinfo("nosuch.invalid", 443)
    except socket.gaierror as exc:
        if exc.errno == socket.EAI_NONAME:
            return None
        return exc.strerror
    return "nosuch.invalid resolved"


@pytest.mark.parametrize("case", ["refused", "dns", "missing"])
def test_unresolvable_base_image_fails_its_load_metadata_step(
    case: str, tmp_path: Path, registry: str, require_root: None
) -> None:
    if case == "dns" and (why := _no_resolver()) is not None:
        # "no such host" is a DNS server's answer; without one (a --network=none container,
        # scripts/test-in-container) the lookup can only time out
        pytest.skip(f"no DNS server answers here ({why}): NXDOMAIN cannot be had")
    ref, words = _unresolvable(case, registry)
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "Dockerfile").write_text(f"FROM {ref}\nRUN true\n")
    root = tmp_path / "state"
    proc = ow(root, "build", "--progress=plain", str(ctx), check=False)
    assert proc.returncode == 1, proc.stderr
    n = _step_number(proc.stderr, f"[internal] load metadata for {ref}")
    (error,) = _error_lines(proc.stderr)  # one failed step, one line
    assert error.startswith(f"{n} ERROR: ")
    assert f"{n} DONE" not in proc.stderr
    last = proc.stderr.splitlines()[-1]
    assert last.startswith("ERROR: failed to solve: ")
    for text in (error, last):
        for word in words:
            assert word in text, text
    assert not _PYTHON_WORDS.search(proc.stderr), proc.stderr

    # rawjson: the same step's vertex carries the same reason
    proc = ow(root, "build", "--progress=rawjson", str(ctx), check=False)
    assert proc.returncode == 1
    json_lines, tail = proc.stderr.splitlines()[:-1], proc.stderr.splitlines()[-1]
    assert tail.startswith("ERROR: failed to solve: ")  # as buildx, the error follows
    vertexes = [v for s in _solve_statuses("\n".join(json_lines)) for v in s.get("vertexes", [])]
    failed = [v for v in vertexes if "error" in v]
    assert [v["name"] for v in failed] == [f"[internal] load metadata for {ref}"]
    assert failed[0]["error"] == error.split(" ERROR: ", 1)[1]


def test_tty_view_shows_the_failed_metadata_step_in_red(tmp_path: Path, require_root: None) -> None:
    port = _free_port()
    ref = f"127.0.0.1:{port}/x:latest"
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "Dockerfile").write_text(f"FROM {ref}\n")
    code, raw, _ = terminal_build(tmp_path / "state", ctx)
    assert code == 1
    final = raw[raw.rindex("[+] Building") :]
    # red (SGR 31) from the start of the row that names the step as failed
    assert re.search(rf"\x1b\[31m => ERROR \[internal\] load metadata for {re.escape(ref)} ", final)
    assert f"=> [internal] load metadata for {ref}" not in final  # never shown as done
    last = _ANSI.sub("", final).rstrip("\n").splitlines()[-1]
    assert last.startswith("ERROR: failed to solve: ")
    assert "connection refused" in last and f"127.0.0.1:{port}" in last


def test_failing_run_and_missing_copy_source_each_end_with_one_error_line(
    tmp_path: Path, base_image: str, require_root: None
) -> None:
    root = tmp_path / "state"
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "Dockerfile").write_text(f"FROM {base_image}\nRUN echo about to fail; exit 3\n")
    proc = ow(root, "build", "--progress=plain", str(ctx), check=False)
    assert proc.returncode == 1
    n = _step_number(proc.stderr, "[2/2] RUN echo about to fail; exit 3")
    (error,) = _error_lines(proc.stderr)
    assert error.startswith(f"{n} ERROR: ") and "exit code: 3" in error

    (ctx / "Dockerfile").write_text(f"FROM {base_image}\nCOPY not-there.txt /x\n")
    proc = ow(root, "build", "--progress=plain", str(ctx), check=False)
    assert proc.returncode == 1
    n = _step_number(proc.stderr, "[2/2] COPY not-there.txt /x")
    (error,) = _error_lines(proc.stderr)
    assert error.startswith(f"{n} ERROR: ") and "not-there.txt" in error and "not found" in error


def test_cancelled_run_ends_with_one_error_line(
    tmp_path: Path, base_image: str, require_root: None
) -> None:
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    step = f"RUN echo started && sleep {secrets.randbelow(8000) + 1000}"
    (ctx / "Dockerfile").write_text(f"FROM {base_image}\n{step}\n")
    # as root, or as the test user in the rootless leg
    cli = current_cli()
    cli.hand_over()
    cmd = cli.argv("build", "--root", str(tmp_path / "state"), "--progress=plain", str(ctx))
    with subprocess.Popen(
        cmd, stderr=subprocess.PIPE, text=True, env=cli.popen_env(), cwd=cli.home
    ) as proc:
        assert proc.stderr is not None
        seen = wait_for_line(proc, "started")
        cli.interrupt(proc, signal.SIGTERM)
        rest = proc.stderr.read()
        assert proc.wait(timeout=30) == 143  # 128 + SIGTERM, as a shell reports it
    stderr = "".join(seen) + rest
    n = _step_number(stderr, f"[2/2] {step}")
    assert _error_lines(stderr) == [f"{n} ERROR: cancelled"]
    assert f"{n} DONE" not in stderr


@pytest.mark.parametrize("how", ["flag", "env"])
def test_tty_progress_without_a_terminal_is_refused(how: str, tmp_path: Path) -> None:
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "Dockerfile").write_text("FROM scratch\n")
    root = tmp_path / "state"
    flags, env = (["--progress=tty"], {}) if how == "flag" else ([], {"BUILDKIT_PROGRESS": "tty"})
    proc = current_cli().run(
        "build", "--root", str(root), *flags, str(ctx), env=env, timeout=120, check=False
    )
    assert proc.returncode == 1
    # buildx (progressui.NewDisplay): the one error, nothing drawn, nothing built
    assert proc.stderr.splitlines() == [
        "ERROR: failed to get console: provided file is not a console"
    ]
    assert not root.exists()
