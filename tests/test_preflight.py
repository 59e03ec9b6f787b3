"""Every path of a build checked before anything runs (``session.preflight``):
each bad path is one ConfigError naming the flag and the path, and a refused
request creates nothing. The expectations are buildx's rules (no parent of a
file is created, a file output is no directory, a context must be a directory)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ociworker.core.build import BuildRequest
from ociworker.core.outputs import OutputSpec
from ociworker.errors import ConfigError
from ociworker.session.preflight import check_build_paths


def _tree(top: Path) -> list[str]:
    return sorted(str(p.relative_to(top)) for p in top.rglob("*"))


@pytest.fixture
def ctx(tmp_path: Path) -> Path:
    c = tmp_path / "ctx"
    c.mkdir()
    (c / "Dockerfile").write_text("FROM scratch\n")
    return c


def _req(ctx: Path, *outputs: str, **kw: object) -> BuildRequest:
    return BuildRequest(
        context=ctx,
        outputs=tuple(OutputSpec.parse(o) for o in outputs),
        **kw,  # type: ignore[arg-type]
    )


def _refused(req: BuildRequest, root: Path | None = None) -> str:
    with pytest.raises(ConfigError) as exc:
        check_build_paths(req, root=root, stdout_is_tty=False, euid=0)
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


def test_good_paths_pass_and_root_is_made_with_its_parents(tmp_path: Path, ctx: Path) -> None:
    (tmp_path / "out").mkdir()
    root = tmp_path / "new" / "state"
    req = _req(
        ctx,
        f"type=oci,dest={tmp_path / 'out' / 'img.tar'}",
        f"type=local,dest={tmp_path / 'fresh' / 'deeper'}",  # made at export, as BuildKit
        f"type=layers,dest={tmp_path / 'out'}",
        "-",
        iidfile=tmp_path / "out" / "iid",
        metadata_file=tmp_path / "meta.json",
        dockerfile=ctx / "Dockerfile",
    )
    check_build_paths(req, root=root, stdout_is_tty=False, euid=0)
    assert root.is_dir()  # created, as buildkitd creates its root
    assert not (tmp_path / "fresh").exists()  # outputs are not made before the build


def test_a_daemon_build_checks_no_root(tmp_path: Path, ctx: Path) -> None:
    check_build_paths(_req(ctx), root=None, stdout_is_tty=False, euid=1000)


# --- the context and the Dockerfile ----------------------------------------------------


def test_context_must_be_an_existing_directory(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    assert _refused(_req(missing)) == f'unable to prepare context: path "{missing}" not found'
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert "is not a directory" in _refused(_req(a_file))


def test_dockerfile_must_be_a_regular_file(tmp_path: Path, ctx: Path) -> None:
    msg = _refused(_req(ctx, dockerfile=tmp_path / "Nope"))
    assert msg.startswith(f"-f {tmp_path / 'Nope'}: no such file")
    (ctx / "sub").mkdir()
    assert "is not a regular file" in _refused(_req(ctx, dockerfile=ctx / "sub"))


def test_the_default_dockerfile_must_be_a_file(tmp_path: Path, ctx: Path) -> None:
    (ctx / "Dockerfile").unlink()
    msg = _refused(_req(ctx))
    assert msg == f"failed to read dockerfile: open {ctx / 'Dockerfile'}: no such file or directory"
    (ctx / "Dockerfile").mkdir()
    assert _refused(_req(ctx)).endswith(f"{ctx / 'Dockerfile'} is not a regular file")


def test_a_relative_dockerfile_is_found_in_the_context(
    ctx: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)  # no ./Dockerfile here: read_dockerfile looks in the context
    check_build_paths(_req(ctx, dockerfile=Path("Dockerfile")), root=None, stdout_is_tty=False)


# --- --iidfile, --metadata-file --------------------------------------------------------


@pytest.mark.parametrize(
    ("flag", "field"), [("--iidfile", "iidfile"), ("--metadata-file", "metadata_file")]
)
def test_written_files_need_an_existing_parent_and_are_no_directory(
    tmp_path: Path, ctx: Path, flag: str, field: str
) -> None:
    before = _tree(tmp_path)
    assert _refused(_req(ctx, **{field: tmp_path})) == f"{flag} {tmp_path} is a directory"
    nowhere = tmp_path / "no" / "such" / "f"
    msg = _refused(_req(ctx, **{field: nowhere}))
    assert msg.startswith(f"{flag} {nowhere}: directory {tmp_path / 'no' / 'such'} does not exist")
    a_file = tmp_path / "plain"
    a_file.write_text("")
    before.append("plain")
    assert "is not a directory" in _refused(_req(ctx, **{field: a_file / "f"}))
    assert _tree(tmp_path) == sorted(before)  # nothing created


# --- outputs -------------------------------------------------------------------------


@pytest.mark.parametrize("typ", ["oci", "docker", "tar"])
def test_file_outputs_need_a_parent_and_are_no_directory(
    tmp_path: Path, ctx: Path, typ: str
) -> None:
    msg = _refused(_req(ctx, f"type={typ},dest={tmp_path}"))
    assert f"destination file {tmp_path} is a directory" in msg  # buildx's words
    nowhere = tmp_path / "sub" / "x.tar"
    msg = _refused(_req(ctx, f"type={typ},dest={nowhere}"))
    assert f"directory {tmp_path / 'sub'} does not exist" in msg
    assert f"type={typ}" in msg
    assert not (tmp_path / "sub").exists()


@pytest.mark.parametrize("typ", ["local", "layers"])
def test_dir_outputs_may_be_new_but_not_a_file(tmp_path: Path, ctx: Path, typ: str) -> None:
    a_file = tmp_path / "taken"
    a_file.write_text("mine")
    assert f"{a_file} exists and is not a directory" in _refused(
        _req(ctx, f"type={typ},dest={a_file}")
    )
    msg = _refused(_req(ctx, f"type={typ},dest={a_file / 'below'}"))
    assert f"{a_file} is not a directory" in msg
    assert a_file.read_text() == "mine"


def test_an_archive_is_not_written_to_a_terminal(ctx: Path) -> None:
    # buildx: "output file is required for tar exporter. refusing to write to console"
    with pytest.raises(ConfigError, match="refusing to write to a terminal"):
        check_build_paths(_req(ctx, "-"), root=None, stdout_is_tty=True)
    check_build_paths(_req(ctx, "-"), root=None, stdout_is_tty=False)


def test_two_names_for_one_file_conflict(tmp_path: Path, ctx: Path) -> None:
    (tmp_path / "link").symlink_to(tmp_path)
    msg = _refused(
        _req(
            ctx,
            f"type=oci,dest={tmp_path / 'a.tar'}",
            f"type=docker,dest={tmp_path / 'link' / 'a.tar'}",
        )
    )
    assert "both write to" in msg
    msg = _refused(_req(ctx, f"type=tar,dest={tmp_path / 'f'}", iidfile=tmp_path / "link" / "f"))
    assert "--iidfile" in msg and "both write to" in msg


def test_outputs_are_checked_by_the_preflight_too(ctx: Path) -> None:
    # a push with nowhere to push to (no name=, no -t)
    req = BuildRequest(context=ctx, outputs=(OutputSpec("image", (("push", "true"),)),))
    assert "tag is needed when pushing to registry" in _refused(req)


# --- --root --------------------------------------------------------------------------


def test_root_must_be_a_directory(tmp_path: Path, ctx: Path) -> None:
    a_file = tmp_path / "state"
    a_file.write_text("not a dir")
    assert _refused(_req(ctx), root=a_file).startswith(f"--root {a_file} is not a directory")
    assert a_file.read_text() == "not a dir"
    assert "--root" in _refused(_req(ctx), root=a_file / "below")


def test_an_uncreatable_root_creates_nothing(tmp_path: Path, ctx: Path) -> None:
    msg = _refused(_req(ctx), root=Path("/proc/nope/state"))
    assert msg.startswith("--root /proc/nope/state cannot be created")
    assert not os.path.lexists("/proc/nope")


def test_a_refused_request_does_not_create_root(tmp_path: Path, ctx: Path) -> None:
    root = tmp_path / "state"
    _refused(_req(ctx, iidfile=tmp_path / "no" / "iid"), root=root)
    assert not root.exists()


def test_the_embedded_worker_needs_root(tmp_path: Path, ctx: Path) -> None:
    root = tmp_path / "state"
    with pytest.raises(ConfigError) as exc:
        check_build_paths(_req(ctx), root=root, stdout_is_tty=False, euid=65534)
    msg = str(exc.value)
    assert msg.startswith(
        f"--root {root}: the embedded worker must run as root (this is uid 65534)"
    )
    assert "--addr" in msg
    assert not root.exists()


def test_builds_starting_together_on_a_new_root_all_get_it(tmp_path: Path) -> None:
    # Two embedded builds started at once on a root that does not exist yet
    # (integration/test_gc.py's first pair): the one that creates a dir second
    # must take it as made, not fail with "cannot be created (File exists)".
    import threading

    from ociworker.session.preflight import check_root

    for trial in range(30):
        root = tmp_path / f"t{trial}" / "a" / "b" / "state"
        start = threading.Barrier(4)
        errors: list[BaseException] = []

        def one(
            root: Path = root,
            start: threading.Barrier = start,
            errors: list[BaseException] = errors,
        ) -> None:
            start.wait()
            try:
                check_root(root)
            except BaseException as exc:  # reported below, whatever it is
                errors.append(exc)

        threads = [threading.Thread(target=one) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == [], errors
        assert root.is_dir()
        assert (root.stat().st_mode & 0o777) == 0o700


def test_a_root_made_meanwhile_by_another_build_is_fine(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Two first builds at once: both find the state dir missing, one makes it first.
    from ociworker.session import preflight

    root = tmp_path / "share" / "ociworker"
    missing = [root, root.parent]
    root.mkdir(parents=True)  # the other build's
    # what the losing build had listed as missing before the winner made it
    monkeypatch.setattr(preflight, "_up_to_existing", lambda _p: iter(missing))
    preflight._make_dirs(root)
    assert root.is_dir()
