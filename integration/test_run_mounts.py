"""RUN --mount end to end: bind, cache, tmpfs, secret and ssh, on runc and crun, through
the CLI, with the real runtime, overlayfs, registry and (for ssh) a real ssh-agent."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import re
import secrets
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from conftest import LEGS_MARK, current_cli
from test_build import ow, runtime_containers, write_context

pytestmark = LEGS_MARK


def _build(
    root: Path, runtime: str, ctx: Path, *extra: str, check: bool = True
) -> subprocess.CompletedProcess[str]:
    return ow(
        root, "build", "--progress", "plain", "--runtime", runtime, *extra, str(ctx), check=check
    )


def _clean(root: Path, runtime: str, mounts_under: Callable[[Path], list[Path]]) -> None:
    assert mounts_under(root) == []
    assert runtime_containers(root, runtime) == ""
    tmp = root / "tmp"
    assert not tmp.exists() or list(tmp.iterdir()) == []


def test_bind_mounts(
    runtime: str,
    tmp_path: Path,
    base_image: str,
    require_root: None,
    mounts_under: Callable[[Path], list[Path]],
) -> None:
    ctx = write_context(
        tmp_path,
        f"""FROM {base_image} AS base
RUN mkdir -p /srcdir && echo fromstage > /srcdir/f
FROM {base_image}
RUN --mount=type=bind,source=sub,target=/sub cat /sub/data > /bysource
RUN --mount=type=bind,source=../../sub,target=/up cat /up/data > /clamped
RUN --mount=type=bind,from=base,source=/srcdir,target=/s,rw echo x > /s/new && cat /s/f > /fromstage
RUN --mount=type=bind,from=base,source=/srcdir,target=/s2 test ! -e /s2/new \\
 && echo gone > /discarded \\
 && (touch /s2/y 2>/dev/null && echo rw > /stagero || echo ro > /stagero)
RUN --mount=type=bind,from={base_image},source=/bin,target=/img ls /img/busybox > /fromimage
RUN --mount=type=bind,source=sub,target=/c2,rw touch /c2/new && echo ok > /ctxrw
RUN --mount=target=/ctx cat /ctx/sub/data > /bound && test ! -e /ctx/ignored && echo ok > /noign \\
 && (touch /ctx/w 2>/dev/null && echo rw > /ctxw || echo ro > /ctxw)
""",
        {"sub/data": "hello\n", "ignored": "x", ".dockerignore": "ignored\n"},
    )
    root = tmp_path / "state"
    out = tmp_path / "out"
    _build(root, runtime, ctx, "-o", f"type=local,dest={out}")
    assert (out / "bound").read_text() == "hello\n"
    assert (out / "noign").exists()  # .dockerignore'd files are not visible
    assert (out / "ctxw").read_text() == "ro\n"  # bind is read-only by default
    assert (out / "bysource").read_text() == "hello\n"
    assert (out / "clamped").read_text() == "hello\n"  # ../.. stays inside the context
    assert (out / "fromstage").read_text() == "fromstage\n"
    assert (out / "discarded").read_text() == "gone\n"  # rw writes are thrown away
    assert (out / "stagero").read_text() == "ro\n"
    assert (out / "fromimage").read_text() == "/img/busybox\n"
    assert (out / "ctxrw").exists()
    assert not (ctx / "sub" / "new").exists() and not (ctx / "w").exists()
    for stub in ("ctx", "sub", "up", "s", "s2", "img", "c2"):
        assert not (out / stub).exists(), stub  # mount points leave nothing
    # The key covers the bound subtree only: an unrelated change keeps the steps
    # cached, a change to the bound file re-runs exactly the steps binding it.
    (ctx / "unrelated").write_text("x")
    again = _build(root, runtime, ctx).stderr
    ran = [x for x in again.split("\n\n") if "RUN --mount" in x and "CACHED" not in x]
    assert len(ran) == 1 and "target=/ctx " in ran[0], again  # it binds the whole context
    (ctx / "sub" / "data").write_text("changed\n")
    third = _build(root, runtime, ctx, "-o", f"type=local,dest={tmp_path / 'out3'}").stderr
    assert (tmp_path / "out3" / "bysource").read_text() == "changed\n"
    assert "CACHED" not in third.split("> /bysource", 1)[1].split("\n\n", 1)[0]
    _clean(root, runtime, mounts_under)


def test_cache_mounts(
    runtime: str,
    tmp_path: Path,
    base_image: str,
    require_root: None,
    mounts_under: Callable[[Path], list[Path]],
) -> None:
    ctx = write_context(
        tmp_path,
        f"""FROM {base_image} AS seed
