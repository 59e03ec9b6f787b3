"""Progress as a user sees it: the rich tty view under a real pseudo-terminal,
and the per-step log cap on a RUN that prints more than it."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import struct
import subprocess
import termios
from collections.abc import Callable
from pathlib import Path

from conftest import (
    LEGS_MARK,
    assert_lists_steps,
    buildkit_steps,
    current_cli,
    normalize_step_name,
)
from test_build import ow

pytestmark = LEGS_MARK

_ANSI_RE = re.compile(r"\x1b(?:\[[0-?]*[ -/]*[@-~]|\][^\x07]*\x07|[@-Z\\-_])")


def _build_on_a_terminal(
    root: Path,
    ctx: Path,
    *flags: str,
    env: dict[str, str] | None = None,
    on_output: Callable[[str, subprocess.Popen[bytes]], None] | None = None,
) -> tuple[int, str, str]:
    """Run ``ociworker build`` with stderr on a pty (as in a terminal); (exit code,
    terminal output with escape sequences removed, stdout). ``on_output`` sees
    the raw output so far after each read."""
    code, raw, out = terminal_build(root, ctx, *flags, env=env, on_output=on_output)
    return code, _ANSI_RE.sub("", raw), out


def terminal_build(
    root: Path,
    ctx: Path,
    *flags: str,
    env: dict[str, str] | None = None,
    on_output: Callable[[str, subprocess.Popen[bytes]], None] | None = None,
) -> tuple[int, str, str]:
    """``_build_on_a_terminal``, with the terminal output as written (escapes kept)."""
    master, slave = pty.openpty()
    # 120x40, so rich lays out as in a real terminal rather than at 80 columns
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    # as root, or as the test user in the rootless leg
    cli = current_cli()
    cli.hand_over()
    extra = {"TERM": "xterm-256color", **(env or {})}
    cmd = cli.argv("build", "--root", str(root), *flags, str(ctx), env=extra)
    run_env = cli.popen_env(extra)
    if env is None:
        run_env.pop("BUILDKIT_PROGRESS", None)
    with subprocess.Popen(
        cmd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=slave,
        env=run_env,
        cwd=cli.home,
    ) as proc:
        os.close(slave)
        chunks: list[bytes] = []
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the child closed its end
                break
            if not data:
                break
            chunks.append(data)
            if on_output is not None:
                on_output(b"".join(chunks).decode("utf-8", "replace"), proc)
        os.close(master)
        assert proc.stdout is not None
        out = proc.stdout.read().decode()
        code = proc.wait(timeout=600)
    raw = b"".join(chunks).decode("utf-8", "replace").replace("\r\n", "\n")
    return code, raw, out


def _final_frame(text: str) -> str:
    return text[text.rindex("[+] Building") :]


def test_tty_view_on_a_terminal(
    tmp_path: Path,
    base_image: str,
    require_root: None,
    mounts_under: Callable[[Path], list[Path]],
) -> None:
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "Dockerfile").write_text(
        f"FROM {base_image}\nRUN echo hello from the build\nRUN echo second > /f\n"
    )
    root = tmp_path / "state"
    # auto on a terminal is the tty view
    code, term, _ = _build_on_a_terminal(root, ctx)
    assert code == 0, term[-3000:]
    final = _final_frame(term)
    assert re.match(r"\[\+\] Building \d+\.\ds \((\d+)/\1\) FINISHED", final), final[:200]
    lines = final.splitlines()
    assert any(
        re.match(r" => \[2/3\] RUN echo hello from the build +\d+\.\ds$", ln) for ln in lines
    )
    assert any(re.match(r" => \[3/3\] RUN echo second > /f +\d+\.\ds$", ln) for ln in lines)
    assert "# hello from the build" not in final  # collapsed once done
    # second build: every step BuildKit lists for the Dockerfile, in order, each CACHED
    code, term, _ = _build_on_a_terminal(root, ctx, "--progress", "tty")
    assert code == 0
    final = _final_frame(term)
    shown = [
        m.groups()
        for m in re.finditer(r"^ => (CACHED |ERROR )?(.*?) *\d+\.\ds$", final, re.M)
        if not m.group(2).startswith("[internal]")
    ]
    want = [normalize_step_name(st.name) for st in buildkit_steps((ctx / "Dockerfile").read_text())]
    assert [(state, normalize_step_name(name)) for state, name in shown] == [
        ("CACHED ", name) for name in want
    ], final
    assert mounts_under(root) == []


def test_tty_view_of_a_failing_step(
    tmp_path: Path,
    base_image: str,
    require_root: None,
    mounts_under: Callable[[Path], list[Path]],
) -> None:
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "Dockerfile").write_text(
        f"FROM {base_image}\nRUN echo ok\n"
        # one stream only: the order of stdout against stderr is not defined
        "RUN for i in $(seq 1 30); do echo line $i; done; echo the cause; exit 3\n"
    )
    root = tmp_path / "state"
    code, term, _ = _build_on_a_terminal(root, ctx, "--progress", "tty")
    assert code == 1
    final = _final_frame(term)
    assert re.search(r" => ERROR \[3/3\] RUN for i in", final)
    block = final[final.index(" > [3/3] RUN for i in") :]
    # the step's last lines stay visible, the earlier ones are gone
    assert "line 30\nthe cause\n------" in block
    assert "line 1\n" not in block
    assert "ERROR: failed to solve:" in final and "exit code: 3" in final
    assert mounts_under(root) == []


def test_ctrl_c_prints_the_final_state_and_restores_the_cursor(
    tmp_path: Path,
    base_image: str,
    require_root: None,
    mounts_under: Callable[[Path], list[Path]],
) -> None:
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "Dockerfile").write_text(f"FROM {base_image}\nRUN echo started; sleep 60\n")
    root = tmp_path / "state"
    raw_seen: list[str] = []
    sent: list[bool] = []

    def interrupt_once_running(raw: str, proc: subprocess.Popen[bytes]) -> None:
        raw_seen[:] = [raw]
        if not sent and "# started" in _ANSI_RE.sub("", raw):
            current_cli().interrupt(proc)  # what Ctrl-C in the terminal sends
            sent.append(True)

    code, term, _ = _build_on_a_terminal(
        root, ctx, "--progress", "tty", on_output=interrupt_once_running
    )
    assert code == 130
    final = _final_frame(term)
    assert final.startswith("[+] Building") and "FINISHED" in final
    assert re.search(r" => ERROR \[2/2\] RUN echo started; sleep 60", final)
    assert "ERROR: build cancelled" in final
    # rich hid the cursor while live; it is shown again after the last frame
    last = raw_seen[0]
    assert last.rindex("\x1b[?25h") > last.rindex("[+] Building")
    assert mounts_under(root) == []


def test_plain_when_stderr_is_not_a_terminal_and_rich_never_loads(
    tmp_path: Path, base_image: str, require_root: None
) -> None:
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "Dockerfile").write_text(f"FROM {base_image}\nRUN true\n")
    root = tmp_path / "state"
    ow(root, "build", str(ctx))
    cli = current_cli()
    cmd = cli.argv("build", "--root", str(root), str(ctx), pyflags=["-X", "importtime"])
    env = {k: v for k, v in cli.popen_env().items() if k != "BUILDKIT_PROGRESS"}
    cli.hand_over()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True, cwd=cli.home)
    progress = "\n".join(ln for ln in proc.stderr.splitlines() if not ln.startswith("import time:"))
    assert "\n#1 [internal] load build definition" in progress
    assert_lists_steps(progress, buildkit_steps((ctx / "Dockerfile").read_text()), {})
    assert "[+] Building" not in progress
    assert not [ln for ln in proc.stderr.splitlines() if "import time" in ln and "rich" in ln]


def test_log_cap_clips_a_chatty_step_once(
    tmp_path: Path, base_image: str, require_root: None
) -> None:
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    line = "0123456789" * 4 + "abcdefghi"  # 49 characters + newline = 50 bytes
    (ctx / "Dockerfile").write_text(
        f"FROM {base_image}\nRUN yes {line} | head -c {3 << 20}\nRUN echo after\n"
    )
    proc = ow(tmp_path / "state", "build", "--progress", "plain", str(ctx))
    err = proc.stderr
    assert err.count("[output clipped, log limit 2MiB reached]") == 1
    step = next(m.group(1) for m in re.finditer(r"^#(\d+) \[2/3\] RUN yes", err, re.M))
    payload = 0
    for ln in err.splitlines():
        m = re.match(rf"#{step} \d+\.\d+ (.*)$", ln)
        if m and m.group(1) and line.startswith(m.group(1)[:10]):
            payload += len(m.group(1)) + 1
    # the first 2 MiB got through (give or take the cut line's newline), no more
    assert abs(payload - (2 << 20)) <= 50, payload
    assert re.search(rf"^#{step} DONE", err, re.M)
    # later steps still log: the next step's own output line, under its own number
    after = next(m.group(1) for m in re.finditer(r"^#(\d+) \[3/3\] RUN echo after$", err, re.M))
    assert re.search(rf"^#{after} \d+\.\d+ after$", err, re.M), err[-2000:]
