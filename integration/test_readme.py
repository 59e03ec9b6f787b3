"""README.md is tested: every command block runs, as a user would run it.

The fenced blocks of README.md follow one rule, by their info string (checked by
``test_every_block_has_a_known_language``, so no block escapes it silently):

- ``sh``: commands. Each block is one test, run by ``bash -e -o pipefail`` and must exit 0.
- ``python``: runs with the venv's interpreter, against a daemon this test starts
  (``ociworker serve``, address in ``$OCIWORKER_HOST``); the daemon must then stop with 0.
- ``text``: never run. A synopsis, a file layout, a sample -- or, when it follows an ``sh``
  or ``python`` block with nothing but blank lines between, the output that block prints.
- ``console``: never run. Commands too long or too heavy for this test (a whole suite in a
  container), shown as a terminal session.

Expected output (a ``text`` block right after a command block) is checked against the
block's stdout and stderr together. Blank lines are ignored; every other line must match
its own output line (order is free: parallel steps print in any order). Whitespace runs
match any whitespace run, and these parts of a line match loosely, because they change from
run to run:

- ``...`` matches any text (the README's own ellipsis); after a space, also nothing;
- ``#N`` at the start of a line matches any step number, but one ``N`` stands for one
  number within a block (``#5 [2/4] RUN ...`` and ``#5 CACHED`` must be the same step);
- a run of 12 or more hex digits (digests, cache record IDs) matches any such run;
- a decimal number with a fraction (timings ``0.038``/``0.1s``, sizes ``2.05MB``) matches
  any such number.

Everything else is literal: exit codes, step names, counts.

Each block runs from a fresh copy of the repository (so what it writes lands in the copy),
with ``.venv`` there a link to this interpreter's venv and its ``bin`` first on PATH, a
temporary ``$HOME`` and ``$TMPDIR``, and ``$OCIWORKER_ROOT`` an empty state dir. The README's
RUN --mount example names files and a secret of the user's: the temporary HOME holds an
``.npmrc`` and an ssh key ``.ssh/deploy_ed25519`` made here, ``$GH_TOKEN`` is set, and an
``ssh-agent`` of this test serves ``$SSH_AUTH_SOCK`` for ``--ssh default``. The benchmark
block reads ``../shared/bench`` next to the repository: the copy gets a link to this
checkout's, and fails without it (a missing prerequisite fails, it never skips).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from ociworker.testing.daemon import spawn_daemon

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
VENV = Path(sys.prefix)
LANGUAGES = ("sh", "python", "text", "console")
BLOCK_TIMEOUT = 300.0

# Command blocks the suite cannot run, by their first line's command, with the reason. Keep
# it short: everything else runs.
NOT_RUN = {
    "scripts/test": "it is the suite itself (ruff, mypy and this very pytest run); CI runs it",
}

# What the copy leaves out: version control, the venv (linked instead), local state, caches
# and benchmark results, none of which a README command may rely on.
_SKIP_NAMES = {
    ".git",
    ".venv",
    ".state",
    "__pycache__",
    ".mypy_cache",
    ".ruff_cache",
    ".pytest_cache",
    # scripts/make-wheelhouse's download for the worker image (tens of MB; no block uses it)
    "wheelhouse",
}


def _not_copied(directory: str, names: list[str]) -> set[str]:
    skip = {n for n in names if n in _SKIP_NAMES or n.endswith(".egg-info")}
    if Path(directory) == REPO / "benchmarks":
        skip.add("out")
    return skip


@dataclass(frozen=True)
class Block:
    index: int  # position among all fenced blocks of the README, from 0
    line: int  # line number of the opening fence, from 1
    language: str
    text: str
    output: str | None  # the text block right after it, if any

    @property
    def first_line(self) -> str:
        return self.text.strip().splitlines()[0] if self.text.strip() else ""

    @property
    def command(self) -> str:
        """The first line without its comment: what ``NOT_RUN`` names."""
        return self.first_line.split(" #")[0].strip()

    @property
    def id(self) -> str:
        slug = re.sub(r"[^A-Za-z0-9]+", "-", self.first_line).strip("-")[:40]
        return f"{self.index:02d}-{slug}"


def parse_blocks(markdown: str) -> list[Block]:
    """The fenced blocks of ``markdown``, each with the text block that directly follows."""
    raw: list[tuple[int, str, str]] = []
    adjacent: list[bool] = []  # only blank lines between this block and the previous one
    lines = markdown.splitlines()
    i = 0
    gap_blank = False
    while i < len(lines):
        line = lines[i]
        if line.startswith("```"):
            start, language = i, line[3:].strip().split(" ")[0]
            i += 1
            body: list[str] = []
            while i < len(lines) and lines[i].rstrip() != "```":
                body.append(lines[i])
                i += 1
            if i == len(lines):
                raise AssertionError(f"README.md:{start + 1}: fence never closed")
            raw.append((start + 1, language, "\n".join(body) + "\n"))
            adjacent.append(gap_blank)
            gap_blank = True  # until a non-blank line shows up
        elif line.strip():
            gap_blank = False
        i += 1
    blocks: list[Block] = []
    for n, (line_no, language, text) in enumerate(raw):
        nxt = n + 1
        output = None
        if nxt < len(raw) and raw[nxt][1] == "text" and adjacent[nxt] and language != "text":
            output = raw[nxt][2]
        blocks.append(Block(n, line_no, language, text, output))
    return blocks


BLOCKS = parse_blocks(README.read_text(encoding="utf-8"))
RUN_BLOCKS = [b for b in BLOCKS if b.language in ("sh", "python") and b.command not in NOT_RUN]


# -- the output rule ----------------------------------------------------------------------

_LOOSE = re.compile(r"(?P<any>\.\.\.)|(?P<hex>[0-9a-f]{12,})|(?P<dec>\d+\.\d+)")
_STEP = re.compile(r"#(\d+)(?: |$)")


@dataclass(frozen=True)
class _Line:
    step: str | None  # the "#N" step number at its start, if any
    rest: str  # the line after it, whitespace runs as one space


def _split(line: str) -> _Line:
    line = " ".join(line.split())
    m = _STEP.match(line)
    if m is None:
        return _Line(None, line)
    return _Line(m.group(1), line[m.end() :])


@dataclass(frozen=True)
class _Expected:
    text: str
    step: str | None
    pattern: re.Pattern[str]

    @classmethod
    def parse(cls, text: str) -> _Expected:
        line = _split(text)
        parts: list[str] = []
        pos = 0
        for tok in _LOOSE.finditer(line.rest):
            literal = line.rest[pos : tok.start()]
            if tok.lastgroup == "any" and literal.endswith(" "):
                # "RUN make ..." also matches "RUN make": the ellipsis takes its space along
                parts.append(re.escape(literal[:-1]) + "(?: .*)?")
            else:
                parts.append(re.escape(literal))
                parts.append(
                    {"any": ".*", "hex": "[0-9a-f]{12,}", "dec": r"\d+\.\d+"}[str(tok.lastgroup)]
                )
            pos = tok.end()
        parts.append(re.escape(line.rest[pos:]))
        return cls(text, line.step, re.compile("".join(parts)))

    def fits(self, got: _Line) -> bool:
        if (self.step is None) != (got.step is None):
            return False
        return self.pattern.fullmatch(got.rest) is not None


def missing_output(expected: str, output: str) -> str | None:
    """None when ``output`` shows every line of ``expected`` (the rule above), else the
    first expected line no consistent assignment could place."""
    want = [_Expected.parse(x) for x in expected.splitlines() if x.strip()]
    got = [_split(x) for x in output.splitlines() if x.strip()]
    deepest = 0

    def place(i: int, used: frozenset[int], steps: dict[str, str]) -> bool:
        nonlocal deepest
        deepest = max(deepest, i)
        if i == len(want):
            return True
        e = want[i]
        for j, g in enumerate(got):
            if j in used or not e.fits(g):
                continue
            bound = steps
            if e.step is not None and g.step is not None:
                if e.step in steps:
                    if steps[e.step] != g.step:
                        continue
                elif g.step in steps.values():
                    continue  # another #N of the README already stands for this step
                else:
                    bound = {**steps, e.step: g.step}
            if place(i + 1, used | {j}, bound):
                return True
        return False

    return None if place(0, frozenset(), {}) else want[deepest].text


# -- running a block ----------------------------------------------------------------------


def _stamp_ok(copy: Path) -> bool:
    """Whether scripts/setup-host, run from the copy, finds the venv up to date. Else it
    would ``pip install -e`` the temporary copy into the shared venv; this mirrors its
    ``setup_venv`` stamp (pyproject.toml and the interpreter's -VV)."""
    stamp = VENV / ".ociworker-installed"
    if not stamp.is_file():
        return False
    vv = subprocess.run(
        [str(VENV / "bin" / "python"), "-VV"], capture_output=True, check=True
    ).stdout
    want = hashlib.sha256((copy / "pyproject.toml").read_bytes() + vv).hexdigest()
    return stamp.read_text().strip() == want


@dataclass(frozen=True)
class Place:
    repo: Path  # the copy the block runs in
    env: dict[str, str]
    tmp: Path  # $TMPDIR, short enough for unix socket paths


@pytest.fixture
def place(
    tmp_path: Path,
    state_dir: Path,
    require_root: None,
    registry: str,
    mounts_under: Callable[[Path], list[Path]],
) -> Iterator[Place]:
    if not (VENV / "bin" / "ociworker").is_file():
        pytest.fail(f"no ociworker in {VENV}/bin: run scripts/setup-host (as root) first")
    repo = tmp_path / "work" / "repo"
    shutil.copytree(REPO, repo, ignore=_not_copied, symlinks=True)
    (repo / ".venv").symlink_to(VENV)
    if not _stamp_ok(repo):
        pytest.fail(
            f"{VENV} was not installed from this pyproject.toml: run scripts/setup-host first"
        )
    shared = REPO.parent / "shared"
    if shared.is_dir():
        (repo.parent / "shared").symlink_to(shared)

    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True, mode=0o700)
    (home / ".npmrc").write_text("//registry.npmjs.org/:_authToken=npm-readme-test\n")
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(home / ".ssh/deploy_ed25519")],
        check=True,
        capture_output=True,
    )
    tmp = Path(tempfile.mkdtemp(prefix="readme-"))
    agent_sock = tmp / "agent.sock"
    agent = subprocess.Popen(
        ["ssh-agent", "-D", "-a", str(agent_sock)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while not agent_sock.exists():
            if agent.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"ssh-agent did not start (exit {agent.poll()})")
            time.sleep(0.02)
        env = {
            k: v
            for k, v in os.environ.items()
            # What would point a README command at another daemon, progress mode, login or
            # agent than the ones set up here.
            if k not in ("OCIWORKER_HOST", "BUILDKIT_PROGRESS", "DOCKER_CONFIG", "VIRTUAL_ENV")
        }
        env.update(
            HOME=str(home),
            TMPDIR=str(tmp),
            PATH=f"{VENV / 'bin'}{os.pathsep}{os.environ.get('PATH', '/usr/bin:/bin')}",
            OCIWORKER_ROOT=str(state_dir),
            GH_TOKEN="gh-readme-test",
            SSH_AUTH_SOCK=str(agent_sock),
        )
        yield Place(repo, env, tmp)
    finally:
        agent.terminate()
        agent.wait()
        for where in (repo, tmp):
            leaked = mounts_under(where)
            for point in leaked:
                subprocess.run(["umount", "--lazy", str(point)], check=False)
            assert not leaked, f"a README block left mounts: {[str(p) for p in leaked]}"
        shutil.rmtree(tmp)


@dataclass(frozen=True)
class Ran:
    code: int
    output: str  # stdout and stderr, interleaved as written
    left: list[str]  # processes of the block still running after it exited (then stopped)


def _run(argv: list[str], place: Place) -> Ran:
    """Run ``argv`` in its own process group, until its first process exits. Output goes to
    a file, not a pipe: a background process a failed block leaves behind must not keep
    the test waiting for the pipe's end."""
    log = place.tmp / "block-output.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            argv,
            cwd=place.repo,
            env=place.env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        code = proc.wait(timeout=BLOCK_TIMEOUT)
    except subprocess.TimeoutExpired:
        _stop_group(proc.pid)
        proc.wait()
        pytest.fail(f"timed out after {BLOCK_TIMEOUT:.0f}s:\n{log.read_text(errors='replace')}")
    left = _stop_group(proc.pid)
    return Ran(code, log.read_text(errors="replace"), left)


def _group(pgid: int) -> list[str]:
    """Live (not zombie) processes of group ``pgid``, as "PID COMMAND"."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
            cmdline = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue  # exited while we looked
        if int(fields[2]) == pgid and fields[0] != "Z":
            found.append(f"{stat.parent.name} {cmdline.decode(errors='replace').strip()}")
    return found


def _stop_group(pgid: int) -> list[str]:
    """What of process group ``pgid`` still runs a moment after its leader exited, after
    stopping it (SIGTERM, then SIGKILL): those are the block's leftovers."""
    deadline = time.monotonic() + 2  # a child may be finishing its exit
    while (left := _group(pgid)) and time.monotonic() < deadline:
        time.sleep(0.05)
    if not left:
        return []
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    while _group(pgid) and time.monotonic() < deadline:
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)
    return left


