"""Build cache export and import end to end (``--cache-to`` / ``--cache-from``):
two workers with their own roots share one cache through the local registry, an
OCI layout directory, or the image's inline cache. Real runc (spied on: a
wrapper that logs every container start), overlayfs and docker-registry."""

from __future__ import annotations

import gzip
import hashlib
import json
import secrets
import subprocess
import tarfile
import threading
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from conftest import LEGS_MARK, ExpectedStep, assert_lists_steps, buildkit_steps
from test_build import ow, write_context, write_runtime_spy
from test_daemon import cli, start_daemon, stop_daemon

pytestmark = LEGS_MARK

_ACCEPT = "application/vnd.oci.image.manifest.v1+json"

#: two stages, RUNs in each, COPY --from, context files in both
MULTI_STAGE = """\
FROM {base} AS build
RUN echo one > /one && cat /proc/sys/kernel/random/uuid > /id
COPY a.txt /a.txt
RUN cat /a.txt /id > /a2

FROM {base}
RUN cat /proc/sys/kernel/random/uuid > /final-id
COPY --from=build /a2 /a2
COPY b.txt /b.txt
RUN cat /b.txt /a2 > /both
"""
FILES = {"a.txt": "a1\n", "b.txt": "b1\n"}


@pytest.fixture(autouse=True)
def _detach_leaks(tmp_path: Path, mounts_under: Callable[[Path], list[Path]]) -> Iterator[None]:
    yield
    for point in mounts_under(tmp_path):
        subprocess.run(["umount", "--lazy", str(point)], check=False, capture_output=True)


def _ref(registry: str, name: str) -> str:
    return f"{registry}/cache-test/{name}-{uuid.uuid4().hex[:8]}:cache"


def _layers(archive: Path) -> list[str]:
    """Layer digests of the image in an OCI archive, as a consumer reads them."""
    with tarfile.open(archive) as tf:
        index = json.load(tf.extractfile("index.json"))  # type: ignore[arg-type]
        digest = index["manifests"][0]["digest"].partition(":")[2]
        manifest = json.load(tf.extractfile(f"blobs/sha256/{digest}"))  # type: ignore[arg-type]
    return [str(layer["digest"]) for layer in manifest["layers"]]


def _base_layers(image: str) -> int:
    out = subprocess.run(
        ["skopeo", "inspect", "--tls-verify=false", f"docker://{image}"],
        check=True,
        capture_output=True,
        text=True,
    )
    return len(json.loads(out.stdout)["Layers"])


def _runs(log: Path) -> int:
    return len(log.read_text().splitlines()) if log.exists() else 0


def _stage_runs(dockerfile: str, stage: str) -> int:
    """RUN instructions in the stage ``stage`` of ``dockerfile`` (from its text)."""
    count, current = 0, None
    for line in dockerfile.splitlines():
        word = line.split(" ", 1)[0].upper()
        if word == "FROM":
            current = line.split()[-1] if " AS " in line.upper() else ""
        elif word == "RUN" and current == stage:
            count += 1
    return count


def _build_stage_steps(steps: list[ExpectedStep]) -> list[str]:
    """The steps of stage ``build`` but its FROM (the final stage has that base too)."""
    return [s.name for s in steps if s.name.startswith("[build ") and " FROM " not in s.name]


def _worker1(tmp_path: Path, ctx: Path, *cache_to: str) -> Path:
    out = tmp_path / "w1.tar"
    flags = [a for c in cache_to for a in ("--cache-to", c)]
    ow(
        tmp_path / "rootA",
        "build",
        "--progress",
        "plain",
        *flags,
        "-o",
        f"type=oci,dest={out}",
        str(ctx),
    )
    return out


def _worker2(
    tmp_path: Path, ctx: Path, *cache_from: str, name: str = "rootB", extra: tuple[str, ...] = ()
) -> tuple[subprocess.CompletedProcess[str], Path, Path]:
    """A worker with an empty root, a spied runc, the given --cache-from."""
    spies = tmp_path / f"spy-{name}"
    spies.mkdir()
    spy, log = write_runtime_spy(spies, "runc")
    out = tmp_path / f"{name}.tar"
    flags = [a for c in cache_from for a in ("--cache-from", c)]
    proc = ow(
        tmp_path / name,
        "build",
        "--progress",
        "plain",
        "--runtime",
        str(spy),
        *flags,
        *extra,
        "-o",
        f"type=oci,dest={out}",
        str(ctx),
    )
    return proc, log, out


