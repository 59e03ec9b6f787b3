"""Rootless: ``ociworker`` run by an ordinary user (issue 12, items 1-4).

Every build here runs as the test user ``scripts/setup-host`` makes (``ociw-test``,
subordinate ids 200000:65536), through ``runuser`` with a fresh HOME and
XDG_RUNTIME_DIR (conftest's ``as_user``, as in every rootless leg of the suite), exactly
as the user would type it. Expectations come from the
Dockerfile and from reading the archives' tars ourselves; the comparison with
root is against a build of the same Dockerfile by root, entry by entry.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import hashlib
import io
import json
import os
import pwd
import shutil
import signal
import stat
import subprocess
import sys
import tarfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import BASE_IMAGE, CLI, TEST_USER, oci_archive_image
from ociworker.api.client import Client, DaemonInfo
from ociworker.executor.cgroups import remove_tree

BENCH = Path(__file__).resolve().parents[2] / "shared" / "bench"
_HINT = "scripts/setup-host creates it (as root)"


@dataclass(frozen=True)
class User:
    """The test user, as conftest's ``as_user`` runs it (the one way the suite runs
    ``ociworker`` as that user), with its ids and subordinate range."""

    name: str
    uid: int
    gid: int
    sub: tuple[int, int]
    cli: CLI

    @property
    def base(self) -> Path:
        """This test's dir, the user's: its HOME."""
        return self.cli.home

    @property
    def home(self) -> Path:
        return self.cli.home

    @property
    def runtime_dir(self) -> Path:
        return Path(self.cli.env["XDG_RUNTIME_DIR"])

    @property
    def state(self) -> Path:
        return Path(self.cli.env["XDG_DATA_HOME"]) / "ociworker"

    def owns(self, uid: int) -> bool:
        """Whether ``uid`` is this user's: its own or one of its subordinate ids."""
        return uid == self.uid or self.sub[0] <= uid < self.sub[0] + self.sub[1]

    def command(self, *args: str, path: str | None = None) -> list[str]:
        """The user's python with ``args``, in the user's environment (``path``: its PATH)."""
        env = {**self.cli.env, **({"PATH": path} if path else {})}
        pairs = [f"{k}={v}" for k, v in sorted(env.items())]
        return ["runuser", "-u", self.name, "--", "env", "-i", *pairs, self.cli.python, *args]

    def ociworker(
        self, *args: str, cwd: Path | None = None, timeout: float = 600, path: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.command("-m", "ociworker", *args, path=path),
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=cwd or self.base,
            check=False,
        )

    def give(self, path: Path) -> None:
        """Make ``path`` (a tree this test wrote) the user's."""
        self.cli.give(path)


def _subid(path: str, name: str) -> tuple[int, int] | None:
    with contextlib.suppress(FileNotFoundError):
        for line in Path(path).read_text().splitlines():
            parts = line.split(":")
            if len(parts) == 3 and parts[0] == name:
                return int(parts[1]), int(parts[2])
    return None


@pytest.fixture
def user(as_user: CLI, registry: str) -> Iterator[User]:
    assert as_user.user is not None
    pw = pwd.getpwnam(as_user.user)
    sub = _subid("/etc/subuid", as_user.user)
    assert sub is not None, "conftest's test_user checked /etc/subuid"
    u = User(as_user.user, pw.pw_uid, pw.pw_gid, sub, as_user)
    try:
        yield u
    finally:
        # before as_user removes the dir: what the test left running of the user's
        for proc in _processes_of(u):
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc, signal.SIGKILL)


def _processes_of(u: User, *marks: str) -> list[int]:
    """Live processes of this test's user session: the user's or its
    subordinate ids', started with this test's HOME, or whose command line
    names its dir or one of ``marks``."""
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            if not u.owns(d.stat().st_uid):
                continue
            environ = (d / "environ").read_bytes()
            cmdline = (d / "cmdline").read_bytes()
        except OSError:
            continue  # gone meanwhile
        if f"HOME={u.home}".encode() in environ.split(b"\0") or any(
            m.encode() in cmdline for m in (str(u.base), *marks)
        ):
            found.append(int(d.name))
    return found