RUN mkdir -p /pkg/sub && echo seeded > /pkg/sub/s
FROM {base_image}
ARG N
RUN --mount=type=cache,target=/c echo $N >> /c/log && cat /c/log > /log
RUN --mount=type=cache,id=owned,target=/o,mode=0700,uid=1234,gid=99 stat -c '%a %u %g' /o > /owned
RUN --mount=type=cache,id=c2,target=/r,ro (touch /r/x 2>/dev/null && echo rw || echo ro) > /ro
RUN --mount=type=cache,id=seeded,target=/p,from=seed,source=/pkg echo more >> /p/sub/s \\
 && cat /p/sub/s > /seeded
RUN --mount=type=cache,id=sub,target=/q,source=/a/b echo in-sub > /q/f
RUN --mount=type=cache,id=sub,target=/q2 cat /q2/a/b/f > /subdir
RUN --mount=type=cache,id=esc,target=/e,source=../../.. touch /e/escape
""",
    )
    root = tmp_path / "state"
    for n in (1, 2):
        out = tmp_path / f"out{n}"
        _build(root, runtime, ctx, "--build-arg", f"N={n}", "-o", f"type=local,dest={out}")
        # Every RUN after ARG N has N in its environment, so each build runs them all
        # again (as BuildKit does) on the caches the previous build left.
        assert (out / "log").read_text() == "".join(f"{i}\n" for i in range(1, n + 1))
        # seeded from the stage once, on first use; later builds find the cache's own
        # contents (a re-seed would reset it to "seeded\nmore\n" every time)
        assert (out / "seeded").read_text() == "seeded\n" + "more\n" * n
    out = tmp_path / "out2"
    assert (out / "owned").read_text() == "700 1234 99\n"
    assert (out / "ro").read_text() == "ro\n"
    assert (out / "subdir").read_text() == "in-sub\n"
    for stub in ("c", "o", "r", "p", "q", "q2", "e"):
        assert not (out / stub).exists(), stub
    # source=../../.. is clamped to the cache's own root
    assert not (root / "escape").exists() and not (root.parent / "escape").exists()
    du = ow(root, "du", "--verbose").stdout
    assert "Type:           exec.cachemount" in du and "Description:    seeded" in du
    _clean(root, runtime, mounts_under)


def test_tmpfs_mount(
    runtime: str,
    tmp_path: Path,
    base_image: str,
    require_root: None,
    mounts_under: Callable[[Path], list[Path]],
) -> None:
    ctx = write_context(
        tmp_path,
        f"""FROM {base_image}
RUN --mount=type=tmpfs,target=/t,size=1m echo x > /t/x \\
 && df -k /t | tail -1 | awk '{{print $1, $2}}' > /df \\
 && (head -c 2000000 /dev/zero > /t/big 2>/dev/null && echo fits || echo full) > /full