@pytest.mark.parametrize("kind", ["registry", "local"])
@pytest.mark.parametrize("mode", ["max", "min"])
def test_two_workers_one_cache(
    kind: str, mode: str, tmp_path: Path, registry: str, base_image: str, require_root: None
) -> None:
    dockerfile = MULTI_STAGE.format(base=base_image)
    ctx = write_context(tmp_path, dockerfile, FILES)
    if kind == "registry":
        ref = _ref(registry, "two-workers")
        to, frm = f"type=registry,ref={ref},mode={mode}", f"type=registry,ref={ref}"
    else:
        to, frm = (
            f"type=local,dest={tmp_path / 'lc'},mode={mode}",
            f"type=local,src={tmp_path / 'lc'}",
        )
    first = _worker1(tmp_path, ctx, to)

    again, log, second = _worker2(tmp_path, ctx, frm)
    steps = buildkit_steps(dockerfile)
    if mode == "max":
        # every step BuildKit lists, CACHED, and no container started
        assert_lists_steps(again.stderr, steps, {})
        assert _runs(log) == 0, log.read_text()
    else:
        # min: only the final image's steps are in the cache; the intermediate
        # stage runs again (its RUNs start containers), the final stage's do not
        ran = {name: ("DONE",) for name in _build_stage_steps(steps)}
        assert len(ran) == 3
        assert_lists_steps(again.stderr, steps, ran)
        assert _runs(log) == _stage_runs(dockerfile, "build") == 2
    # the same image: worker 1's layers, digest for digest
    assert _layers(second) == _layers(first)
    # the base's layers (as skopeo reads them) and the final stage's 4 steps
    assert len(_layers(first)) == _base_layers(base_image) + 4


def test_inline_cache_through_the_pushed_image(
    tmp_path: Path, registry: str, base_image: str, require_root: None
) -> None:
    # one stage: an inline cache holds the image's own layers (mode=min), as BuildKit's
    dockerfile = (
        f"FROM {base_image}\nRUN cat /proc/sys/kernel/random/uuid > /id\n"
        "COPY b.txt /b.txt\nRUN cat /b.txt /id > /both\n"
    )
    ctx = write_context(tmp_path, dockerfile, FILES)
    first = _worker1(tmp_path, ctx, "type=inline")
    image = _ref(registry, "inline").replace(":cache", ":latest")
    # pushed by a tool of its own (skopeo keeps the blobs and the config as they are)
    subprocess.run(
        ["skopeo", "copy", "--dest-tls-verify=false", f"oci-archive:{first}", f"docker://{image}"],
        check=True,
        capture_output=True,
    )
    again, log, second = _worker2(tmp_path, ctx, image)
    assert_lists_steps(again.stderr, buildkit_steps(dockerfile), {})
    assert _runs(log) == 0, log.read_text()
    assert _layers(second) == _layers(first)

    # multi-stage: the intermediate stage is not in an inline cache, so it runs
    dockerfile = MULTI_STAGE.format(base=base_image)
    ctx2 = write_context(tmp_path, dockerfile, FILES, name="ctx2")
    (tmp_path / "w1.tar").unlink()
    first = _worker1(tmp_path, ctx2, "type=inline")
    subprocess.run(
        ["skopeo", "copy", "--dest-tls-verify=false", f"oci-archive:{first}", f"docker://{image}"],
        check=True,
        capture_output=True,
    )
    again, log, second = _worker2(tmp_path, ctx2, f"type=registry,ref={image}", name="rootC")
    steps = buildkit_steps(dockerfile)
    assert_lists_steps(again.stderr, steps, {n: ("DONE",) for n in _build_stage_steps(steps)})
    assert _runs(log) == 2
    assert _layers(second) == _layers(first)


def test_changed_context_file_reruns_only_its_steps(
    tmp_path: Path, registry: str, base_image: str, require_root: None
) -> None:
    dockerfile = MULTI_STAGE.format(base=base_image)
    ctx = write_context(tmp_path, dockerfile, FILES)
    ref = _ref(registry, "changed")
    first = _worker1(tmp_path, ctx, f"type=registry,ref={ref},mode=max")
    (ctx / "b.txt").write_text("b2\n")
    again, log, second = _worker2(tmp_path, ctx, ref)
    # From the Dockerfile: the COPY of b.txt and every step after it in its stage
    steps = buildkit_steps(dockerfile)
    final = [s.name for s in steps if s.name.startswith("[stage-1 ")]
    changed = next(i for i, n in enumerate(final) if "b.txt" in n)
    ran = {n: ("DONE",) for n in final[changed:]}
    assert len(ran) == 2
    assert_lists_steps(again.stderr, steps, ran)
    assert _runs(log) == sum(1 for n in ran if " RUN " in n) == 1
    # the layers below the changed COPY are worker 1's, the two above are new
    assert _layers(second)[:-2] == _layers(first)[:-2]
    assert _layers(second)[-2] != _layers(first)[-2]