def _written_by(u: User, roots: list[Path], skip: list[Path]) -> set[str]:
    """Every path under ``roots`` owned by the user or its subordinate ids,
    apart from ``skip``. Only directories the user may write into can hold
    such a path, so only those (world-writable or the user's) are entered."""
    out: set[str] = set()
    stack = [r for r in roots if r.exists()]
    while stack:
        d = stack.pop()
        try:
            entries = list(os.scandir(d))
        except OSError:
            continue
        for e in entries:
            p = Path(e.path)
            if any(p == s or s in p.parents for s in skip) or _other_test(p, u):
                continue
            try:
                st = e.stat(follow_symlinks=False)
            except OSError:
                continue
            if u.owns(st.st_uid):
                out.add(e.path)
            if stat.S_ISDIR(st.st_mode) and (u.owns(st.st_uid) or st.st_mode & 0o002):
                stack.append(p)
    return out


def _other_test(p: Path, u: User) -> bool:
    # Other tests that run as the same user at the same time (this suite's other
    # legs, the doctor's) keep to dirs named so; what they write is not ours.
    return (
        p.parent == Path("/tmp")
        and p != u.base
        and p.name.startswith(("ociw-rootless-", "ociw-ociw-test-"))
    )


# --- reading images ourselves -----------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    layer: int
    name: str
    uid: int
    gid: int
    mode: int
    type: bytes
    linkname: str
    sha256: str
    xattrs: tuple[tuple[str, str], ...]


def _image(archive: Path) -> tuple[bytes, list[bytes]]:
    """The config and the uncompressed layer tars (bottom first) of the image
    in an OCI archive, read as any consumer reads it."""
    with tarfile.open(archive) as tf:

        def blob(digest: str) -> bytes:
            f = tf.extractfile("blobs/" + digest.replace(":", "/"))
            assert f is not None, f"{archive}: no blob {digest}"
            return f.read()

        index = tf.extractfile("index.json")
        assert index is not None
        manifest = json.loads(blob(json.load(index)["manifests"][0]["digest"]))
        layers = []
        for layer in manifest["layers"]:
            data = blob(layer["digest"])
            layers.append(gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data)
        return blob(manifest["config"]["digest"]), layers


def layer_entries(archive: Path) -> list[Entry]:
    """Every entry of every layer of the image in an OCI archive, in order."""
    out: list[Entry] = []
    for i, data in enumerate(_image(archive)[1]):
        with tarfile.open(fileobj=io.BytesIO(data)) as lt:
            for m in lt:
                body = lt.extractfile(m) if m.isreg() else None
                digest = hashlib.sha256(body.read()).hexdigest() if body else ""
                xattrs = tuple(sorted((k, v) for k, v in m.pax_headers.items() if "xattr" in k))
                out.append(
                    Entry(i, m.name, m.uid, m.gid, m.mode, m.type, m.linkname, digest, xattrs)
                )
    return out


def file_in_image(archive: Path, path: str) -> bytes:
    """The content of ``path`` in the image (the topmost layer that has it)."""
    for data in reversed(_image(archive)[1]):
        with tarfile.open(fileobj=io.BytesIO(data)) as lt, contextlib.suppress(KeyError):
            f = lt.extractfile(path)
            assert f is not None
            return f.read()
    raise AssertionError(f"{path} is in no layer of {archive}")


# --- the multi-stage Dockerfile -----------------------------------------------------------

SECRET = "s3cr3t-value-of-the-rootless-test"

MULTI = """\
ARG BASE=127.0.0.1:5000/busybox:latest
FROM $BASE AS helper
RUN --mount=type=cache,target=/cache,uid=1000,gid=1000 echo hi > /cache/x \\
 && cp /cache/x /from-cache && ls -n /cache | awk 'NR>1 {print $1, $3, $4, $9}' > /cache-ls

FROM $BASE
RUN mkdir -p /data/sub /opq/keep && echo a > /data/a && echo b > /data/sub/b \\
 && echo k > /opq/keep/k && chown -R 1000:1000 /data && chmod 0750 /data/sub \\
 && ln -s a /data/link \\
 && ln /data/sub/b /data/hard && touch /suid && chmod 4755 /suid \\
 && echo 'app:x:1234:1234::/home/app:/bin/sh' >> /etc/passwd \\
 && echo 'app:x:1234:' >> /etc/group && mkdir -p /home/app && chown 1234:1234 /home/app
RUN rm /linuxrc /data/a && rm -rf /home/user /opq && mkdir /home/user /opq \\
 && echo n > /home/user/new && echo n > /opq/new
COPY --chown=1000:1000 files/ /files/
COPY --from=helper /from-cache /cache-ls /from-helper/
RUN --mount=type=secret,id=tok wc -c < /run/secrets/tok > /secret-len
USER app
RUN mkdir /home/app/made && echo mine > /home/app/made/f && id > /home/app/id
"""


