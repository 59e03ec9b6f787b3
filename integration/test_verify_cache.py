"""``build --verify-cache`` end to end: real runc, overlayfs, the local registry.

Each step of a build runs again with the cache off in scratch and its layer is
compared with the cached one. The expectations come from the Dockerfiles (the
steps BuildKit lists, which commands read /dev/urandom into the image) and from
what the test did to the state dir (which file it damaged), never from the
check's own output.
"""

from __future__ import annotations

import hashlib
import re
import sqlite3
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from conftest import LEGS_MARK, buildkit_steps, current_cli, normalize_step_name
from test_build import BENCH_CASES, SHARED_BENCH, make_context_case, ow, write_context
from test_daemon import Daemon, cli, start_daemon, stop_daemon

pytestmark = LEGS_MARK

VERDICTS = ("verified", "non-deterministic", "false hit", "not checked")
_LINE = re.compile(
    r"^#\d+ \d+\.\d+ (?P<name>.*): (?P<verdict>" + "|".join(VERDICTS) + r")(?: \((?P<why>.*)\))?$"
)


def verify_lines(stderr: str) -> dict[str, tuple[str, str]]:
    """The check's report in plain progress: step name -> (verdict, why)."""
    out: dict[str, tuple[str, str]] = {}
    for line in stderr.splitlines():
        m = _LINE.match(line)
        if m:
            out[normalize_step_name(m["name"])] = (m["verdict"], m["why"] or "")
    return out


def expected_names(dockerfile: str) -> dict[str, str]:
    """Every name BuildKit may give each step (a FROM shared by stages has
    aliases) -> the step's canonical name."""
    out: dict[str, str] = {}
    for e in buildkit_steps(dockerfile):
        for n in (e.name, *e.aliases):
            out[normalize_step_name(n)] = normalize_step_name(e.name)
    return out


def urandom_steps(dockerfile: str) -> set[str]:
    """The RUN steps whose layer gets random bytes: they read /dev/urandom and
    mount no cache (a cache mount keeps what it writes out of the layer)."""
    return {
        normalize_step_name(e.name)
        for e in buildkit_steps(dockerfile)
        if "/dev/urandom" in e.name and "--mount=type=cache" not in e.name
    }


@pytest.fixture(autouse=True)
def _detach_leaks(tmp_path: Path, mounts_under: Callable[[Path], list[Path]]) -> Iterator[None]:
    yield
    for point in mounts_under(tmp_path):
        subprocess.run(["umount", "--lazy", str(point)], check=False, capture_output=True)


@pytest.mark.parametrize("runtime", ["runc"])
@pytest.mark.parametrize("case", BENCH_CASES)
def test_every_bench_case_verifies_clean(
    case: str,
    runtime: str,
    tmp_path: Path,
    base_image: str,
    require_root: None,
    mounts_under: Callable[[Path], list[Path]],
) -> None:
    root = tmp_path / "state"
    # a copy the leg's user owns (the shared bench may be closed to the test user)
    ctx = (
        make_context_case(tmp_path) if case == "context" else current_cli().own(SHARED_BENCH / case)
    )
    dockerfile = (ctx / "Dockerfile").read_text()
    ow(root, "build", "--progress", "plain", "--runtime", runtime, str(ctx))
    out = tmp_path / "img.tar"
    proc = ow(
        root, "build", "--progress", "plain", "--runtime", runtime, "--verify-cache",
        "-o", f"type=oci,dest={out}", str(ctx),
    )  # fmt: skip
    report = verify_lines(proc.stderr)
    names = expected_names(dockerfile)
    steps = {names.get(n, n): v for n, v in report.items() if not n.startswith("[internal]")}
    # one line per step BuildKit lists, and no other
    assert set(steps) == set(names.values()), proc.stderr[-4000:]
    random = urandom_steps(dockerfile)
    for name, (verdict, why) in steps.items():
        if name in random:
            assert verdict == "non-deterministic", (name, why)
        elif name.split("] ", 1)[1].startswith("FROM"):
            assert verdict in ("verified", "not checked"), (name, why)
        else:
            assert verdict == "verified", (name, why, proc.stderr[-4000:])
    assert "0 false hits" in proc.stderr
    assert out.is_file()  # a clean check exports as usual
    assert mounts_under(root) == []