def _registry_json(url: str, accept: str = _ACCEPT) -> dict[str, object]:
    req = urllib.request.Request(url, headers={"Accept": accept})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return dict(json.load(resp))


def _registry_blob(registry: str, repo: str, digest: str) -> bytes:
    with urllib.request.urlopen(f"http://{registry}/v2/{repo}/blobs/{digest}", timeout=30) as r:
        return bytes(r.read())


def test_two_exports_to_one_ref_at_once_leave_a_whole_cache(
    tmp_path: Path, registry: str, base_image: str, require_root: None
) -> None:
    dockerfile = f"FROM {base_image}\nARG V\nRUN echo $V > /v\nCOPY b.txt /b\n"
    ctx = write_context(tmp_path, dockerfile, FILES)
    ref = _ref(registry, "race")
    procs: dict[str, subprocess.CompletedProcess[str]] = {}

    def export(v: str) -> None:
        procs[v] = ow(
            tmp_path / f"root-{v}",
            "build",
            "--progress",
            "plain",
            "--build-arg",
            f"V={v}",
            "--cache-to",
            f"type=registry,ref={ref},mode=max",
            str(ctx),
            check=False,
        )

    threads = [threading.Thread(target=export, args=(v,)) for v in ("one", "two")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for v, p in procs.items():
        # both succeed, or one fails with an error message (no traceback)
        assert p.returncode == 0 or ("Traceback" not in p.stderr and "error" in p.stderr), v
    assert any(p.returncode == 0 for p in procs.values())
    # the ref is a complete cache: every blob it names is there and hashes right
    repo, _, tag = ref.removeprefix(registry + "/").partition(":")
    manifest = _registry_json(f"http://{registry}/v2/{repo}/manifests/{tag}")
    for desc in [manifest["config"], *manifest["layers"]]:  # type: ignore[list-item]
        assert isinstance(desc, dict)
        data = _registry_blob(registry, repo, str(desc["digest"]))
        assert "sha256:" + hashlib.sha256(data).hexdigest() == desc["digest"]
    # and importable: one of the two builds is whole in it (last writer wins)
    cached = []
    for v in ("one", "two"):
        spy, log = write_runtime_spy(tmp_path, "runc")
        log.unlink(missing_ok=True)
        ow(
            tmp_path / f"fresh-{v}",
            "build",
            "--progress",
            "plain",
            "--runtime",
            str(spy),
            "--build-arg",
            f"V={v}",
            "--cache-from",
            ref,
            str(ctx),
        )
        cached.append(_runs(log) == 0)
    assert sorted(cached) == [False, True]


def test_cache_holds_no_secret_and_no_context_content(
    tmp_path: Path, registry: str, base_image: str, require_root: None
) -> None:
    secret = secrets.token_hex(16)
    content = "context-" + secrets.token_hex(16)
    (tmp_path / "s.txt").write_text(secret)
    dockerfile = (
        f"FROM {base_image}\nCOPY c.txt /c.txt\n"
        "RUN --mount=type=secret,id=s wc -c /run/secrets/s > /secret-size\n"
    )
    ctx = write_context(tmp_path, dockerfile, {"c.txt": content})
    ref = _ref(registry, "secret")
    ow(
        tmp_path / "rootA",
        "build",
        "--progress",
        "plain",
        "--secret",
        f"id=s,src={tmp_path / 's.txt'}",
        "--cache-to",
        f"type=registry,ref={ref},mode=max",
        "--cache-to",
        f"type=local,dest={tmp_path / 'lc'},mode=max",
        str(ctx),
    )
    repo, _, tag = ref.removeprefix(registry + "/").partition(":")
    manifest = _registry_json(f"http://{registry}/v2/{repo}/manifests/{tag}")
    config = _registry_blob(registry, repo, str(manifest["config"]["digest"]))  # type: ignore[index]
    metadata = json.dumps(manifest).encode() + config
    assert content.encode() not in metadata and secret.encode() not in metadata
    blobs = [_registry_blob(registry, repo, str(d["digest"])) for d in manifest["layers"]]  # type: ignore[attr-defined]
    blobs += [p.read_bytes() for p in (tmp_path / "lc" / "blobs" / "sha256").iterdir()]
    assert len(blobs) > 3
    for blob in blobs:
        data = gzip.decompress(blob) if blob[:2] == b"\x1f\x8b" else blob
        assert secret.encode() not in data
    # the layers do hold what the steps made: the secret's size, the copied file
    everything = b"".join(gzip.decompress(b) if b[:2] == b"\x1f\x8b" else b for b in blobs)
    assert f"{len(secret)} /run/secrets/s".encode() in everything
    assert content.encode() in everything


@pytest.mark.rootless_skip("root's daemon (test_daemon.start_daemon)")
def test_registry_cache_over_the_daemon(
    tmp_path: Path, registry: str, base_image: str, require_root: None
) -> None:
    dockerfile = MULTI_STAGE.format(base=base_image)
    ctx = write_context(tmp_path, dockerfile, FILES)
    ref = _ref(registry, "daemon")
    d1 = start_daemon(tmp_path / "d1root", tmp_path / "d1.sock")
    try:
        out1 = tmp_path / "d1.tar"
        cli(
            d1,
            "build",
            "--progress",
            "plain",
            "--cache-to",
            f"type=registry,ref={ref},mode=max",
            "-o",
            f"type=oci,dest={out1}",
            str(ctx),
        )
        refused = cli(
            d1, "build", "--cache-to", f"type=local,dest={tmp_path / 'x'}", str(ctx), check=False
        )
        assert (
            refused.returncode != 0
            and "type=local is not supported over the daemon" in refused.stderr
        )
        assert "Traceback" not in refused.stderr
    finally:
        assert stop_daemon(d1) == 0
    spy, log = write_runtime_spy(tmp_path, "runc")
    d2 = start_daemon(tmp_path / "d2root", tmp_path / "d2.sock", runtime=str(spy))
    try:
        out2 = tmp_path / "d2.tar"
        again = cli(
            d2,
            "build",
            "--progress",
            "plain",
            "--cache-from",
            f"type=registry,ref={ref}",
            "-o",
            f"type=oci,dest={out2}",
            str(ctx),
        )
    finally:
        assert stop_daemon(d2) == 0
    assert_lists_steps(again.stderr, buildkit_steps(dockerfile), {})
    assert _runs(log) == 0
    assert _layers(out2) == _layers(out1)


def test_bad_cache_specs_fail_clearly_and_missing_cache_warns(
    tmp_path: Path, registry: str, base_image: str, require_root: None
) -> None:
    ctx = write_context(tmp_path, f"FROM {base_image}\nRUN true\n")
    for flag, value, words in [
        ("--cache-to", "type=s3,ref=x", "unknown cache type 's3'"),
        ("--cache-to", "type=registry", "needs ref="),
        ("--cache-to", "type=registry,ref=r/x,mode=all", "mode must be min or max"),
        ("--cache-to", "type=inline,mode=max", "mode=min"),
        ("--cache-from", "type=local,dest=x", "unknown attribute 'dest'"),
    ]:
        p = ow(tmp_path / "root", "build", flag, value, str(ctx), check=False)
        assert p.returncode != 0 and words in p.stderr, p.stderr
        assert "Traceback" not in p.stderr
        assert not (tmp_path / "root").exists() or not any(
            (tmp_path / "root" / "snapshots").glob("*")
        )
    # an import that is not there: a warning, the build goes on (as buildx)
    p = ow(
        tmp_path / "root",
        "build",
        "--progress",
        "plain",
        "--cache-from",
        _ref(registry, "absent"),
        str(ctx),
    )
    assert "failed to import cache" in p.stderr


def test_a_cache_imported_whole_can_be_exported_again(
    tmp_path: Path, registry: str, base_image: str, require_root: None
) -> None:
    """Worker 2 builds from worker 1's cache without running anything and exports it
    to another ref (the blobs it never unpacked are copied); worker 3 rebuilds from that."""
    dockerfile = MULTI_STAGE.format(base=base_image)
    ctx = write_context(tmp_path, dockerfile, FILES)
    ref1, ref2 = _ref(registry, "hop1"), _ref(registry, "hop2")
    first = _worker1(tmp_path, ctx, f"type=registry,ref={ref1},mode=max")
    _, log2, _ = _worker2(
        tmp_path,
        ctx,
        ref1,
        name="rootB",
        extra=("--cache-to", f"type=registry,ref={ref2},mode=max"),
    )
    again, log3, third = _worker2(tmp_path, ctx, ref2, name="rootC")
    assert_lists_steps(again.stderr, buildkit_steps(dockerfile), {})
    assert _runs(log2) == _runs(log3) == 0
    assert _layers(third) == _layers(first)


def test_a_cache_dest_that_cannot_be_written_fails_clearly(
    tmp_path: Path, base_image: str, require_root: None
) -> None:
    ctx = write_context(tmp_path, f"FROM {base_image}\nRUN true\n")
    (tmp_path / "file").write_text("not a dir")
    p = ow(
        tmp_path / "root",
        "build",
        "--cache-to",
        f"type=local,dest={tmp_path / 'file'}",
        str(ctx),
        check=False,
    )
    assert p.returncode != 0 and f"cannot write cache to {tmp_path / 'file'}" in p.stderr
    assert "Traceback" not in p.stderr
    assert (tmp_path / "file").read_text() == "not a dir"
