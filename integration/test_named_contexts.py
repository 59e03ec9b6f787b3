"""``--build-context NAME=...`` of each kind (a DIR, ``docker-image://``,
``oci-layout://``, a git URL, an HTTP URL) used by ``FROM NAME``, ``COPY --from=NAME`` and ``RUN
--mount=from=NAME``, embedded and over the daemon; real runc, overlayfs
and the local registry."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import LEGS_MARK, assert_lists_steps, buildkit_steps, current_cli
from gitserve import GitHTTPServer, git, git_daemon
from test_daemon import Daemon, start_daemon, stop_daemon

pytestmark = [pytest.mark.usefixtures("require_root"), LEGS_MARK]


def _build(
    state: Path, ctx: Path, out: Path, *args: str, addr: str = "", ok: bool = True
) -> subprocess.CompletedProcess[str]:
    where = ["--addr", addr] if addr else ["--root", str(state)]
    # as root, or as the test user in the rootless leg
    proc = current_cli().run(
        "build", *where, "--progress", "plain", "--output", f"type=local,dest={out}", *args,
        str(ctx), check=False,
    )  # fmt: skip
    if ok and proc.returncode != 0:
        raise AssertionError(f"build failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def _context(tmp: Path, name: str, dockerfile: str) -> Path:
    ctx = tmp / name
    ctx.mkdir()
    (ctx / "Dockerfile").write_text(dockerfile)
    return ctx


def _named_dir(tmp: Path) -> Path:
    d = tmp / "extra"
    (d / "sub").mkdir(parents=True)
    (d / "greeting.txt").write_text("hello from the named dir\n")
    (d / "sub" / "deep.txt").write_text("deep\n")
    return d


def _dir_dockerfile(base_image: str) -> str:
    # FROM the dir (its files are the root), COPY --from it, RUN --mount=from it
    return f"""FROM extra AS fromdir
COPY --from=extra /sub/deep.txt /copied-deep.txt

FROM {base_image}
COPY --from=fromdir / /fromdir/
COPY --from=extra /greeting.txt /copied.txt
RUN --mount=from=extra,target=/m cat /m/greeting.txt /m/sub/deep.txt > /mounted.txt
"""


def _check_dir_outputs(out: Path) -> None:
    assert (out / "fromdir/greeting.txt").read_text() == "hello from the named dir\n"
    assert (out / "fromdir/sub/deep.txt").read_text() == "deep\n"
    assert (out / "fromdir/copied-deep.txt").read_text() == "deep\n"
    assert (out / "copied.txt").read_text() == "hello from the named dir\n"
    assert (out / "mounted.txt").read_text() == "hello from the named dir\ndeep\n"


def test_dir_context_in_from_copy_and_mount(
    tmp_path: Path, state_dir: Path, base_image: str
) -> None:
    extra = _named_dir(tmp_path)
    ctx = _context(tmp_path, "ctx", _dir_dockerfile(base_image))
    # "FROM extra AS fromdir": the stage is named as the context is not, so
    # FROM extra is the context; a stage NAMED like a context is replaced whole
    out = tmp_path / "out"
    _build(state_dir, ctx, out, "--build-context", f"extra={extra}")
    _check_dir_outputs(out)

    # a change in the named dir re-runs what reads it
    (extra / "greeting.txt").write_text("changed\n")
    out2 = tmp_path / "out2"
    _build(state_dir, ctx, out2, "--build-context", f"extra={extra}")
    assert (out2 / "mounted.txt").read_text() == "changed\ndeep\n"
    assert (out2 / "copied.txt").read_text() == "changed\n"


def test_context_replaces_a_stage_of_its_name(
    tmp_path: Path, state_dir: Path, base_image: str
) -> None:
    extra = _named_dir(tmp_path)
    df = f"""FROM {base_image} AS extra
RUN echo from the stage > /greeting.txt

FROM {base_image}
COPY --from=extra /greeting.txt /g.txt
"""
    ctx = _context(tmp_path, "ctx", df)
    out = tmp_path / "out"
    _build(state_dir, ctx, out)
    assert (out / "g.txt").read_text() == "from the stage\n"
    out2 = tmp_path / "out2"
    _build(state_dir, ctx, out2, "--build-context", f"extra={extra}")
    assert (out2 / "g.txt").read_text() == "hello from the named dir\n"


def _image_dockerfile() -> str:
    return """FROM mybase