def _run_python(block: Block, place: Place) -> Ran:
    script = place.tmp / "readme_block.py"
    script.write_text(block.text)
    log = place.tmp / "daemon.log"
    addr = f"unix://{place.tmp}/ociworker.sock"
    daemon = spawn_daemon(["--addr", addr, "--root", place.env["OCIWORKER_ROOT"]], log, timeout=60)
    try:
        ran = _run([str(VENV / "bin" / "python"), str(script)], _with(place, addr))
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon_code = daemon.wait(timeout=60)
    assert daemon_code == 0, f"the daemon exited {daemon_code}:\n{log.read_text()}"
    return ran


def _with(place: Place, addr: str) -> Place:
    return Place(place.repo, {**place.env, "OCIWORKER_HOST": addr}, place.tmp)


@pytest.mark.parametrize("block", RUN_BLOCKS, ids=[b.id for b in RUN_BLOCKS])
def test_readme_block(block: Block, place: Place) -> None:
    if block.language == "python":
        ran = _run_python(block, place)
    else:
        script = place.tmp / "readme_block.sh"
        script.write_text(block.text)
        ran = _run(["bash", "-e", "-o", "pipefail", str(script)], place)
    where = f"README.md:{block.line} ({block.language} block)"
    assert ran.code == 0, f"{where} exited {ran.code}:\n{block.text}\n--- output ---\n{ran.output}"
    assert not ran.left, f"{where} left processes running: {ran.left}\n{ran.output}"
    if block.output is not None:
        missing = missing_output(block.output, ran.output)
        assert missing is None, (
            f"{where} did not print the line the README shows after it:\n  {missing}\n"
            f"--- output ---\n{ran.output}"
        )