def _multi_context(u: User) -> Path:
    ctx = u.base / "multi"
    (ctx / "files" / "sub").mkdir(parents=True)
    (ctx / "Dockerfile").write_text(MULTI)
    (ctx / "files" / "one").write_text("one\n")
    (ctx / "files" / "one").chmod(0o600)
    (ctx / "files" / "sub" / "two").write_text("two\n")
    (u.base / "tok").write_text(SECRET)
    u.give(ctx)
    u.give(u.base / "tok")
    return ctx


def _root_build(ctx: Path, runtime: str, state: Path, out: Path, *extra: str) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "ociworker",
            "build",
            "--progress=plain",
            "--root",
            str(state),
            "--runtime",
            runtime,
            *extra,
            "--output",
            f"type=oci,dest={out}",
            str(ctx),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr


def _expected_from_dockerfile(entries: list[Entry], *, hardlinks: bool = True) -> None:
    """What MULTI says the layers hold, checked on one build's own tars."""
    by_name = {(e.name): e for e in entries}
    files_one = by_name["files/one"]
    assert (files_one.uid, files_one.gid, stat.S_IMODE(files_one.mode)) == (1000, 1000, 0o600)
    assert (by_name["files/sub/two"].uid, by_name["files/sub/two"].gid) == (1000, 1000)
    assert (by_name["data/sub"].uid, stat.S_IMODE(by_name["data/sub"].mode)) == (1000, 0o750)
    assert by_name["data/link"].type == tarfile.SYMTYPE and by_name["data/link"].linkname == "a"
    assert stat.S_IMODE(by_name["suid"].mode) == 0o4755
    # the deletions of the third RUN: a whiteout for a base file, one for a file of the
    # layer below, and /opq's old content hidden: by an opaque marker (overlayfs sees the
    # directory made anew) or by a whiteout of what it held (a snapshotter that compares
    # trees); /home/user, empty in the base, made anew by root
    assert ".wh.linuxrc" in by_name
    assert "data/.wh.a" in by_name
    assert "opq/.wh..wh..opq" in by_name or "opq/.wh.keep" in by_name
    assert by_name["opq/new"].uid == 0
    assert (by_name["home/user"].uid, by_name["home/user/new"].uid) == (0, 0)
    made = by_name["home/app/made/f"]
    assert (made.uid, made.gid) == (1234, 1234)  # written by USER app
    hard = [e for e in entries if e.name in ("data/hard", "data/sub/b")]
    if hardlinks:
        assert sorted(e.type for e in hard) == sorted([tarfile.REGTYPE, tarfile.LNKTYPE])
    else:
        # fuse-overlayfs gives each name of a hard link an inode number of its own,
        # so the mounted tree shows two equal files (known, see README)
        assert [e.type for e in hard] == [tarfile.REGTYPE] * 2
        assert len({e.sha256 for e in hard}) == 1