""",
    )
    root = tmp_path / "state"
    out = tmp_path / "out"
    _build(root, runtime, ctx, "-o", f"type=local,dest={out}")
    assert (out / "df").read_text() == "tmpfs 1024\n"
    assert (out / "full").read_text() == "full\n"
    assert not (out / "t").exists()
    _clean(root, runtime, mounts_under)


def _decoded(data: bytes) -> Iterator[bytes]:
    """``data`` and whatever it contains: gunzipped, and each member of a tar."""
    yield data
    if data[:2] == b"\x1f\x8b":
        try:
            inner = gzip.decompress(data)
        except (OSError, EOFError):
            return
        yield from _decoded(inner)
        return
    if len(data) > 512 and data[257:262] == b"ustar":
        try:
            with tarfile.open(fileobj=io.BytesIO(data)) as tf:
                for m in tf.getmembers():
                    f = tf.extractfile(m) if m.isfile() else None
                    if f is not None:
                        yield from _decoded(f.read())
        except tarfile.TarError:
            return


def _files_containing(paths: list[Path], needle: bytes) -> list[str]:
    hits = []
    for top in paths:
        walk = [top] if top.is_file() else [p for p in top.rglob("*") if p.is_file()]
        for p in walk:
            if p.is_symlink() or not p.is_file():
                continue
            if any(needle in blob for blob in _decoded(p.read_bytes())):
                hits.append(str(p))
    return hits


def test_secrets_reach_the_step_and_leak_nowhere(
    runtime: str,
    tmp_path: Path,
    base_image: str,
    require_root: None,
    mounts_under: Callable[[Path], list[Path]],
) -> None:
    file_secret = "file-" + secrets.token_hex(16)
    env_secret = "env-" + secrets.token_hex(16)
    (tmp_path / "secret.txt").write_text(file_secret)
    ctx = write_context(
        tmp_path,
        f"""FROM {base_image}
RUN --mount=type=secret,id=fs sha256sum < /run/secrets/fs > /fs.sha \\
 && stat -c '%a %u %g' /run/secrets/fs > /fs.mode
RUN --mount=type=secret,id=es,env=TOKEN printf %s "$TOKEN" | sha256sum > /es.sha \\
 && test ! -e /run/secrets/es && echo noenvfile > /es.nofile
RUN --mount=type=secret,id=fs,target=/etc/my.key,mode=0440,uid=5,gid=6 \\
    stat -c '%a %u %g' /etc/my.key > /tgt.mode
RUN --mount=type=secret,id=fs,env=BOTH,target=/run/secrets/fs \\
    sha256sum < /run/secrets/fs > /both.sha \\
 && printf %s "$BOTH" | sha256sum > /both.env
RUN --mount=type=secret,id=absent test ! -e /run/secrets/absent && echo absent > /absent
""",
    )
    root = tmp_path / "state"
    archive = tmp_path / "img.tar"
    meta = tmp_path / "meta.json"
    out = tmp_path / "out"
    # as root, or as the test user in the rootless leg
    proc = current_cli().run(
        "--debug", "--log-format", "json", "build",
        "--root", str(root), "--runtime", runtime, "--progress", "plain",
        "--secret", f"id=fs,src={tmp_path / 'secret.txt'}", "--secret", "id=es,env=MY_TOKEN",
        "-t", "leaktest:latest", "-o", f"type=oci,dest={archive}",
        "-o", f"type=local,dest={out}", "--metadata-file", str(meta), str(ctx),
        env={"MY_TOKEN": env_secret}, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]

    def sha(s: str) -> str:
        return hashlib.sha256(s.encode()).hexdigest() + "  -\n"

    assert (out / "fs.sha").read_text() == sha(file_secret)  # the RUN saw them
    assert (out / "es.sha").read_text() == sha(env_secret)
    assert (out / "fs.mode").read_text() == "400 0 0\n"
    assert (out / "es.nofile").exists()
    assert (out / "tgt.mode").read_text() == "440 5 6\n"
    assert (out / "both.sha").read_text() == (out / "both.env").read_text() == sha(file_secret)
    assert (out / "absent").exists()
    assert not (out / "run").exists() and not (out / "etc" / "my.key").exists()
    for value in (file_secret, env_secret):
        needle = value.encode()
        assert needle not in (proc.stdout + proc.stderr).encode()
        hits = _files_containing([root, archive, meta, out], needle)
        assert hits == [], f"secret found in {hits}"
    _clean(root, runtime, mounts_under)

    # required and missing: a clear error naming the id, nothing run
    (ctx / "Dockerfile").write_text(
        f"FROM {base_image}\nRUN --mount=type=secret,id=needed,required=true true\n"
    )
    failed = _build(root, runtime, ctx, check=False)
    assert failed.returncode == 1 and "'needed'" in failed.stderr
    _clean(root, runtime, mounts_under)


def _ssh_add_tree(ctx: Path) -> None:
    """The host's ssh-add with its libraries, at the same paths, under ctx/sshroot."""
    dest = ctx / "sshroot"
    binary = Path("/usr/bin/ssh-add")
    files = [binary]
    for line in subprocess.run(
        ["ldd", str(binary)], capture_output=True, text=True
    ).stdout.splitlines():
        m = re.search(r"(/\S+) \(0x", line)
        if m:
            files.append(Path(m.group(1)))
    for f in files:
        target = dest / str(f).lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(f.resolve(), target)