def test_nondeterministic_step_is_named_and_the_build_succeeds(
    runtime: str, tmp_path: Path, base_image: str, require_root: None
) -> None:
    dockerfile = (
        f"FROM {base_image}\n"
        "RUN echo stable > /s\n"
        "RUN head -c 32 /dev/urandom > /r\n"
        "RUN cat /s > /t\n"
    )
    ctx = write_context(tmp_path, dockerfile)
    root = tmp_path / "state"
    ow(root, "build", "--runtime", runtime, str(ctx))
    out = tmp_path / "img.tar"
    proc = ow(
        root, "build", "--progress", "plain", "--runtime", runtime, "--verify-cache",
        "-o", f"type=oci,dest={out}", str(ctx),
    )  # fmt: skip
    report = verify_lines(proc.stderr)
    verdict, why = report["[3/4] RUN head -c 32 /dev/urandom > /r"]
    assert verdict == "non-deterministic"
    assert "/r (content)" in why
    assert report["[2/4] RUN echo stable > /s"][0] == "verified"
    assert report["[4/4] RUN cat /s > /t"][0] == "verified"
    # named in a warning too (what tty mode shows of it: no step logs), and not a failure
    warning = next(line for line in proc.stderr.splitlines() if line.startswith("WARNING: verify"))
    assert "RUN head -c 32 /dev/urandom > /r" in warning
    assert out.is_file()


def _damage(root: Path, content: bytes, new: bytes) -> Path:
    """Rewrite the one file under the snapshots of ``root`` holding ``content``."""
    found = [
        p
        for p in (root / "snapshots").rglob("*")
        if p.is_file() and not p.is_symlink() and p.stat().st_size == len(content)
        and p.read_bytes() == content
    ]  # fmt: skip
    assert len(found) == 1, found
    found[0].write_bytes(new)
    return found[0]