@pytest.mark.parametrize("snapshotter", ["auto", "fuse-overlayfs", "native"])
def test_build_as_user_matches_root(
    user: User, runtime: str, snapshotter: str, tmp_path: Path
) -> None:
    ctx = _multi_context(user)
    out = user.base / "image.oci.tar"
    roots = [Path("/tmp"), Path("/var/tmp"), Path("/dev/shm"), Path(pwd.getpwnam(TEST_USER).pw_dir)]
    allowed = [user.state, ctx, out, user.base / "tok"]
    before = _written_by(user, roots, allowed)

    proc = user.ociworker(
        "--debug",
        "build",
        "--progress=plain",
        "--runtime",
        runtime,
        "--snapshotter",
        snapshotter,
        "--secret",
        f"id=tok,src={user.base / 'tok'}",
        "--output",
        f"type=oci,dest={out}",
        str(ctx),
    )
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    picked = {
        "auto": "OverlaySnapshotter" if _kernel_overlay_in_userns() else "FuseOverlaySnapshotter",
        "fuse-overlayfs": "FuseOverlaySnapshotter",
        "native": "NativeSnapshotter",
    }[snapshotter]
    assert f"picked='{picked}'" in proc.stderr  # --debug says which

    # Nothing but the state dir, the context and the output changed anywhere
    # the user can write (its real HOME, /tmp, /var/tmp, /dev/shm).
    # (the state dir's parents are made as it is, as by mkdir -p)
    made = {str(user.home / ".local"), str(user.home / ".local" / "share")}
    assert _written_by(user, roots, allowed) == before | made
    # The state dir is under $XDG_DATA_HOME's default, and every file of it is
    # the user's on the host (its own uid, or a subordinate one for image files).
    assert (user.state / "snapshots").is_dir()
    assert all(user.owns(p.lstat().st_uid) for p in user.state.rglob("*"))
    assert out.stat().st_uid == user.uid

    rootless = layer_entries(out)
    _expected_from_dockerfile(rootless, hardlinks=snapshotter != "fuse-overlayfs")
    config, layers = _image(out)
    assert all(SECRET.encode() not in b for b in [config, *layers]), "the secret is in the image"
    assert file_in_image(out, "secret-len").decode().strip() == str(len(SECRET))
    assert file_in_image(out, "from-helper/cache-ls").decode().split() == [
        "-rw-r--r--",
        "0",
        "0",
        "x",
    ]  # root wrote it, in the cache dir owned by 1000

    root_out = tmp_path / "root.oci.tar"
    _root_build(
        ctx,
        runtime,
        tmp_path / "rootstate",
        root_out,
        "--snapshotter",
        snapshotter,
        "--secret",
        f"id=tok,src={user.base}/tok",
    )
    as_root = layer_entries(root_out)
    assert [e.name for e in rootless] == [e.name for e in as_root]
    for a, b in zip(rootless, as_root, strict=True):
        assert a == b, f"rootless {a} != root {b}"


def test_user_files_stay_the_users(user: User) -> None:
    """A local output is written as the user (not with image owners, which on the
    host would be subordinate ids the user could not remove), as buildx's is."""
    ctx = _multi_context(user)
    dest = user.base / "local-out"
    proc = user.ociworker(
        "build",
        "--progress=plain",
        "--secret",
        f"id=tok,src={user.base / 'tok'}",
        "--output",
        f"type=local,dest={dest}",
        str(ctx),
    )
    assert proc.returncode == 0, proc.stderr
    owners = {p.lstat().st_uid for p in [dest, *dest.rglob("*")]}
    assert owners == {user.uid}
    assert (dest / "files" / "one").read_text() == "one\n"


def _bench_context(user: User, case: str) -> Path:
    ctx = user.base / case
    shutil.copytree(BENCH / case, ctx)
    if case == "context":
        # as the case's README says, generated beside the Dockerfile (smaller here)
        for i in range(300):
            d = ctx / "gen" / f"d{i % 10}"
            d.mkdir(parents=True, exist_ok=True)
            (d / f"f{i}").write_bytes(os.urandom(1024) * (1 + i % 4))
    user.give(ctx)
    return ctx


@pytest.mark.parametrize("case", ["steps", "fanout", "cachemount", "context", "layer-export"])
def test_bench_cases_as_user(user: User, case: str) -> None:
    if not (BENCH / case / "Dockerfile").is_file():
        pytest.fail(f"no bench case {BENCH / case}")
    ctx = _bench_context(user, case)
    out = user.base / f"{case}.oci.tar"
    proc = user.ociworker(
        "build",
        "--progress=plain",
        "--build-arg",
        f"BASE={BASE_IMAGE}",
        "--output",
        f"type=oci,dest={out}",
        str(ctx),
    )
    assert proc.returncode == 0, proc.stderr
    oci_archive_image(out)
    dockerfile = (BENCH / case / "Dockerfile").read_text()
    if case == "steps":
        # RUN echo N >> /log, in order: the file is their lines
        wanted = [ln.split()[2] for ln in dockerfile.splitlines() if ln.startswith("RUN echo")]
        assert file_in_image(out, "log").decode().split() == wanted
    if case == "fanout":
        assert file_in_image(out, "r/three").decode() == "three\n"
    if case == "context":
        files = [p for p in ctx.rglob("*") if p.is_file()]
        names = {e.name for e in layer_entries(out)}
        assert all(f"src/{p.relative_to(ctx)}" in names for p in files)


