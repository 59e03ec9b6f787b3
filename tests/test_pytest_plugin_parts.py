"""The pytest plugin's pure parts: option mapping, whiteout-aware file listing,
symlink resolution, reading an image back from an OCI layout, and the plugin
module's import cost (it loads in every pytest run where ociworker is installed)."""

from __future__ import annotations

import io
import json
import os
import random
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from ociworker.cli import make_parser
from ociworker.core.build import NamedContext
from ociworker.core.outputs import OutputSpec
from ociworker.diff.apply import apply_tar_stream
from ociworker.errors import ConfigError, NotFoundError
from ociworker.testing.busybox import build_image, build_layer_tar, write_layout
from ociworker.testing.harness import BUILD_OPTIONS, build_plan, merged_env
from ociworker.testing.image import load_layout, merge_layers, resolve

ROOT = Path(__file__).resolve().parents[1]


def _member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type = kind
    ti.linkname = link
    ti.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
    return ti


def _d(name: str) -> tarfile.TarInfo:
    return _member(name, tarfile.DIRTYPE)


def _f(name: str) -> tarfile.TarInfo:
    return _member(name)


def _tree(layers: list[list[tarfile.TarInfo]]) -> dict[str, int]:
    return {p: i for p, (i, _) in merge_layers(layers).items()}


# -- whiteouts, as the OCI image spec's changeset rules state them -------------------


def test_a_whiteout_hides_the_lower_entry_and_all_below_it() -> None:
    base = [_d("etc"), _f("etc/group"), _d("opt"), _f("opt/a"), _d("opt/sub"), _f("opt/sub/b")]
    top = [_f("etc/.wh.group"), _f(".wh.opt")]
    assert _tree([base, top]) == {"etc": 0}


def test_an_opaque_dir_keeps_itself_and_its_own_layer_but_not_lower_children() -> None:
    base = [_d("app"), _f("app/old"), _d("app/lib"), _f("app/lib/x"), _f("keep")]
    # the opaque marker after the new entry: order in the tar does not matter
    top = [_d("app"), _f("app/new"), _f("app/.wh..wh..opq")]
    assert _tree([base, top]) == {"app": 1, "app/new": 1, "keep": 0}


def test_a_whiteout_never_hides_its_own_layers_entry() -> None:
    base = [_f("x")]
    top = [_f("x"), _f(".wh.x")]  # a layer may recreate what it whites out
    assert _tree([base, top]) == {"x": 1}


def test_a_file_replacing_a_directory_takes_its_children() -> None:
    base = [_d("data"), _f("data/one"), _f("datafile")]
    top = [_f("data")]
    got = merge_layers([base, top])
    assert {p: i for p, (i, _) in got.items()} == {"data": 1, "datafile": 0}
    assert got["data"][1].isfile()


def test_names_are_normalized() -> None:
    assert _tree([[_d("./"), _d("./usr/"), _f("./usr/x")], [_f("usr/.wh.x")]]) == {"usr": 0}