# -- the rule itself ----------------------------------------------------------------------


def test_every_block_has_a_known_language() -> None:
    unknown = [f"README.md:{b.line}: {b.language!r}" for b in BLOCKS if b.language not in LANGUAGES]
    assert not unknown, f"fence each block as one of {LANGUAGES}: {unknown}"


def test_not_run_names_real_blocks() -> None:
    # A stale entry would hide nothing today but could hide a renamed block tomorrow.
    firsts = {b.command for b in BLOCKS if b.language in ("sh", "python")}
    assert set(NOT_RUN) <= firsts, sorted(set(NOT_RUN) - firsts)
    assert len(RUN_BLOCKS) >= 8, [b.id for b in RUN_BLOCKS]


def test_output_blocks_are_found() -> None:
    # The README's error example must carry its sample output into the test.
    errors = [b for b in RUN_BLOCKS if "RUN exit 3" in b.text]
    assert len(errors) == 1 and errors[0].output is not None
    assert "exit code: 1" in errors[0].output


SAMPLE = """\
#5 [2/2] RUN make ...
#5 0.038 built in 1.5s
#5 DONE 0.1s
image digest: sha256:5f7b8c9694fd
"""


@pytest.mark.parametrize(
    ("output", "missing"),
    [
        (
            "#7 [2/2] RUN make all\n#7 0.210 built in 0.2s\n#7 DONE 0.3s\n"
            "image digest: sha256:0123456789abcdef\n",
            None,
        ),
        # step lines in another order, another whitespace
        (
            "image digest:   sha256:0123456789abcdef\n#7 DONE 0.3s\n#7 [2/2] RUN make\n"
            "#7 0.210 built   in 0.2s\n",
            None,
        ),
        # the log line belongs to another step than the RUN line
        (
            "#7 [2/2] RUN make all\n#8 0.210 built in 0.2s\n#7 DONE 0.3s\n"
            "image digest: sha256:0123456789abcdef\n",
            "#5 0.038 built in 1.5s",
        ),
        # an integer is literal: [2/3] is not [2/2]
        (
            "#7 [2/3] RUN make all\n#7 0.210 built in 0.2s\n#7 DONE 0.3s\n"
            "image digest: sha256:0123456789abcdef\n",
            "#5 [2/2] RUN make ...",
        ),
        # a short hex string is not a digest
        (
            "#7 [2/2] RUN make\n#7 0.2 built in 0.2s\n#7 DONE 0.3s\nimage digest: sha256:01\n",
            "image digest: sha256:5f7b8c9694fd",
        ),
    ],
    ids=["matches", "any-order", "other-step", "integer-literal", "short-hex"],
)
def test_output_rule(output: str, missing: str | None) -> None:
    assert missing_output(SAMPLE, output) == missing