def test_damaged_cache_record_is_a_false_hit_and_fails_before_export(
    runtime: str, tmp_path: Path, base_image: str, require_root: None
) -> None:
    marker = b"cached-content-4f1c\n"
    dockerfile = (
        f"FROM {base_image}\n"
        "RUN echo cached-content-4f1c > /f\n"
        "RUN head -c 8 /dev/urandom > /noise\n"
        "RUN wc -c /f > /n\n"
    )
    ctx = write_context(tmp_path, dockerfile)
    root = tmp_path / "state"
    ow(root, "build", "--runtime", runtime, str(ctx))
    # the cached snapshot of step 2 no longer holds what the step writes
    _damage(root, marker, b"damaged\n")
    out = tmp_path / "img.tar"
    proc = ow(
        root, "build", "--progress", "plain", "--runtime", runtime, "--verify-cache",
        "-o", f"type=oci,dest={out}", str(ctx), check=False,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr[-3000:]
    report = verify_lines(proc.stderr)
    verdict, why = report["[2/4] RUN echo cached-content-4f1c > /f"]
    assert verdict == "false hit"
    assert "/f (content)" in why
    # the damaged bytes are never shown, only the path
    assert "damaged" not in proc.stderr
    assert report["[3/4] RUN head -c 8 /dev/urandom > /noise"][0] == "non-deterministic"
    # step 4 was cached from before the damage: its own layer is right
    assert report["[4/4] RUN wc -c /f > /n"][0] == "verified"
    error = proc.stderr[proc.stderr.index("ERROR:") :]
    assert "false cache hit" in error and "[2/4] RUN echo cached-content-4f1c > /f" in error
    assert "nothing was exported" in error
    assert not out.exists()
    # without the check the same build takes the damaged record (what the check is for)
    plain = ow(
        root, "build", "--runtime", runtime, "-o", f"type=local,dest={tmp_path / 'o'}", str(ctx)
    )
    assert plain.returncode == 0
    assert (tmp_path / "o" / "f").read_bytes() == b"damaged\n"


def _state(root: Path) -> dict[str, object]:
    """What a build's cache is, as files and rows (no use counts and times,
    which any cached build changes): du's records, the cache index's records
    and layers, the snapshots, the content store, the cache mounts' files."""
    du = ow(root, "du", "--verbose").stdout
    records = [
        "\n".join(
            line for line in block.splitlines()
            if not line.startswith(("Last used:", "Usage count:"))
        )
        for block in du.strip().split("\n\n")
    ]  # fmt: skip
    db = sqlite3.connect(root / "cache.db")
    try:
        rows = db.execute(
            "SELECT key, kind, ref, description, created FROM records ORDER BY key"
        ).fetchall()
        layers = db.execute("SELECT * FROM layers ORDER BY 1, 2").fetchall()
    finally:
        db.close()

    def files(d: Path) -> dict[str, str]:
        return {
            str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(d.rglob("*"))
            if p.is_file() and not p.is_symlink()
        }

    return {
        "du": sorted(records),
        "records": rows,
        "layers": layers,
        "snapshots": sorted(p.name for p in (root / "snapshots" / "snapshots").iterdir()),
        "content": sorted(p.name for p in (root / "content" / "blobs" / "sha256").iterdir()),
        "cachemounts": files(root / "cachemounts"),
    }


def _use_counts(root: Path) -> dict[str, int]:
    db = sqlite3.connect(root / "cache.db")
    try:
        return dict(db.execute("SELECT key, usage_count FROM records").fetchall())
    finally:
        db.close()


def test_verify_run_leaves_the_real_cache_as_a_cached_build_does(
    runtime: str, tmp_path: Path, base_image: str, require_root: None
) -> None:
    dockerfile = (
        f"FROM {base_image}\n"
        "RUN --mount=type=cache,target=/c echo run >> /c/log && cp /c/log /seen\n"
        "RUN head -c 16 /dev/urandom > /r\n"
        "COPY Dockerfile /d\n"
    )
    ctx = write_context(tmp_path, dockerfile)
    root = tmp_path / "state"
    ow(root, "build", "--runtime", runtime, str(ctx))
    ow(root, "build", "--runtime", runtime, str(ctx))
    before, counts_before = _state(root), _use_counts(root)
    # runs every step twice in scratch (the random step differs), cache mount included
    proc = ow(
        root, "build", "--progress", "plain", "--runtime", runtime, "--verify-cache", str(ctx)
    )
    assert "[verify-cache run 2]" in proc.stderr
    after, counts_after = _state(root), _use_counts(root)
    assert after == before
    # a use is counted as a cached build without the check counts it, no more
    ow(root, "build", "--runtime", runtime, str(ctx))
    counts_plain = _use_counts(root)
    assert {k: counts_after[k] - counts_before[k] for k in counts_before} == {
        k: counts_plain[k] - counts_after[k] for k in counts_after
    }
    # the real cache mount saw the first build's run only
    log = [p for p in (root / "cachemounts").rglob("log") if p.is_file()]
    assert [p.read_text() for p in log] == ["run\n"]
    assert list((root / "tmp").glob("*/verify-*")) == []


@pytest.mark.rootless_skip("root's daemon (test_daemon.start_daemon)")
def test_false_hit_over_the_daemon(
    tmp_path: Path, base_image: str, require_root: None, registry: str
) -> None:
    d: Daemon = start_daemon(tmp_path / "droot", tmp_path / "d.sock")
    try:
        marker = b"daemon-cached-9d2e\n"
        ctx = write_context(tmp_path, f"FROM {base_image}\nRUN echo daemon-cached-9d2e > /f\n")
        cli(d, "build", str(ctx))
        clean = cli(d, "build", "--progress", "plain", "--verify-cache", str(ctx))
        assert verify_lines(clean.stderr)["[2/2] RUN echo daemon-cached-9d2e > /f"][0] == "verified"
        _damage(d.root, marker, b"x\n")
        proc = cli(d, "build", "--progress", "plain", "--verify-cache", str(ctx), check=False)
        assert proc.returncode == 1
        verdict, why = verify_lines(proc.stderr)["[2/2] RUN echo daemon-cached-9d2e > /f"]
        assert verdict == "false hit" and "/f (content)" in why
        assert "false cache hit" in proc.stderr[proc.stderr.index("ERROR:") :]
    finally:
        assert stop_daemon(d) == 0


def test_source_date_epoch_makes_rerun_layers_identical(
    runtime: str, tmp_path: Path, base_image: str, require_root: None
) -> None:
    # the step outlasts a second, so a re-run's file times differ from the cached ones
    ctx = write_context(tmp_path, f"FROM {base_image}\nRUN echo hi > /f && sleep 1.1\n")
    step = "[2/2] RUN echo hi > /f && sleep 1.1"
    for args, want in (
        ((), "same files; only timestamps differ"),
        (("--build-arg", "SOURCE_DATE_EPOCH=0"), "identical layer sha256:"),
    ):
        root = tmp_path / f"state{len(args)}"
        ow(root, "build", "--runtime", runtime, *args, str(ctx))
        proc = ow(
            root, "build", "--progress", "plain", "--runtime", runtime, "--verify-cache",
            *args, str(ctx),
        )  # fmt: skip
        verdict, why = verify_lines(proc.stderr)[step]
        assert verdict == "verified" and why.startswith(want), (args, why)


def test_damaged_base_layer_snapshot_is_a_false_hit(
    runtime: str, tmp_path: Path, base_image: str, require_root: None
) -> None:
    ctx = write_context(tmp_path, f"FROM {base_image}\nRUN echo hi > /f\n")
    root = tmp_path / "state"
    ow(root, "build", "--runtime", runtime, str(ctx))
    clean = ow(
        root, "build", "--progress", "plain", "--runtime", runtime, "--verify-cache", str(ctx)
    )
    (from_step,) = [n for n in verify_lines(clean.stderr) if "] FROM " in n]
    assert verify_lines(clean.stderr)[from_step][0] == "verified"
    # the unpacked base image no longer is the image: its /etc/group was edited
    (group,) = [p for p in (root / "snapshots").rglob("group") if p.parent.name == "etc"]
    group.write_text(group.read_text() + "intruder:x:4242:\n")
    proc = ow(
        root, "build", "--progress", "plain", "--runtime", runtime, "--verify-cache", str(ctx),
        check=False,
    )  # fmt: skip
    assert proc.returncode == 1
    verdict, why = verify_lines(proc.stderr)[from_step]
    assert verdict == "false hit" and "/etc/group (content)" in why, why
    assert "intruder" not in proc.stderr


def test_a_step_that_fails_without_the_cache_fails_the_check_by_name(
    runtime: str, tmp_path: Path, base_image: str, require_root: None
) -> None:
    # another build warms the cache mount; the step passes only with it warm
    root = tmp_path / "state"
    warm = write_context(
        tmp_path, f"FROM {base_image}\nRUN --mount=type=cache,target=/c touch /c/warm\n", name="w"
    )
    ow(root, "build", "--runtime", runtime, str(warm))
    ctx = write_context(
        tmp_path, f"FROM {base_image}\nRUN --mount=type=cache,target=/c test -e /c/warm\n"
    )
    ow(root, "build", "--runtime", runtime, str(ctx))
    out = tmp_path / "img.tar"
    proc = ow(
        root, "build", "--progress", "plain", "--runtime", runtime, "--verify-cache",
        "-o", f"type=oci,dest={out}", str(ctx), check=False,
    )  # fmt: skip
    assert proc.returncode == 1
    error = proc.stderr[proc.stderr.index("ERROR:") :]
    assert "run 1 without the cache failed" in error
    assert "[2/2] RUN --mount=type=cache,target=/c test -e /c/warm" in error
    assert not out.exists()


def test_a_context_change_the_key_misses_is_a_false_hit(
    runtime: str, tmp_path: Path, base_image: str, require_root: None
) -> None:
    # A hard link in the context replaced by a copy of the same bytes: COPY's
    # key covers each file's content, mode and owner, not which files share an
    # inode (BuildKit's contenthash gives a hard link its target's record too),
    # so the rebuild is a hit, and the cached layer still holds a hard link
    # that a build from scratch does not make.
    ctx = write_context(tmp_path, f"FROM {base_image}\nCOPY . /c/\n", {"d/x": "same\n"})
    (ctx / "hl").hardlink_to(ctx / "d" / "x")
    root = tmp_path / "state"
    ow(root, "build", "--runtime", runtime, str(ctx))
    (ctx / "hl").unlink()
    (ctx / "hl").write_text("same\n")
    proc = ow(
        root, "build", "--progress", "plain", "--runtime", runtime, "--verify-cache", str(ctx),
        check=False,
    )  # fmt: skip
    assert proc.returncode == 1
    verdict, why = verify_lines(proc.stderr)["[2/2] COPY . /c/"]
    assert verdict == "false hit"
    # one side has a hard link where the other has a file; which name is the
    # link is the tar writer's choice, so both are accepted
    assert re.search(r"/c/(hl|d/x) \(type (hardlink vs file|file vs hardlink)\)", why), why