def _layer_tar(members: list[tarfile.TarInfo]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for m in members:
            tf.addfile(m, io.BytesIO(b"") if m.isfile() else None)
    return buf.getvalue()


@pytest.mark.skipif(os.geteuid() != 0, reason="the applier sets owners (root)")
@pytest.mark.parametrize("seed", range(40))
def test_listing_matches_the_differs_applier_on_random_stacks(seed: int, tmp_path: Path) -> None:
    # Expectation: the tree the worker's own applier leaves on disk after
    # extracting the same layers (whiteouts applied by the kernel's rename/unlink).
    rng = random.Random(seed)
    names = ["a", "b", "c"]
    layers: list[list[tarfile.TarInfo]] = []
    for _ in range(rng.randint(2, 4)):
        # a well-formed layer, as a differ writes one: each path once, the
        # parents of an entry are directories of this layer
        layer: list[tarfile.TarInfo] = []
        dirs: set[str] = set()
        used: set[str] = set()
        for _ in range(rng.randint(1, 6)):
            parts = [rng.choice(names) for _ in range(rng.randint(1, 3))]
            path, parent, base = "/".join(parts), "/".join(parts[:-1]), parts[-1]
            parents = ["/".join(parts[: i + 1]) for i in range(len(parts) - 1)]
            if path in used or any(p in used and p not in dirs for p in parents):
                continue
            for p in parents:
                if p not in dirs:
                    layer.append(_d(p))
                    dirs.add(p)
                    used.add(p)
            used.add(path)
            kind = rng.random()
            if kind < 0.25:
                layer.append(_f(f"{parent}/.wh.{base}".lstrip("/")))
            elif kind < 0.35 and parent:
                layer.append(_f(f"{parent}/.wh..wh..opq"))
            elif kind < 0.65:
                layer.append(_d(path))
                dirs.add(path)
            else:
                layer.append(_f(path))
        layers.append(layer)
    root = tmp_path / "root"
    root.mkdir()
    for layer in layers:
        apply_tar_stream(io.BytesIO(_layer_tar(layer)), root)
    on_disk = {
        str(Path(d, n).relative_to(root))
        for d, dirs, files in os.walk(root)
        for n in [*dirs, *files]
    }
    assert set(merge_layers(layers)) == on_disk, layers


# -- symlinks -----------------------------------------------------------------------


def test_resolve_follows_links_inside_the_image() -> None:
    tree = {
        "bin": _d("bin"),
        "bin/sh": _member("bin/sh", tarfile.SYMTYPE, "/bin/busybox"),
        "bin/busybox": _f("bin/busybox"),
        "usr": _d("usr"),
        "usr/bin": _member("usr/bin", tarfile.SYMTYPE, "../bin"),
        "escape": _member("escape", tarfile.SYMTYPE, "../../../../etc/shadow"),
    }
    assert resolve(tree, "/bin/sh") == "bin/busybox"
    assert resolve(tree, "/usr/bin/sh") == "bin/busybox"
    # ".." stops at the image's root, as chroot'ed path resolution does
    assert resolve(tree, "/escape") == "etc/shadow"


def test_resolve_refuses_a_loop() -> None:
    tree = {"a": _member("a", tarfile.SYMTYPE, "b"), "b": _member("b", tarfile.SYMTYPE, "a")}
    with pytest.raises(Exception, match="too many levels"):
        resolve(tree, "/a")


# -- reading an image back ------------------------------------------------------------


def test_an_image_layout_reads_back_with_files_and_links(tmp_path: Path) -> None:
    binary = b"\x7fELF not really busybox"
    image = build_image(build_layer_tar(binary, ["bin/sh", "usr/bin/awk", "bin/busybox"]), "amd64")
    write_layout(image, tmp_path / "layout", "latest", "amd64")

    got = load_layout(tmp_path / "layout")

    assert got.digest == image.manifest.digest
    assert got.id == image.config.digest
    assert got.config["config"]["Cmd"] == ["sh"]
    assert got.read("/usr/bin/awk") == binary  # a symlink to /bin/busybox
    assert got.read("/etc/passwd").decode().startswith("root:x:0:0:")
    files = got.files()
    assert files["/bin/sh"].issym() and files["/bin/sh"].linkname == "/bin/busybox"
    assert files["/tmp"].isdir() and files["/tmp"].mode == 0o1777
    assert [layer.digest for layer in got.layers] == [image.layer.digest]
    with pytest.raises(NotFoundError):
        got.read("/nope")


def test_a_layer_that_does_not_match_its_diff_id_is_refused(tmp_path: Path) -> None:
    image = build_image(build_layer_tar(b"x", ["bin/sh"]), "amd64")
    write_layout(image, tmp_path / "layout", "latest", "amd64")
    config = json.loads(image.config.data)
    config["rootfs"]["diff_ids"] = ["sha256:" + "0" * 64]
    blob = json.dumps(config).encode()
    import hashlib

    digest = hashlib.sha256(blob).hexdigest()
    (tmp_path / "layout/blobs/sha256" / digest).write_bytes(blob)
    manifest = json.loads(image.manifest.data)
    manifest["config"] = {**manifest["config"], "digest": f"sha256:{digest}", "size": len(blob)}
    mblob = json.dumps(manifest).encode()
    mdigest = hashlib.sha256(mblob).hexdigest()
    (tmp_path / "layout/blobs/sha256" / mdigest).write_bytes(mblob)
    index = json.loads((tmp_path / "layout/index.json").read_text())
    index["manifests"][0].update(digest=f"sha256:{mdigest}", size=len(mblob))
    (tmp_path / "layout/index.json").write_text(json.dumps(index))
    with pytest.raises(Exception, match="diffID"):
        load_layout(tmp_path / "layout")


# -- options -> request ----------------------------------------------------------------


def _build_flags() -> set[str]:
    parser = make_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    build = sub.choices["build"]  # type: ignore[index]
    return {s for a in build._actions for s in a.option_strings}


def test_every_option_is_named_after_the_buildx_flag_it_stands_for() -> None:
    flags = _build_flags()
    for name, doc in BUILD_OPTIONS.items():
        flag = doc.rsplit("(", 1)[-1].rstrip(")")
        assert flag in flags, f"{name}: {flag} is not a flag of `ociworker build`"
        snake = flag.removeprefix("--").replace("-", "_")
        # a repeatable flag's option is its plural
        assert name in (snake, snake + "s", snake + "es"), (name, flag)


def test_options_map_onto_the_request(tmp_path: Path) -> None:
    ctx = tmp_path / "ctx"
    archive = tmp_path / "image.tar"
    plan = build_plan(
        ctx,
        {
            "file": "docker/Dockerfile.prod",
            "target": "final",
            "build_args": {"A": "1", "B": "x=y"},
            "platform": "linux/amd64",
            "secrets": {"token": "s3cret"},
            "no_cache": True,
            "tags": "app:dev",
            "labels": {"team": "images"},
            "build_contexts": {"extra": str(tmp_path)},
            "network": "none",
            "add_hosts": {"db": "10.0.0.5"},
            "ulimits": ["nofile=1024:2048"],
            "shm_size": "64m",
            "push": True,
        },
        archive=archive,
        push_to=["127.0.0.1:1234/app:dev"],
    )
    req = plan.request
    assert req.context == ctx and req.dockerfile == ctx / "docker/Dockerfile.prod"
    assert req.target == "final"
    assert dict(req.build_args) == {"A": "1", "B": "x=y"}
    assert req.platforms == ("linux/amd64",)
    assert req.no_cache is True and req.network == "none"
    assert req.tags == ("app:dev",)
    assert dict(req.labels) == {"team": "images"}
    assert req.build_contexts == (NamedContext("extra", "local", str(tmp_path)),)
    assert req.extra_hosts == (("db", "10.0.0.5"),)
    assert [(u.name, u.soft, u.hard) for u in req.ulimits] == [("nofile", 1024, 2048)]
    assert req.shm_size == 64 * 1024 * 1024
    # the image always comes back as an OCI archive; push adds the registry
    assert OutputSpec("oci", (("dest", str(archive)),)) in req.outputs
    pushes = [o for o in req.outputs if o.pushes]
    assert [o.get("name") for o in pushes] == ["127.0.0.1:1234/app:dev"]
    assert plan.pushed == ("127.0.0.1:1234/app:dev",)
    # a secret given by value is served by id, its value never in the request
    assert [s.id for s in plan.secrets] == ["token"]
    assert "s3cret" not in repr(plan)


def test_a_secret_given_as_a_flag_value(tmp_path: Path) -> None:
    plan = build_plan(tmp_path, {"secrets": ["id=npm,src=/run/npmrc"]}, archive=tmp_path / "i.tar")
    assert [(s.id, s.file) for s in plan.secrets] == [("npm", "/run/npmrc")]


def test_an_unknown_option_is_named_with_the_ones_there_are(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match=r"unexpected option\(s\) buildarg.*build_args"):
        build_plan(tmp_path, {"buildarg": {}}, archive=tmp_path / "i.tar")


def test_push_needs_a_registry(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="ociworker_registry"):
        build_plan(tmp_path, {"push": True}, archive=tmp_path / "i.tar")


def test_a_bad_flag_value_is_the_clis_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"invalid --add-host .nocolon."):
        build_plan(tmp_path, {"add_hosts": ["nocolon"]}, archive=tmp_path / "i.tar")