def test_serve_as_user_with_socket_in_runtime_dir(user: User) -> None:
    ctx = user.base / "hello"
    ctx.mkdir()
    (ctx / "Dockerfile").write_text(f"FROM {BASE_IMAGE}\nRUN echo served > /served\n")
    user.give(ctx)
    sock = user.runtime_dir / "ociworker" / "ociworker.sock"
    serve = subprocess.Popen(
        user.command("-m", "ociworker", "serve"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        cwd=user.base,
    )
    try:
        for _ in range(600):
            if sock.exists() or serve.poll() is not None:
                break
            time.sleep(0.1)
        assert sock.exists(), f"no socket at {sock}: {serve.stderr.read() if serve.stderr else ''}"
        assert sock.stat().st_uid == user.uid
        info = asyncio.run(_info(f"unix://{sock}"))
        assert info.rootless
        assert info.root == str(user.state)
        wanted = "overlayfs" if _kernel_overlay_in_userns() else "native"
        assert info.snapshotter_picked.split(":")[0] == wanted, info.snapshotter_picked
        out = user.base / "served.oci.tar"
        proc = user.ociworker(
            "build",
            "--addr",
            f"unix://{sock}",
            "--progress=plain",
            "--output",
            f"type=oci,dest={out}",
            str(ctx),
        )
        assert proc.returncode == 0, proc.stderr
        assert file_in_image(out, "served") == b"served\n"
        assert (user.state / "snapshots").is_dir()  # the daemon's root: $XDG_DATA_HOME's
    finally:
        # SIGTERM to the daemon the user started (runuser would re-raise it)
        os.kill(_child_of(serve.pid), signal.SIGTERM)
        try:
            serve.wait(timeout=60)
        except subprocess.TimeoutExpired:
            serve.kill()
            serve.wait()
    assert serve.stderr is not None
    logs = serve.stderr.read()
    serve.stderr.close()
    assert serve.returncode == 0, logs
    assert not sock.exists()
    assert _processes_of(user) == []


def _kernel_overlay_in_userns() -> bool:
    """Kernel overlayfs mounts in a user namespace from Linux 5.11 on."""
    release = tuple(int(x) for x in os.uname().release.split(".")[:2])
    return release >= (5, 11)


async def _info(addr: str) -> DaemonInfo:
    async with Client(addr) as c:
        return await c.info()


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_killed_worker_leaves_nothing(user: User, sig: signal.Signals) -> None:
    token = str(600000 + os.getpid() % 1000)
    ctx = user.base / "slow"
    ctx.mkdir()
    (ctx / "Dockerfile").write_text(f"FROM {BASE_IMAGE}\nRUN echo started && sleep {token}\n")
    user.give(ctx)
    build = subprocess.Popen(
        user.command("-m", "ociworker", "build", "--progress=plain", str(ctx)),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        cwd=user.base,
    )
    assert build.stderr is not None
    try:
        seen = []
        for line in build.stderr:
            seen.append(line)
            if "started" in line and "RUN" not in line:
                break
        else:
            pytest.fail("the RUN step never started:\n" + "".join(seen))
        # the step's sleep is running, as one of the user's ids
        # ("started" is printed just before the shell runs sleep: wait for it to be there)
        sleeping: list[int] = []
        for _ in range(300):
            sleeping = [p for p in _processes_of(user, token) if token.encode() in _cmdline(p)]
            if sleeping:
                break
            time.sleep(0.1)
        assert sleeping, "no sleep of the RUN step found"
    except BaseException:
        # a build that failed early must not outlive the test (nor warn at its GC)
        build.kill()
        build.wait()
        build.stderr.close()
        raise
    os.kill(_child_of(build.pid), sig)  # the ociworker the user started
    rest = build.stderr.read()
    build.wait()
    build.stderr.close()
    # the shell's code for the signal (runuser passes on its child's); SIGTERM
    # cancels the build, which says so
    assert build.returncode == 128 + sig
    if sig == signal.SIGTERM:
        assert rest.splitlines()[-1] == "ERROR: build cancelled"
    gone = False
    for _ in range(300):
        if not _processes_of(user, token):
            gone = True
            break
        time.sleep(0.1)
    assert gone, f"left running: {[_cmdline(p) for p in _processes_of(user, token)]}"

    # The next build succeeds, and what the killed one left is gone by its end.
    nxt = user.base / "next"
    nxt.mkdir()
    (nxt / "Dockerfile").write_text(f"FROM {BASE_IMAGE}\nRUN echo next > /next\n")
    user.give(nxt)
    proc = user.ociworker("build", "--progress=plain", str(nxt))
    assert proc.returncode == 0, proc.stderr
    assert not list((user.state / "tmp").iterdir())  # scratch dirs of both workers gone
    assert not list((user.state / "executor").glob("bundles/*"))
    assert _processes_of(user) == []
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        assert str(user.state) not in f.read()


def _child_of(pid: int) -> int:
    """The one child of ``pid`` (runuser's: the command it runs)."""
    kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    assert len(kids) == 1, f"runuser {pid} has children {kids}"
    return int(kids[0])


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
    except OSError:
        return b""


NET_PROBE = """\
FROM {base}
RUN mkdir /out; ls /sys/class/net > /out/ifaces; \\
 GW=$(ip route | awk '/default/ {{print $3}}'); \\
 for t in reg:127.0.0.1 gw:$GW hostip:{host_ip}; do \\
   timeout 5 wget -q -O /out/${{t%%:*}} http://${{t#*:}}:5000/v2/; echo $? > /out/${{t%%:*}}.rc; \\
 done; true
"""


def _host_ip() -> str:
    """The host's own address (its default route's source)."""
    route = subprocess.run(
        ["ip", "-4", "route", "get", "192.0.2.200"], capture_output=True, text=True
    )
    words = route.stdout.split()
    return words[words.index("src") + 1] if "src" in words else "127.0.0.1"


def test_network_modes_as_user(user: User, registry: str) -> None:
    """``default`` is the sandbox (its own eth0, neither the user's loopback nor the
    host's address reachable: the registry on 127.0.0.1:5000 stands for any service
    of the host), ``none`` has only lo, and ``host`` (behind its entitlement) is the
    worker's namespace, i.e. the user's connectivity through pasta."""
    with urllib.request.urlopen(f"http://{registry}/v2/", timeout=10) as r:
        registry_says = r.read()
    ctx = user.base / "net"
    ctx.mkdir()
    (ctx / "Dockerfile").write_text(NET_PROBE.format(base=BASE_IMAGE, host_ip=_host_ip()))
    user.give(ctx)

    def probe(network: str, *extra: str) -> Path:
        out = user.base / f"out-{network}"
        proc = user.ociworker(
            "build", "--progress=plain", "--network", network, *extra,
            "--output", f"type=local,dest={out}", str(ctx),
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        return out / "out"

    default = probe("default")
    assert (default / "ifaces").read_text().split() == ["eth0", "lo"]
    for blocked in ("reg", "gw", "hostip"):
        assert (default / f"{blocked}.rc").read_text().strip() != "0", blocked

    none = probe("none")
    assert (none / "ifaces").read_text().split() == ["lo"]
    assert (none / "reg.rc").read_text().strip() != "0"

    refused = user.ociworker("build", "--progress=plain", "--network", "host", str(ctx))
    assert refused.returncode == 1
    assert "entitlement network.host is not allowed" in refused.stderr

    host = probe("host", "--allow", "network.host")
    # pasta copies the interface of this namespace's default route, name and all (eth0 on
    # most hosts; run-suite's stand-in uplink in a --network=none container)
    assert _default_dev() in (host / "ifaces").read_text().split()
    assert (host / "reg.rc").read_text().strip() == "0"
    assert (host / "reg").read_bytes() == registry_says


def _default_dev() -> str:
    """The interface of this network namespace's default route, by ip itself."""
    for family in ("-4", "-6"):
        out = subprocess.run(
            ["ip", family, "-o", "route", "show", "default"],
            capture_output=True, text=True, check=True,
        ).stdout.split()  # fmt: skip
        if "dev" in out:
            return out[out.index("dev") + 1]
    raise AssertionError("no default route: pasta has no interface to copy")


def _path_with(user: User, *tools: str) -> str:
    """A PATH of only ``tools`` (links to the host's), as on a host without the others."""
    d = user.base / "bin"
    d.mkdir(exist_ok=True)
    for t in tools:
        found = shutil.which(t)
        assert found, f"{t} is not installed: {_HINT}"
        (d / t).symlink_to(found)
    user.give(d)
    return str(d)


def _layout_context(user: User, dockerfile: str) -> Path:
    """A context whose base image is an OCI layout the user owns (no registry: the
    worker's own namespace may not reach the host's loopback)."""
    layout = user.base / "layout"
    subprocess.run(
        [
            "skopeo",
            "copy",
            "--src-tls-verify=false",
            f"docker://{BASE_IMAGE}",
            f"oci:{layout}:latest",
        ],
        check=True,
        capture_output=True,
    )
    ctx = user.base / "layout-ctx"
    ctx.mkdir()
    (ctx / "Dockerfile").write_text(dockerfile)
    user.give(layout)
    user.give(ctx)
    return ctx


def test_slirp4netns_when_there_is_no_pasta(user: User) -> None:
    """Without pasta the worker's namespace is connected by slirp4netns, whose
    --configure makes tap0 10.0.2.100/24 with the gateway 10.0.2.2."""
    ctx = _layout_context(user, "FROM base\nRUN ls /sys/class/net > /ifaces; ip route > /route\n")
    path = _path_with(user, "newuidmap", "newgidmap", "slirp4netns", "runc")
    out = user.base / "out"
    proc = user.ociworker(
        "build", "--progress=plain", "--network", "host", "--allow", "network.host",
        "--build-context", f"base=oci-layout://{user.base / 'layout'}:latest",
        "--output", f"type=local,dest={out}", str(ctx), path=path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert (out / "ifaces").read_text().split() == ["lo", "tap0"]
    assert "default via 10.0.2.2 dev tap0" in (out / "route").read_text()


@pytest.mark.parametrize(
    ("tools", "message"),
    [
        (
            ("runc",),
            "ERROR: rootless: newuidmap/newgidmap not found, which map the build's user "
            "namespace; fix (as root): apt-get install uidmap",
        ),
        (
            ("newuidmap", "newgidmap", "runc"),
            "ERROR: rootless: neither pasta nor slirp4netns found, which give the build's "
            "network namespace its connection; fix (as root): apt-get install passt",
        ),
    ],
)
def test_missing_helper_is_named_with_its_fix(
    user: User, tools: tuple[str, ...], message: str
) -> None:
    ctx = user.base / "ctx"
    ctx.mkdir()
    (ctx / "Dockerfile").write_text(f"FROM {BASE_IMAGE}\n")
    user.give(ctx)
    proc = user.ociworker("build", str(ctx), path=_path_with(user, *tools))
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == [message]
    assert not user.state.exists()


# --- cgroups (issue 12 item 4) ------------------------------------------------------------

_NO_LIMITS = "rootless: RUN steps run without --step-memory/--step-pids/--step-cpus limits"
_CGROUP_RUN = "FROM base\nRUN grep ^0:: /proc/self/cgroup > /cgroup\n"


def _fs_type(path: str) -> str:
    return subprocess.run(
        ["stat", "-f", "-c", "%T", path], capture_output=True, text=True, check=True
    ).stdout.strip()


@pytest.fixture
def v2_cgroup(user: User) -> Iterator[tuple[Path, bool]]:
    """A fresh cgroup on the host's cgroup v2 hierarchy (``/sys/fs/cgroup`` on a pure v2
    host, ``/sys/fs/cgroup/unified`` on a hybrid one) and whether the hierarchy must be
    bound onto /sys/fs/cgroup (a private mount namespace's view of it, as on a pure v2
    host: nothing of the host's layout changes)."""
    if _fs_type("/sys/fs/cgroup") == "cgroup2fs":
        hierarchy, bind = Path("/sys/fs/cgroup"), False
    elif os.path.isdir("/sys/fs/cgroup/unified") and _fs_type("/sys/fs/cgroup/unified") == (
        "cgroup2fs"
    ):
        hierarchy, bind = Path("/sys/fs/cgroup/unified"), True
    else:
        pytest.skip("no cgroup v2 hierarchy on this host (pure cgroup v1)")
    cg = hierarchy / f"ociw-deleg-{os.getpid()}-{time.monotonic_ns()}"
    cg.mkdir()
    try:
        yield cg, bind
    finally:
        for proc in _processes_of(user):
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc, signal.SIGKILL)
        remove_tree(cg, wait=5.0)


def _delegate(cg: Path, user: User) -> None:
    """What systemd's Delegate= does: the cgroup and the files that move processes and
    enable controllers become the user's."""
    for name in ("", "cgroup.procs", "cgroup.subtree_control", "cgroup.threads"):
        os.chown(cg / name if name else cg, user.uid, user.gid)


def _build_in(user: User, cg: Path, bind: bool, *args: str) -> subprocess.CompletedProcess[str]:
    """``ociworker args`` as the user, started alone in ``cg`` (setpriv execs: no
    process of runuser's stays in it)."""
    name = "/" + cg.name
    script = (
        (f"mount --bind {cg.parent} /sys/fs/cgroup && " if bind else "")
        + f"echo $$ > /sys/fs/cgroup{name}/cgroup.procs && "
        + f'exec setpriv --reuid {user.uid} --regid {user.gid} --init-groups "$@"'
    )
    cmd = user.command("-m", "ociworker", *args)[4:]  # without ``runuser -u NAME --``
    return subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", *cmd],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=user.base,
        check=False,
    )


@pytest.mark.parametrize("runtime", ["runc", "crun"])
def test_steps_run_in_the_delegated_cgroup(
    user: User, v2_cgroup: tuple[Path, bool], runtime: str
) -> None:
    cg, bind = v2_cgroup
    _delegate(cg, user)
    ctx = _layout_context(user, _CGROUP_RUN)
    out = user.base / "out"
    proc = _build_in(
        user, cg, bind, "build", "--progress=plain", "--runtime", runtime,
        "--step-memory", "256m", "--step-pids", "200",
        "--build-context", f"base=oci-layout://{user.base / 'layout'}:latest",
        "--output", f"type=local,dest={out}", str(ctx),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    # the container ran in a step cgroup below the delegated one, the worker beside it
    line = (out / "cgroup").read_text().strip()
    assert line.startswith(f"0::/{cg.name}/ociw-") and line.endswith("/ctr"), line
    assert (cg / "ociworker").is_dir()
    assert [d.name for d in cg.iterdir() if d.is_dir()] == ["ociworker"]  # steps removed
    # the limits of controllers the kernel did not hand down are named, not failed on
    have = (cg / "cgroup.controllers").read_text().split()
    missing = [c for c in ("cpu", "memory", "pids") if c not in have]
    if missing:
        assert f"lacks the {', '.join(missing)} controller" in proc.stderr
    assert _NO_LIMITS not in proc.stderr


@pytest.mark.parametrize("case", ["not delegated", "shared"])
def test_no_usable_cgroup_is_a_warning(user: User, v2_cgroup: tuple[Path, bool], case: str) -> None:
    cg, bind = v2_cgroup
    other = None
    if case == "shared":
        _delegate(cg, user)
        # another process of the user's in the same cgroup (a shell, say)
        other = subprocess.Popen(["sleep", "600"])
        (cg / "cgroup.procs").write_text(str(other.pid))
    try:
        ctx = _layout_context(user, _CGROUP_RUN)
        proc = _build_in(
            user, cg, bind, "build", "--progress=plain", "--step-memory", "256m",
            "--build-context", f"base=oci-layout://{user.base / 'layout'}:latest",
            "--output", f"type=local,dest={user.base / 'out'}", str(ctx),
        )  # fmt: skip
    finally:
        if other is not None:
            other.kill()
            other.wait()
    assert proc.returncode == 0, proc.stderr
    assert _NO_LIMITS in proc.stderr
    if case == "shared":
        assert f"its cgroup /{cg.name} holds 1 other process" in proc.stderr
        assert "systemd-run --user --scope -p Delegate=yes" in proc.stderr
    else:
        assert f"its cgroup /{cg.name} is not delegated to {user.name}" in proc.stderr
    # nothing made in a cgroup that was not the worker's to use
    assert not [d for d in cg.iterdir() if d.is_dir()]


def test_host_without_delegation_warns_and_builds(user: User) -> None:
    ctx = _layout_context(user, _CGROUP_RUN)
    proc = user.ociworker(
        "build", "--progress=plain", "--step-memory", "256m", "--step-pids", "100",
        "--build-context", f"base=oci-layout://{user.base / 'layout'}:latest", str(ctx),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    (warning,) = [ln for ln in proc.stderr.splitlines() if _NO_LIMITS in ln]
    if _fs_type("/sys/fs/cgroup") != "cgroup2fs":
        assert "cgroup v1 (or hybrid) host" in warning
        assert "systemd.unified_cgroup_hierarchy=1" in warning