@pytest.fixture
def ssh_agent(tmp_path: Path) -> Iterator[tuple[str, str, Path]]:
    """(socket, fingerprint, key file) of a real ssh-agent holding a fresh ed25519 key."""
    if shutil.which("ssh-agent") is None:
        pytest.fail("openssh-client is not installed: run scripts/setup-host")
    sock = tmp_path / "agent.sock"
    key = tmp_path / "id_ed25519"
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "test@key", "-f", str(key)],
        check=True,
    )
    agent = subprocess.Popen(["ssh-agent", "-D", "-a", str(sock)], stdout=subprocess.DEVNULL)
    try:
        for _ in range(100):
            if sock.exists():
                break
            subprocess.run(["sleep", "0.05"], check=True)
        env = dict(os.environ, SSH_AUTH_SOCK=str(sock))
        subprocess.run(["ssh-add", "-q", str(key)], check=True, env=env)
        fp = subprocess.run(
            ["ssh-keygen", "-lf", f"{key}.pub"], capture_output=True, text=True, check=True
        )
        yield str(sock), fp.stdout.split()[1], key
    finally:
        agent.terminate()
        agent.wait()


@pytest.mark.rootless_skip("the ssh-agent runs as root, and an agent answers no other user")
def test_ssh_mounts_forward_an_agent_and_serve_key_files(
    runtime: str,
    tmp_path: Path,
    base_image: str,
    require_root: None,
    mounts_under: Callable[[Path], list[Path]],
    ssh_agent: tuple[str, str, Path],
) -> None:
    sock, fingerprint, key = ssh_agent
    ctx = write_context(
        tmp_path,
        f"""FROM {base_image}
COPY sshroot/ /
RUN --mount=type=ssh ssh-add -l > /default.l && echo "$SSH_AUTH_SOCK" > /sock \\
 && stat -c '%a' /run/buildkit/ssh_agent.0 > /mode
RUN --mount=type=ssh,id=mykey,target=/agent,mode=0666 SSH_AUTH_SOCK=/agent ssh-add -l > /mykey.l \\
 && stat -c '%a' /agent > /mykey.mode && (ssh-add -D 2>/dev/null \\
 && echo removed || echo refused) > /remove
RUN --mount=type=ssh,id=missing test -z "$SSH_AUTH_SOCK" && echo skipped > /optional
""",
    )
    _ssh_add_tree(ctx)
    root = tmp_path / "state"
    out = tmp_path / "out"
    env = dict(os.environ, SSH_AUTH_SOCK=sock)
    cmd = [
        sys.executable, "-m", "ociworker", "build", "--root", str(root), "--runtime", runtime,
        "--progress", "plain", "--ssh", "default", "--ssh", f"mykey={key}",
        "-o", f"type=local,dest={out}", str(ctx),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert fingerprint in (out / "default.l").read_text()
    assert (out / "sock").read_text() == "/run/buildkit/ssh_agent.0\n"
    assert (out / "mode").read_text() == "600\n"
    assert fingerprint in (out / "mykey.l").read_text()  # through our own agent
    assert (out / "mykey.mode").read_text() == "666\n"
    assert (out / "remove").read_text() == "refused\n"
    assert (out / "optional").read_text() == "skipped\n"
    assert not (out / "run").exists() and not (out / "agent").exists()
    _clean(root, runtime, mounts_under)

    (ctx / "Dockerfile").write_text(
        f"FROM {base_image}\nRUN --mount=type=ssh,id=nope,required=true true\n"
    )
    failed = _build(root, runtime, ctx, check=False)
    assert failed.returncode == 1 and "'nope'" in failed.stderr


@pytest.mark.rootless_skip("root's daemon and ssh-agent (ociworker.testing.spawn_daemon)")
def test_ssh_mounts_over_the_daemon_reach_the_clients_agent_every_time(
    runtime: str,
    tmp_path: Path,
    base_image: str,
    require_root: None,
    ssh_agent: tuple[str, str, Path],
) -> None:
    """Each step opens the client's agent through the daemon's session and writes
    its request at once; 10 steps, built twice, so a dropped or stalled forward (the
    bug was about 1 connection in 5) cannot pass."""
    from ociworker.testing.daemon import spawn_daemon

    sock, fingerprint, _ = ssh_agent
    steps = "".join(f"RUN --mount=type=ssh ssh-add -l > /l{i}\n" for i in range(10))
    ctx = write_context(tmp_path, f"FROM {base_image}\nCOPY sshroot/ /\n{steps}")
    _ssh_add_tree(ctx)
    dsock = tmp_path / "d.sock"
    env_without_agent = {k: v for k, v in os.environ.items() if k != "SSH_AUTH_SOCK"}
    daemon_args = ["--addr", f"unix://{dsock}", "--root", str(tmp_path / "droot")]
    daemon_args += ["--runtime", runtime]
    saved = os.environ.pop("SSH_AUTH_SOCK", None)
    try:  # the daemon holds no agent of its own
        proc = spawn_daemon(daemon_args, tmp_path / "daemon.log")
    finally:
        if saved is not None:
            os.environ["SSH_AUTH_SOCK"] = saved
    try:
        for n in range(2):
            out = tmp_path / f"out{n}"
            cmd = [
                sys.executable, "-m", "ociworker", "build", "--addr", f"unix://{dsock}",
                "--progress", "plain", "--ssh", "default", "--no-cache",
                "-o", f"type=local,dest={out}", str(ctx),
            ]  # fmt: skip
            done = subprocess.run(
                cmd,
                capture_output=True,
                text=True,
                env=dict(env_without_agent, SSH_AUTH_SOCK=sock),
                # ten ssh-add runs take seconds; a stall fails here, not after 10 min
                timeout=300,
            )
            assert done.returncode == 0, done.stderr[-3000:]
            for i in range(10):
                assert fingerprint in (out / f"l{i}").read_text(), i
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def test_parallel_stages_share_or_lock_one_cache(
    runtime: str,
    tmp_path: Path,
    base_image: str,
    require_root: None,
    mounts_under: Callable[[Path], list[Path]],
) -> None:
    # Two stages write the shared cache, two the locked one, all four in parallel.
    # Each locked step stamps its start and end (a counter, not a clock) so the
    # test can tell whether two of them ever overlapped.
    ctx = write_context(
        tmp_path,
        f"""FROM {base_image} AS a
ARG I
RUN --mount=type=cache,id=shared,target=/c,sharing=shared echo a > /c/a-$I
FROM {base_image} AS b
ARG I
RUN --mount=type=cache,id=shared,target=/c,sharing=shared echo b > /c/b-$I
FROM {base_image} AS la
ARG I
RUN --mount=type=cache,id=locked,target=/l,sharing=locked echo start-a-$I >> /l/log \\
 && usleep 100000 && echo end-a-$I >> /l/log
FROM {base_image} AS lb
ARG I
RUN --mount=type=cache,id=locked,target=/l,sharing=locked echo start-b-$I >> /l/log \\
 && usleep 100000 && echo end-b-$I >> /l/log
FROM {base_image}
COPY --from=a /bin/true /a
COPY --from=b /bin/true /b
COPY --from=la /bin/true /la
COPY --from=lb /bin/true /lb
RUN --mount=type=cache,id=shared,target=/c --mount=type=cache,id=locked,target=/l,sharing=locked \\
    ls /c > /shared.ls && cat /l/log > /locked.log
""",
    )
    root = tmp_path / "state"
    rounds = 20
    for i in range(rounds):
        _build(root, runtime, ctx, "--build-arg", f"I={i}")
    out = tmp_path / "out"
    _build(root, runtime, ctx, "--build-arg", f"I={rounds}", "-o", f"type=local,dest={out}")
    listed = set((out / "shared.ls").read_text().split())
    assert listed == {f"{s}-{i}" for s in "ab" for i in range(rounds + 1)}
    log = (out / "locked.log").read_text().split()
    assert len(log) == 4 * (rounds + 1)
    # never interleaved: every start is directly followed by its own end
    for start, end in zip(log[::2], log[1::2], strict=True):
        assert start.startswith("start-") and end == "end-" + start.removeprefix("start-"), log
    _clean(root, runtime, mounts_under)


def test_private_sharing_gives_a_concurrent_writer_its_own_copy(
    runtime: str, tmp_path: Path, base_image: str, require_root: None
) -> None:
    # The two steps meet through a shared cache before they list the private one,
    # so they provably hold it at the same time (no timing assumption).
    meet = (
        "RUN --mount=type=cache,id=p,target=/c,sharing=private "
        "--mount=type=cache,id=meet,target=/m,sharing=shared "
        "touch /c/{me} /m/{me} && i=0 && while [ ! -e /m/{other} ] && [ $i -lt 600 ]; "
        "do usleep 100000; i=$((i+1)); done && test -e /m/{other} && ls /c > /seen\n"
    )
    ctx = write_context(
        tmp_path,
        f"FROM {base_image} AS a\n"
        + meet.format(me="a", other="b")
        + f"FROM {base_image} AS b\n"
        + meet.format(me="b", other="a")
        + f"FROM {base_image}\nCOPY --from=a /seen /a\nCOPY --from=b /seen /b\n",
    )
    root = tmp_path / "state"
    out = tmp_path / "out"
    _build(root, runtime, ctx, "-o", f"type=local,dest={out}")
    # neither writer saw the other's file
    assert (out / "a").read_text() == "a\n"
    assert (out / "b").read_text() == "b\n"


def test_du_lists_cache_mounts_and_prune_filter_removes_only_them(
    tmp_path: Path, base_image: str, require_root: None
) -> None:
    ctx = write_context(
        tmp_path,
        f"FROM {base_image}\nRUN --mount=type=cache,id=mycache,target=/c "
        "head -c 100000 /dev/urandom > /c/blob && echo built > /built\n",
    )
    root = tmp_path / "state"
    _build(root, "runc", ctx)
    du = ow(root, "du", "--verbose", "--filter", "type=exec.cachemount").stdout
    assert "Description:    mycache" in du and "kB" in du.split("Size:", 1)[1].splitlines()[0]
    assert "RUN --mount" in ow(root, "du", "--verbose").stdout
    pruned = ow(root, "prune", "--filter", "type=exec.cachemount").stdout.splitlines()
    assert len(pruned) == 3 and pruned[-1].startswith("Total:") and "kB" in pruned[-1]
    after = ow(root, "du", "--verbose").stdout
    assert "exec.cachemount" not in after and "RUN --mount" in after
    rebuilt = _build(root, "runc", ctx).stderr
    assert "CACHED" in rebuilt.split("RUN --mount", 1)[1]
    bad = ow(root, "prune", "--filter", "type=image", check=False)
    assert bad.returncode == 1 and "--filter" in bad.stderr


def test_mount_targets_through_symlinks_stay_in_the_rootfs(
    runtime: str,
    tmp_path: Path,
    base_image: str,
    require_root: None,
    mounts_under: Callable[[Path], list[Path]],
) -> None:
    marker = "ociw-escape-" + secrets.token_hex(4)
    ctx = write_context(
        tmp_path,
        f"""FROM {base_image}
RUN ln -s /../../../tmp /up && mkdir /real && ln -s /real /link
RUN --mount=type=tmpfs,target=/up/{marker} echo x > /up/{marker}/f
RUN --mount=type=tmpfs,target=/link/sub touch /link/sub/f && ls -d /real/sub > /viasym
RUN --mount=type=tmpfs,target=/new/deep/dir true
""",
    )
    root = tmp_path / "state"
    out = tmp_path / "out"
    _build(root, runtime, ctx, "-o", f"type=local,dest={out}")
    assert not Path("/tmp", marker).exists()  # resolved inside the rootfs, not the host
    assert not (out / "tmp" / marker).exists()  # and the stub went away
    assert (out / "viasym").read_text() == "/real/sub\n"
    assert not (out / "real" / "sub").exists() and not (out / "new").exists()
    _clean(root, runtime, mounts_under)