def test_run_env_sets_over_the_image_env() -> None:
    assert merged_env(["PATH=/bin", "A=1"], {"A": "2", "B": "3"}) == ("PATH=/bin", "A=2", "B=3")


# -- the entry point module -------------------------------------------------------------


def test_the_plugin_module_loads_nothing_of_the_engine() -> None:
    # every pytest run of a project with ociworker installed imports it
    code = (
        "import sys; import ociworker.testing.pytest_plugin; "
        "print('\\n'.join(m for m in sys.modules if m.startswith(('ociworker', 'grpc'))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
    ).stdout.split()
    assert sorted(out) == [
        "ociworker",
        "ociworker.testing",
        "ociworker.testing.pytest_plugin",
        "ociworker.version",
    ]


def test_the_entry_point_is_declared() -> None:
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["entry-points"]["pytest11"] == {"ociworker": "ociworker.testing.pytest_plugin"}
    assert any(d.startswith("pytest-xdist") for d in project["optional-dependencies"]["dev"])


class _Registry:
    def ref(self, name: str, tag: str = "latest") -> str:
        return f"127.0.0.1:1/{name}:{tag}"


def test_push_sends_each_tag_to_the_registry_fixture_under_its_name() -> None:
    from ociworker.testing.pytest_plugin import _push_refs

    tags = ["app:dev", "example.com:5000/team/app:1.2", "busybox"]
    got = _push_refs(_Registry(), tags)  # type: ignore[arg-type]
    assert got == ["127.0.0.1:1/app:dev", "127.0.0.1:1/team/app:1.2", "127.0.0.1:1/busybox:latest"]
    fresh = _push_refs(_Registry(), None)  # type: ignore[arg-type]
    assert len(fresh) == 1 and fresh[0].startswith("127.0.0.1:1/ociworker-pytest:")
    assert fresh != _push_refs(_Registry(), None)  # type: ignore[arg-type]


def test_unpack_oci_archive_extracts_a_layout_and_refuses_escapes(tmp_path: Path) -> None:
    import io
    import tarfile as tf_mod

    from ociworker.testing.image import unpack_oci_archive

    def archive(name: str, members: dict[str, bytes]) -> Path:
        path = tmp_path / name
        with tf_mod.open(path, "w") as tar:
            for member, data in members.items():
                info = tf_mod.TarInfo(member)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        return path

    good = archive("good.tar", {"oci-layout": b"{}", "blobs/sha256/ab": b"x"})
    out = unpack_oci_archive(good, tmp_path / "good")
    assert (out / "oci-layout").read_bytes() == b"{}"
    assert (out / "blobs/sha256/ab").read_bytes() == b"x"
    for i, name in enumerate(["../escape", "/abs", "blobs/../../escape"]):
        with pytest.raises(ValueError, match="unsafe path"):
            unpack_oci_archive(archive(f"bad{i}.tar", {name: b"x"}), tmp_path / f"bad{i}")
    assert not (tmp_path / "escape").exists()
