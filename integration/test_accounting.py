"""Per-step accounting (issue 11, item 4) on runc and crun, embedded and over the daemon:
a RUN that burns about a CPU second and allocates 100 MiB reports figures within 30% of
what the step measured itself (its shell's own utime+stime from /proc/$$/stat, dd's block
size), on the plain DONE line, in rawjson and in the metadata file's ``ociworker.steps``."""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

from ociworker.testing.daemon import spawn_daemon
from test_build import ow, write_context

MIB = 1 << 20
#: a busybox shell loop of about one CPU second on the CI host (no fork: the
#: shell's own utime+stime is the loop's CPU time), then a 100 MiB dd block
BURN = (
    "RUN i=0; while [ $i -lt 800000 ]; do i=$((i+1)); done; "
    'echo ticks=$(cut -d" " -f14,15 /proc/$$/stat); '
    "dd if=/dev/zero of=/dev/null bs=100M count=1"
)
STEP = "[2/2] " + BURN
_TICKS = re.compile(r"ticks=(\d+) (\d+)")


def _measured_cpu(log_text: str) -> float:
    m = _TICKS.search(log_text)
    assert m, f"the step printed no ticks line:\n{log_text[-2000:]}"
    seconds = (int(m.group(1)) + int(m.group(2))) / os.sysconf("SC_CLK_TCK")
    # the loop is sized to burn about a second: far from it, the test proves little
    assert 0.4 < seconds < 3.0, f"the loop burnt {seconds}s of CPU"
    return seconds


def _assert_close(reported: dict[str, int | float], cpu: float) -> None:
    assert abs(float(reported["cpu_seconds"]) - cpu) <= 0.3 * cpu, (reported, cpu)
    assert abs(int(reported["peak_memory_bytes"]) - 100 * MIB) <= 0.3 * 100 * MIB, reported
    # the block layer's figures are there (zero here: /dev/zero to /dev/null)
    assert isinstance(reported["read_bytes"], int) and isinstance(reported["written_bytes"], int)


def _done_line(stderr: str) -> str:
    n = next(m.group(1) for m in re.finditer(r"^#(\d+) (.*)$", stderr, re.M) if m[2] == STEP)
    return next(line for line in stderr.splitlines() if line.startswith(f"#{n} DONE "))


def test_plain_and_metadata_figures_match_what_the_step_used(
    runtime: str, tmp_path: Path, base_image: str, require_root: None
) -> None:
    ctx = write_context(tmp_path, f"FROM {base_image}\n{BURN}\n")
    meta = tmp_path / "meta.json"
    proc = ow(
        tmp_path / "root",
        "build",
        "--progress",
        "plain",
        "--runtime",
        runtime,
        "--metadata-file",
        str(meta),
        str(ctx),
    )
    cpu = _measured_cpu(proc.stderr)
    steps = json.loads(meta.read_text())["ociworker.steps"]
    assert list(steps) == [STEP]  # only RUN steps that ran have figures
    _assert_close(steps[STEP], cpu)
    # The DONE line shows the same figures, rounded as a person reads them.
    figures = steps[STEP]
    want = f"(cpu {figures['cpu_seconds']:.1f}s, mem {figures['peak_memory_bytes'] / MIB:.0f}MiB)"
    assert re.fullmatch(r"#\d+ DONE \d+\.\ds " + re.escape(want), _done_line(proc.stderr))


def test_rawjson_carries_the_figures_as_a_status_of_the_step(
    tmp_path: Path, base_image: str, require_root: None
) -> None:
    ctx = write_context(tmp_path, f"FROM {base_image}\n{BURN}\n")
    proc = ow(tmp_path / "root", "build", "--progress", "rawjson", str(ctx))
    objs = [json.loads(line) for line in proc.stderr.splitlines()]
    digest = next(v["digest"] for o in objs for v in o.get("vertexes", []) if v["name"] == STEP)
    logs = b"".join(
        base64.b64decode(lg["data"])
        for o in objs
        for lg in o.get("logs", [])
        if lg["vertex"] == digest
    )
    usage = [
        s for o in objs for s in o.get("statuses", []) if s["id"].startswith("resource usage:")
    ]
    assert [s["vertex"] for s in usage] == [digest]
    m = re.fullmatch(r"resource usage: cpu (\d+\.\d)s, mem (\d+)MiB", usage[0]["id"])
    assert m, usage[0]
    cpu = _measured_cpu(logs.decode())
    assert abs(float(m[1]) - cpu) <= 0.3 * cpu + 0.05, (m[0], cpu)  # 0.05: the rounding
    assert abs(int(m[2]) - 100) <= 30, m[0]


def test_daemon_streams_the_figures_to_the_client(
    tmp_path: Path, base_image: str, require_root: None
) -> None:
    sock = tmp_path / "d.sock"
    args = ("--addr", f"unix://{sock}", "--root", str(tmp_path / "droot"))
    daemon = spawn_daemon(args, tmp_path / "daemon.log")
    try:
        ctx = write_context(tmp_path, f"FROM {base_image}\n{BURN}\n")
        meta = tmp_path / "meta.json"
        cmd = [sys.executable, "-m", "ociworker", "build", "--addr", f"unix://{sock}"]
        proc = subprocess.run(
            [*cmd, "--progress", "plain", "--metadata-file", str(meta), str(ctx)],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
    finally:
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=60) == 0
    cpu = _measured_cpu(proc.stderr)
    _assert_close(json.loads(meta.read_text())["ociworker.steps"][STEP], cpu)
    assert re.fullmatch(r"#\d+ DONE \d+\.\ds \(cpu \d+\.\ds, mem \d+MiB\)", _done_line(proc.stderr))