RUN echo ran on the named image > /ran.txt
COPY --from=mybase /bin/busybox /copied-busybox
RUN --mount=from=mybase,target=/m cmp /m/bin/busybox /copied-busybox && echo same > /mounted.txt
"""


def _check_image_outputs(out: Path) -> None:
    assert (out / "ran.txt").read_text() == "ran on the named image\n"
    assert (out / "copied-busybox").read_bytes() == (out / "bin/busybox").read_bytes()
    assert (out / "mounted.txt").read_text() == "same\n"


def test_docker_image_context(tmp_path: Path, state_dir: Path, base_image: str) -> None:
    ctx = _context(tmp_path, "ctx", _image_dockerfile())
    out = tmp_path / "out"
    _build(state_dir, ctx, out, "--build-context", f"mybase=docker-image://{base_image}")
    _check_image_outputs(out)
    # without the context, "mybase" is an image name nobody has
    bad = _build(state_dir, ctx, tmp_path / "bad", ok=False)
    assert bad.returncode != 0 and "mybase" in bad.stderr


@pytest.fixture
def layout(tmp_path: Path, base_image: str) -> Iterator[tuple[Path, str]]:
    """An OCI layout dir (made by skopeo, an independent tool) holding the base
    image under the tag ``v1``; and its manifest digest."""
    d = tmp_path / "layout"
    subprocess.run(
        [
            "skopeo",
            "copy",
            "--src-tls-verify=false",
            f"docker://{base_image}",
            f"oci:{d}:v1",
        ],
        check=True,
        capture_output=True,
    )
    index = json.loads((d / "index.json").read_text())
    yield d, index["manifests"][0]["digest"]


def test_oci_layout_context_by_tag_and_digest(
    tmp_path: Path, state_dir: Path, layout: tuple[Path, str]
) -> None:
    path, digest = layout
    ctx = _context(tmp_path, "ctx", _image_dockerfile())
    out = tmp_path / "out"
    _build(state_dir, ctx, out, "--build-context", f"mybase=oci-layout://{path}:v1")
    _check_image_outputs(out)
    out2 = tmp_path / "out2"
    _build(state_dir, ctx, out2, "--build-context", f"mybase=oci-layout://{path}@{digest}")
    _check_image_outputs(out2)
    missing = _build(
        state_dir,
        ctx,
        tmp_path / "out3",
        "--build-context",
        f"mybase=oci-layout://{path}:nope",
        ok=False,
    )
    assert missing.returncode != 0 and "Traceback" not in missing.stderr
    assert "no image tagged 'nope'" in missing.stderr, missing.stderr


def test_bad_build_context_values_are_refused(tmp_path: Path, state_dir: Path) -> None:
    ctx = _context(tmp_path, "ctx", "FROM scratch\n")
    for value, words in [
        ("extra", "want NAME=DIR"),
        (f"extra={tmp_path / 'nope'}", "is not a directory"),
        ("extra=ftp://host/x", "unsupported scheme"),
    ]:
        proc = _build(state_dir, ctx, tmp_path / "o", "--build-context", value, ok=False)
        assert proc.returncode != 0 and "Traceback" not in proc.stderr
        assert words in proc.stderr, proc.stderr


@pytest.fixture
def daemon(tmp_path: Path, registry: str) -> Iterator[Daemon]:
    d = start_daemon(tmp_path / "droot", tmp_path / "d.sock")
    yield d
    assert stop_daemon(d) == 0


@pytest.mark.rootless_skip("root's daemon (test_daemon.start_daemon)")
def test_dir_context_over_the_daemon(tmp_path: Path, daemon: Daemon, base_image: str) -> None:
    extra = _named_dir(tmp_path)
    ctx = _context(tmp_path, "ctx", _dir_dockerfile(base_image))
    out = tmp_path / "out"
    proc = _build(tmp_path, ctx, out, "--build-context", f"extra={extra}", addr=daemon.addr)
    _check_dir_outputs(out)
    # the named dir was synced through the session like the main context
    assert "[internal] load build context extra" in proc.stderr
    # a docker-image context goes over as its reference (the daemon pulls)
    ctx2 = _context(tmp_path, "ctx2", _image_dockerfile())
    out2 = tmp_path / "out2"
    _build(
        tmp_path,
        ctx2,
        out2,
        "--build-context",
        f"mybase=docker-image://{base_image}",
        addr=daemon.addr,
    )
    _check_image_outputs(out2)


#: what BuildKit's named local context takes from ``_ignoring_dir`` (dockerui's
#: namedcontext.go: DIR/.dockerignore's patterns become the source's excludes,
#: moby/patternmatcher rules; the main context's ignore file plays no part)
IGNORED_DIR_KEPT = [".", "./.dockerignore", "./keep.txt", "./logs", "./logs/keep.log", "./sub",
                    "./sub/y.txt"]  # fmt: skip
SECRET = "not-for-the-build-3f9a"


def _ignoring_dir(tmp: Path) -> Path:
    d = tmp / "ign"
    for name, text in {
        "keep.txt": "kept\n",
        "secret.env": SECRET + "\n",
        "logs/a.log": "a\n",
        "logs/keep.log": "k\n",
        "sub/x.tmp": "tmp\n",
        "sub/y.txt": "y\n",
        ".dockerignore": "# named context rules\n*.env\nlogs/*\n!logs/keep.log\n**/*.tmp\n",
    }.items():
        (d / name).parent.mkdir(parents=True, exist_ok=True)
        (d / name).write_text(text)
    return d


def _ignoring_context(tmp: Path, base_image: str) -> Path:
    ctx = _context(
        tmp,
        "ctx-ign",
        f"FROM {base_image}\nCOPY --from=ign / /copied/\n"
        "RUN --mount=from=ign,target=/m cd /m && find . | sort > /mounted.lst\n",
    )
    # the main context's own rules must not reach the named one
    (ctx / ".dockerignore").write_text("keep.txt\n")
    return ctx


def _check_ignored(out: Path) -> None:
    assert (out / "mounted.lst").read_text().split() == IGNORED_DIR_KEPT
    copied = sorted("./" + str(p.relative_to(out / "copied")) for p in (out / "copied").rglob("*"))
    assert [".", *copied] == IGNORED_DIR_KEPT


def test_dir_context_applies_its_own_dockerignore(
    tmp_path: Path, state_dir: Path, base_image: str
) -> None:
    ign = _ignoring_dir(tmp_path)
    ctx = _ignoring_context(tmp_path, base_image)
    out = tmp_path / "out"
    _build(state_dir, ctx, out, "--build-context", f"ign={ign}")
    _check_ignored(out)
    # an ignored file is no input: changing it re-runs nothing
    (ign / "secret.env").write_text("changed\n")
    again = _build(state_dir, ctx, tmp_path / "out2", "--build-context", f"ign={ign}")
    assert_lists_steps(again.stderr, buildkit_steps((ctx / "Dockerfile").read_text()), {})


@pytest.mark.rootless_skip("root's daemon (test_daemon.start_daemon)")
def test_dir_context_over_the_daemon_sends_no_ignored_file(
    tmp_path: Path, daemon: Daemon, base_image: str
) -> None:
    ign = _ignoring_dir(tmp_path)
    ctx = _ignoring_context(tmp_path, base_image)
    out = tmp_path / "out"
    _build(tmp_path, ctx, out, "--build-context", f"ign={ign}", addr=daemon.addr)
    _check_ignored(out)
    # the client never sent it: no file under the daemon's root holds its bytes
    leaked = subprocess.run(
        ["grep", "-rl", "--", SECRET, str(daemon.root)], capture_output=True, text=True
    )
    assert leaked.stdout == "", leaked.stdout


# -- git and URL contexts ---------------------------------------------------------------


@pytest.fixture
def git_repo(tmp_path: Path) -> Iterator[tuple[Path, Path, str]]:
    """A bare repository ``srv/lib.git`` with a branch ``rel`` (not the default
    one); its working clone and the branch's commit."""
    srv = tmp_path / "srv"
    srv.mkdir()
    git("init", "-q", "--bare", "-b", "main", str(srv / "lib.git"))
    work = tmp_path / "libwork"
    git("clone", "-q", str(srv / "lib.git"), str(work))
    git("checkout", "-q", "-b", "main", cwd=work)
    (work / "greeting.txt").write_text("hello from git main\n")
    git("add", "-A", cwd=work)
    git("commit", "-q", "-m", "main", cwd=work)
    git("checkout", "-q", "-b", "rel", cwd=work)
    (work / "greeting.txt").write_text("hello from git rel\n")
    (work / "sub").mkdir()
    (work / "sub" / "deep.txt").write_text("deep in git\n")
    git("add", "-A", cwd=work)
    git("commit", "-q", "-m", "rel", cwd=work)
    git("push", "-q", "origin", "main", "rel", cwd=work)
    yield srv, work, git("rev-parse", "HEAD", cwd=work).strip()


