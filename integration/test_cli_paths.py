"""Bad ``--output`` values and bad paths, as a user meets them on the command
line: exit code 1, one ``ERROR:`` line naming the culprit (never a traceback),
and nothing created or changed (the context, the directories around the paths,
the state dir, no temp files). The expectations are buildx's: it refuses an
output without ``type=``, a file output whose dest is a directory, and creates
no parent of ``--iidfile`` / ``--metadata-file`` / a file output."""

from __future__ import annotations

import os
import site
import subprocess
import sys
from pathlib import Path

import pytest

import ociworker
from test_build import ow, write_context

SRC = Path(ociworker.__file__).parent.parent


def _listing(top: Path) -> list[str]:
    return sorted(str(p.relative_to(top)) for p in top.rglob("*"))


def _run(
    cwd: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ociworker", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


def _assert_refused(proc: subprocess.CompletedProcess[str], *fragments: str) -> str:
    assert proc.returncode == 1, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("ERROR: "), proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert proc.stdout == ""
    return lines[0]


@pytest.fixture
def ctx(tmp_path: Path) -> Path:
    # a build that would succeed (and, with -o "", write its root filesystem here)
    c = tmp_path / "ctx"
    c.mkdir()
    (c / "Dockerfile").write_text("FROM scratch\nCOPY a.txt /a.txt\n")
    (c / "a.txt").write_text("a\n")
    return c


@pytest.mark.parametrize(
    ("output", "message"),
    [
        # buildx: csv of "" has no fields -> an error, never "the current directory"
        ("", 'invalid output ""'),
        # buildx: "type is required for output"
        ("dest=x.tar", "type is required for output 'dest=x.tar'"),
        ("typ=oci,dest=x.tar", "type is required for output 'typ=oci,dest=x.tar'"),
        # a push with nowhere to push to (buildx's words), or a push flag that is
        # neither true nor false: refused, never exit 0 having pushed nothing
        ("type=registry", "tag is needed when pushing to registry"),
        ("type=image,name=127.0.0.1:5000/x/y:1,push=yes", "push must be true or false"),
        # attributes no exporter of ours honours
        ("type=oci,dest=x.tar,tar=false", "unknown attribute 'tar' for type=oci"),
        ("type=local,dest=out,compression=zstd", "unknown attribute 'compression' for type=local"),
        ("type=oci,dest=x.tar,dest=y.tar", "dest is given twice"),
        ("type=oci,dest=", "dest is empty"),
    ],
)
def test_bad_outputs_are_refused_before_anything_runs(
    tmp_path: Path, ctx: Path, output: str, message: str, require_root: None
) -> None:
    root = tmp_path / "state"
    before = _listing(tmp_path)
    # run from the context, as in the issue: -o "" wrote the rootfs into it
    proc = _run(ctx, "build", "--root", str(root), "--progress", "plain", "-o", output, ".")
    _assert_refused(proc, message)
    assert _listing(tmp_path) == before
    assert not root.exists()


def test_two_outputs_on_one_dest_are_refused(tmp_path: Path, ctx: Path, require_root: None) -> None:
    root = tmp_path / "state"
    before = _listing(tmp_path)
    dest = tmp_path / "img.tar"
    proc = _run(
        ctx,
        *["build", "--root", str(root), "-o", f"type=oci,dest={dest}"],
        *["-o", f"type=docker,dest={tmp_path / 'ctx' / '..' / 'img.tar'}", "."],
    )
    _assert_refused(proc, "both write to")
    assert _listing(tmp_path) == before


def test_metadata_file_that_is_a_directory(tmp_path: Path, ctx: Path, require_root: None) -> None:
    # the case: --metadata-file /tmp failed after the build, leaving /.tmp.tmp
    root = tmp_path / "state"
    slash_before = sorted(os.listdir("/"))
    proc = _run(ctx, "build", "--root", str(root), "--metadata-file", "/tmp", ".")
    _assert_refused(proc, "--metadata-file /tmp is a directory")
    assert not [
        n for n in sorted(os.listdir("/")) if n not in slash_before and n.startswith(".tmp")
    ]
    assert not root.exists()  # refused before the worker opened its state dir
    # and a directory of ours, whose parent must stay as it was
    before = _listing(tmp_path)
    proc = _run(ctx, "build", "--root", str(root), "--metadata-file", str(ctx), ".")
    _assert_refused(proc, f"--metadata-file {ctx} is a directory")
    assert _listing(tmp_path) == before


@pytest.mark.parametrize("flag", ["--iidfile", "--metadata-file"])
def test_written_files_get_no_parent_created(
    tmp_path: Path, ctx: Path, flag: str, require_root: None
) -> None:
    root = tmp_path / "state"
    before = _listing(tmp_path)
    proc = _run(ctx, "build", "--root", str(root), flag, "/no/such/dir/iid", ".")
    _assert_refused(proc, f"{flag} /no/such/dir/iid", "/no/such/dir does not exist")
    assert not os.path.lexists("/no")
    nested = tmp_path / "new" / "iid"
    proc = _run(ctx, "build", "--root", str(root), flag, str(nested), ".")
    _assert_refused(proc, f"{flag} {nested}", "does not exist")
    assert _listing(tmp_path) == before


@pytest.mark.parametrize("typ", ["oci", "docker", "tar"])
def test_file_outputs_get_no_parent_and_are_no_directory(
    tmp_path: Path, ctx: Path, typ: str, require_root: None
) -> None:
    root = tmp_path / "state"
    before = _listing(tmp_path)
    proc = _run(
        ctx,
        "build",
        "--root",
        str(root),
        "-o",
        f"type={typ},dest={tmp_path / 'sub' / 'x.tar'}",
        ".",
    )
    _assert_refused(proc, f"type={typ}", f"directory {tmp_path / 'sub'} does not exist")
    proc = _run(ctx, "build", "--root", str(root), "-o", f"type={typ},dest={ctx}", ".")
    _assert_refused(proc, f"destination file {ctx} is a directory")  # buildx's words
    assert _listing(tmp_path) == before


def test_context_and_dockerfile_must_exist(tmp_path: Path, ctx: Path, require_root: None) -> None:
    root = tmp_path / "state"
    before = _listing(tmp_path)
    proc = _run(tmp_path, "build", "--root", str(root), "nope")
    _assert_refused(proc, 'unable to prepare context: path "nope" not found')
    proc = _run(tmp_path, "build", "--root", str(root), "-f", "ctx/Nope", "ctx")
    _assert_refused(proc, "-f ctx/Nope: no such file")
    proc = _run(tmp_path, "build", "--root", str(root), "-f", "ctx", "ctx")
    _assert_refused(proc, "is not a regular file")
    assert _listing(tmp_path) == before


def test_root_that_cannot_be_created(tmp_path: Path, ctx: Path, require_root: None) -> None:
    before = _listing(tmp_path)
    proc = _run(ctx, "build", "--root", "/proc/nope", ".")
    _assert_refused(proc, "--root /proc/nope cannot be created")
    assert not os.path.lexists("/proc/nope")
    assert _listing(tmp_path) == before


def test_root_that_is_a_file(tmp_path: Path, ctx: Path, require_root: None) -> None:
    a_file = tmp_path / "state"
    a_file.write_text("not a state dir\n")
    before = _listing(tmp_path)
    proc = _run(ctx, "build", "--root", str(a_file), ".")
    _assert_refused(proc, f"--root {a_file} is not a directory")
    assert a_file.read_text() == "not a state dir\n"
    assert _listing(tmp_path) == before


def _lines(path: str) -> list[str]:
    try:
        return Path(path).read_text().splitlines()
    except FileNotFoundError:
        return []


def _python_for_nobody() -> list[str]:
    """An interpreter user 65534 can run, with our source and dependencies on
    its path (a venv made from a Python under /root is not reachable)."""
    paths = os.pathsep.join([str(SRC), *site.getsitepackages()])
    probe = "import ociworker.cli"
    minor = f"python{sys.version_info.major}.{sys.version_info.minor}"
    for exe in (sys.executable, f"/usr/bin/{minor}"):
        proc = subprocess.run(
            [
                "setpriv",
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                "env",
                f"PYTHONPATH={paths}",
                exe,
                "-c",
                probe,
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode == 0:
            return ["env", f"PYTHONPATH={paths}", "HOME=/nonexistent", exe]
    pytest.fail(f"no Python that uid 65534 can run with {paths} (last: {proc.stderr.strip()})")


def test_a_non_root_user_gets_a_clear_error(tmp_path: Path, ctx: Path, require_root: None) -> None:
    # A user builds rootless (integration/test_rootless.py); one without a
    # subordinate id range (nobody has none) is told what is missing and the fix,
    # and neither root's state dir nor any of the user's is made.
    if any(line.split(":")[0] in ("nobody", "65534") for line in _lines("/etc/subuid")):
        pytest.fail("nobody has a subuid range on this host: the test needs a user without")
    default = Path("/var/lib/ociworker")
    existed = default.exists()
    tmp_path.chmod(0o755)  # the user may read the context
    before = _listing(tmp_path)
    python = _python_for_nobody()
    env = {k: v for k, v in os.environ.items() if k not in ("OCIWORKER_ROOT", "OCIWORKER_HOST")}
    cmd = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *python]
    proc = subprocess.run(
        [*cmd, "-m", "ociworker", "build", "."],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=ctx,
        check=False,
    )
    # The fix names a range nobody holds in either file (useradd's first, 100000, when the
    # files are empty), as ociworker doctor does: the range after the highest one.
    ends = [
        int(f[1]) + int(f[2])
        for path in ("/etc/subuid", "/etc/subgid")
        for f in (line.split(":") for line in _lines(path))
        if len(f) == 3 and f[1].isdigit() and f[2].isdigit()
    ]
    first = max([100000, *ends])
    _assert_refused(
        proc,
        "rootless: user nobody has no subordinate uid range in /etc/subuid",
        f"fix (as root): usermod --add-subuids {first}-{first + 65535} nobody",
    )
    assert default.exists() == existed
    assert _listing(tmp_path) == before


# --- what a build does with good paths --------------------------------------------------


def test_a_build_without_outputs_warns_and_dirs_are_made_as_buildkit_does(
    tmp_path: Path, state_dir: Path, base_image: str, require_root: None
) -> None:
    ctx = write_context(tmp_path, f"FROM {base_image}\nRUN echo hi > /hi\n")
    proc = ow(state_dir, "build", "--progress", "plain", "--runtime", "runc", str(ctx))
    # buildx: "No output specified ... Build result will only remain in the build cache"
    assert (
        "WARNING: No output specified: the build result will only remain in the build cache"
        in proc.stderr
    )
    # a bare path is type=local; BuildKit creates the dest dir with its parents (MkdirAll)
    out = tmp_path / "new" / "deeper"
    meta = tmp_path / "meta.json"
    proc = ow(
        state_dir,
        *["build", "--progress", "plain", "--runtime", "runc", "-o", str(out)],
        *["--metadata-file", str(meta), str(ctx)],
    )
    assert "No output specified" not in proc.stderr
    assert (out / "hi").read_text() == "hi\n"
    assert meta.is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # no temp left