def _git_files(work: Path, commit: str) -> dict[str, bytes]:
    """What ``git`` itself says the commit holds (``ls-tree`` + ``show``)."""
    names = git("ls-tree", "-r", "--name-only", commit, cwd=work).split("\n")
    return {
        n: subprocess.run(
            ["git", "show", f"{commit}:{n}"], cwd=work, capture_output=True, check=True
        ).stdout
        for n in filter(None, names)
    }


def _files_under(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in root.rglob("*")
        if p.is_file() and not p.is_symlink()
    }


def _git_dockerfile(base_image: str) -> str:
    return f"""FROM lib AS fromgit
FROM {base_image}
COPY --from=fromgit / /fromgit/
COPY --from=lib /sub/deep.txt /copied.txt
RUN --mount=from=lib,target=/m cat /m/greeting.txt /m/sub/deep.txt > /mounted.txt
"""


def _check_git_outputs(out: Path, want: dict[str, bytes]) -> None:
    assert _files_under(out / "fromgit") == want
    assert not (out / "fromgit" / ".git").exists()
    assert (out / "copied.txt").read_bytes() == want["sub/deep.txt"]
    assert (out / "mounted.txt").read_bytes() == want["greeting.txt"] + want["sub/deep.txt"]


@pytest.fixture
def served(tmp_path: Path, git_repo: tuple[Path, Path, str]) -> Iterator[GitHTTPServer]:
    server = GitHTTPServer(git_repo[0])
    # a file with bytes no text round-trip keeps
    server.files["tool.bin"] = bytes(range(256)) * 3 + b"\x00end\n"
    yield server
    server.close()


def _url_dockerfile(base_image: str) -> str:
    return f"""FROM tool AS fromurl
FROM {base_image}
COPY --from=fromurl / /fromurl/
COPY --from=tool /tool.bin /copied.bin
RUN --mount=from=tool,target=/m cp /m/tool.bin /mounted.bin
"""


def _check_url_outputs(out: Path, want: bytes) -> None:
    # the file is named after the URL's last path part, as BuildKit's HTTP source
    assert _files_under(out / "fromurl") == {"tool.bin": want}
    assert (out / "copied.bin").read_bytes() == want
    assert (out / "mounted.bin").read_bytes() == want


def test_git_context_in_from_copy_and_mount(
    tmp_path: Path,
    state_dir: Path,
    base_image: str,
    git_repo: tuple[Path, Path, str],
    served: GitHTTPServer,
) -> None:
    srv, work, rel = git_repo
    want = _git_files(work, rel)
    ctx = _context(tmp_path, "ctx", _git_dockerfile(base_image))
    out = tmp_path / "out"
    _build(state_dir, ctx, out, "--build-context", f"lib={served.url('lib.git#rel')}")
    _check_git_outputs(out, want)
    # git:// (git daemon) reaches the same commit
    with git_daemon(srv) as port:
        out2 = tmp_path / "out2"
        _build(state_dir, ctx, out2, "--build-context", f"lib=git://127.0.0.1:{port}/lib.git#rel")
    _check_git_outputs(out2, want)
    # a ref the repository lacks fails clearly, naming the URL
    bad = _build(
        state_dir,
        ctx,
        tmp_path / "bad",
        "--build-context",
        f"lib={served.url('lib.git#nope')}",
        ok=False,
    )
    assert bad.returncode != 0 and "Traceback" not in bad.stderr
    assert "lib.git" in bad.stderr and "nope" in bad.stderr, bad.stderr


def test_url_context_in_from_copy_and_mount(
    tmp_path: Path, state_dir: Path, base_image: str, served: GitHTTPServer
) -> None:
    ctx = _context(tmp_path, "ctx", _url_dockerfile(base_image))
    out = tmp_path / "out"
    _build(state_dir, ctx, out, "--build-context", f"tool={served.url('files/tool.bin')}")
    _check_url_outputs(out, served.files["tool.bin"])
    missing = _build(
        state_dir,
        ctx,
        tmp_path / "bad",
        "--build-context",
        f"tool={served.url('files/absent.bin')}",
        ok=False,
    )
    assert missing.returncode != 0 and "Traceback" not in missing.stderr
    assert "404" in missing.stderr and "absent.bin" in missing.stderr, missing.stderr


@pytest.mark.rootless_skip("root's daemon (test_daemon.start_daemon)")
def test_git_and_url_contexts_over_the_daemon(
    tmp_path: Path,
    daemon: Daemon,
    base_image: str,
    git_repo: tuple[Path, Path, str],
    served: GitHTTPServer,
) -> None:
    _, work, rel = git_repo
    ctx = _context(tmp_path, "ctx", _git_dockerfile(base_image))
    out = tmp_path / "out"
    proc = _build(
        tmp_path,
        ctx,
        out,
        "--build-context",
        f"lib={served.url('lib.git#rel')}",
        addr=daemon.addr,
    )
    _check_git_outputs(out, _git_files(work, rel))
    # the worker fetched it: the client synced no "lib" dir
    assert "load build context lib" not in proc.stderr
    assert (daemon.root / "git" / "checkouts" / rel).is_dir()

    ctx2 = _context(tmp_path, "ctx2", _url_dockerfile(base_image))
    out2 = tmp_path / "out2"
    _build(
        tmp_path,
        ctx2,
        out2,
        "--build-context",
        f"tool={served.url('files/tool.bin')}",
        addr=daemon.addr,
    )
    _check_url_outputs(out2, served.files["tool.bin"])
