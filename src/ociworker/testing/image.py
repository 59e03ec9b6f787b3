"""The image a pytest plugin fixture hands a test, read back from an OCI layout.

A ``BuiltImage`` is what a consumer of the build would see: the manifest and
config as JSON, each layer's tar members, and the file tree the layers make
together once whiteouts are applied (``files``, ``read``). ``run`` executes a
command in it through a ``Runner`` (the plugin's worker); the image itself is
only data. ``merge_layers`` and ``resolve`` are pure and unit-tested apart.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import shutil
import subprocess
import tarfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO, Any, Protocol, cast

from ociworker.errors import NotFoundError, UserError

WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"
#: symlinks followed in one lookup before giving up (Linux's MAXSYMLINKS)
_MAX_HOPS = 40


def clean_name(name: str) -> str:
    """A tar member's name as an image path without its leading ``/`` or ``./``
    (``""``: the root)."""
    parts = [p for p in PurePosixPath("/", name).parts[1:] if p not in ("", ".")]
    return "/".join(parts)


def _under(path: str, parent: str) -> bool:
    return parent == "" or path == parent or path.startswith(parent + "/")


def merge_layers(
    layers: Sequence[Sequence[tarfile.TarInfo]],
) -> dict[str, tuple[int, tarfile.TarInfo]]:
    """The file tree a stack of layers makes: image path (no leading ``/``) ->
    (index of the layer that provides it, its member). As the OCI image spec
    applies a changeset: a whiteout ``D/.wh.NAME`` hides ``D/NAME`` and all below
    it in the layers below; an opaque ``D/.wh..wh..opq`` hides everything below
    ``D`` from the layers below (``D`` itself stays); a non-directory replacing
    a directory takes its children with it. Whiteouts never hide an entry of
    their own layer, whatever order the tar has them in."""
    tree: dict[str, tuple[int, tarfile.TarInfo]] = {}
    for index, members in enumerate(layers):
        hidden: list[str] = []  # paths whose lower entries (and below) go
        opaque: list[str] = []  # dirs whose lower children go
        entries: list[tuple[str, tarfile.TarInfo]] = []
        for m in members:
            path = clean_name(m.name)
            parent, _, base = path.rpartition("/")
            if base == OPAQUE:
                opaque.append(parent)
            elif base.startswith(WHITEOUT):
                hidden.append(f"{parent}/{base[len(WHITEOUT) :]}".lstrip("/"))
            elif path:
                entries.append((path, m))
        for path, m in entries:
            lower = tree.get(path)
            if lower is not None and lower[1].isdir() and not m.isdir():
                hidden.append(path)
        if hidden or opaque:
            tree = {
                p: v
                for p, v in tree.items()
                if not any(_under(p, h) for h in hidden)
                and not any(_under(p, d) and p != d for d in opaque)
            }
        for path, m in entries:
            tree[path] = (index, m)
    return tree


def resolve(tree: Mapping[str, tarfile.TarInfo], path: str) -> str:
    """``path`` with every symlink in it followed inside the image (an absolute
    target starts again at the image's root, ``..`` stops at it), as the
    kernel would resolve it with the image as its root."""
    todo = [p for p in reversed(path.split("/"))]
    done: list[str] = []
    hops = 0
    while todo:
        part = todo.pop()
        if part in ("", "."):
            continue
        if part == "..":
            if done:
                done.pop()
            continue
        candidate = "/".join([*done, part])
        member = tree.get(candidate)
        if member is not None and member.issym():
            hops += 1
            if hops > _MAX_HOPS:
                raise UserError(f"{path}: too many levels of symbolic links in the image")
            if member.linkname.startswith("/"):
                done = []
            todo.extend(reversed(member.linkname.split("/")))
            continue
        done.append(part)
    return "/".join(done)


@dataclass(frozen=True)
class RunResult:
    """How a command run in an image went (``subprocess.CompletedProcess``'s names)."""

    args: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str

    def check_returncode(self) -> None:
        if self.returncode != 0:
            raise subprocess.CalledProcessError(
                self.returncode, list(self.args), self.stdout, self.stderr
            )


class Runner(Protocol):
    """Runs a command in an image's root filesystem (the plugin's worker)."""

    def run(
        self,
        image: BuiltImage,
        args: Sequence[str],
        *,
        env: Mapping[str, str],
        user: str | None,
        workdir: str | None,
        network: str,
    ) -> RunResult: ...


@dataclass(frozen=True)
class ImageLayer:
    """One layer: its digests and media type, and its tar's members in order."""

    digest: str
    diff_id: str
    media_type: str
    members: tuple[tarfile.TarInfo, ...] = field(repr=False)
    #: the layer uncompressed, beside the layout's blobs
    tar_path: Path = field(repr=False)

    def names(self) -> list[str]:
        """The members' names as image paths (``/etc/passwd``, whiteouts included)."""
        return ["/" + clean_name(m.name) for m in self.members]

    def read(self, name: str) -> bytes:
        """The content of file ``name`` of this layer (a hard link reads its target)."""
        want = clean_name(name)
        with tarfile.open(self.tar_path) as tf:
            for m in tf:
                if clean_name(m.name) == want:
                    f = tf.extractfile(m)
                    if f is None:
                        raise UserError(f"{name} is not a regular file in layer {self.digest}")
                    return f.read()
        raise NotFoundError(f"no {name} in layer {self.digest}")


@dataclass(frozen=True)
class BuiltImage:
    """An image as its consumers see it. ``digest`` is the manifest's digest,
    ``id`` the config's (the image ID ``docker images`` shows)."""

    digest: str
    manifest: Mapping[str, Any] = field(repr=False)
    config: Mapping[str, Any] = field(repr=False)
    id: str
    layers: tuple[ImageLayer, ...] = field(repr=False)
    #: the OCI layout it was read from (blobs and index.json)
    layout: Path = field(repr=False)
    #: the registry references it was pushed to (``push=True``)
    pushed: tuple[str, ...] = ()
    runner: Runner | None = field(default=None, repr=False, compare=False)

    def _tree(self) -> dict[str, tuple[int, tarfile.TarInfo]]:
        return merge_layers([layer.members for layer in self.layers])

    def files(self) -> dict[str, tarfile.TarInfo]:
        """Every path of the image's file tree (``/bin/sh``), whiteouts applied,
        with the member of the topmost layer that provides it."""
        return {"/" + p: m for p, (_, m) in sorted(self._tree().items())}

    def read(self, path: str) -> bytes:
        """The content of the file at ``path``, symlinks followed inside the image."""
        tree = self._tree()
        name = resolve({p: m for p, (_, m) in tree.items()}, path)
        if name not in tree:
            raise NotFoundError(f"no {path} in image {self.digest}")
        index, member = tree[name]
        if member.isdir():
            raise UserError(f"{path} is a directory in image {self.digest}")
        return self.layers[index].read(member.name)

    def run(
        self,
        cmd: str | Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        user: str | None = None,
        workdir: str | None = None,
        network: str = "none",
        check: bool = False,
    ) -> RunResult:
        """Run ``cmd`` (a list, or a string run by ``/bin/sh -c``) in the image, as
        a container of it would: the config's Env (``env`` added), User and
        WorkingDir unless given. Sandboxed as a RUN step, with no network unless
        ``network="default"``; on a fresh copy of the image's files each time.
        ``check``: raise ``subprocess.CalledProcessError`` on a non-zero exit."""
        if self.runner is None:
            raise UserError("this image has no worker to run it (use the ociworker_build fixture)")
        args = ["/bin/sh", "-c", cmd] if isinstance(cmd, str) else list(cmd)
        result = self.runner.run(
            self, args, env=dict(env or {}), user=user, workdir=workdir, network=network
        )
        if check:
            result.check_returncode()
        return result


# -- reading an OCI layout ----------------------------------------------------------


def _blob_path(layout: Path, digest: str) -> Path:
    algo, _, hexpart = digest.partition(":")
    if algo != "sha256" or len(hexpart) != 64 or not all(c in "0123456789abcdef" for c in hexpart):
        raise UserError(f"unsupported digest {digest!r} in {layout}")
    return layout / "blobs" / algo / hexpart


def read_blob(layout: Path, digest: str) -> bytes:
    """Blob ``digest`` of the layout, checked against its digest."""
    data = _blob_path(layout, digest).read_bytes()
    if "sha256:" + hashlib.sha256(data).hexdigest() != digest:
        raise UserError(f"blob {digest} in {layout} does not match its digest")
    return data


def _open_decompressed(path: Path, media_type: str) -> IO[bytes]:
    if media_type.endswith("+zstd"):
        import zstandard

        reader: IO[bytes] = zstandard.ZstdDecompressor().stream_reader(path.open("rb"))
        return reader
    if media_type.endswith("gzip"):
        return cast(IO[bytes], gzip.open(path, "rb"))
    return path.open("rb")


def _uncompressed(layout: Path, desc: Mapping[str, Any], diff_id: str) -> Path:
    """The layer of ``desc`` as a plain tar beside the blobs (made once), checked
    against the config's diffID."""
    out = layout / "uncompressed" / diff_id.replace(":", "-")
    if out.exists():
        return out
    out.parent.mkdir(exist_ok=True)
    part = out.with_suffix(".part")
    digest = hashlib.sha256()
    blob = _blob_path(layout, desc["digest"])
    with _open_decompressed(blob, desc["mediaType"]) as src, part.open("wb") as dst:
        while chunk := src.read(1 << 20):
            digest.update(chunk)
            dst.write(chunk)
    if "sha256:" + digest.hexdigest() != diff_id:
        part.unlink()
        raise UserError(f"layer {desc['digest']} does not uncompress to diffID {diff_id}")
    part.rename(out)
    return out


def _manifests(layout: Path, index: Mapping[str, Any]) -> Iterator[Mapping[str, Any]]:
    for desc in index.get("manifests", []):
        if desc.get("mediaType", "").endswith("index.v1+json") or desc.get(
            "mediaType", ""
        ).endswith("manifest.list.v2+json"):
            yield from _manifests(layout, json.loads(read_blob(layout, desc["digest"])))
        elif (desc.get("platform") or {}).get("architecture") != "unknown":  # attestations
            yield desc


def load_layout(
    layout: Path, *, runner: Runner | None = None, pushed: Sequence[str] = ()
) -> BuiltImage:
    """The one image of OCI layout ``layout`` (a directory)."""
    index = json.loads((layout / "index.json").read_text())
    found = list(_manifests(layout, index))
    if len(found) != 1:
        raise UserError(f"{layout} holds {len(found)} images, want one")
    digest = found[0]["digest"]
    manifest = json.loads(read_blob(layout, digest))
    config = json.loads(read_blob(layout, manifest["config"]["digest"]))
    diff_ids = config.get("rootfs", {}).get("diff_ids", [])
    if len(diff_ids) != len(manifest["layers"]):
        raise UserError(
            f"image {digest}: the config names {len(diff_ids)} layers, "
            f"the manifest {len(manifest['layers'])}"
        )
    layers = []
    for desc, diff_id in zip(manifest["layers"], diff_ids, strict=True):
        tar_path = _uncompressed(layout, desc, diff_id)
        with tarfile.open(tar_path) as tf:
            members = tuple(tf.getmembers())
        layers.append(ImageLayer(desc["digest"], diff_id, desc["mediaType"], members, tar_path))
    return BuiltImage(
        digest=digest,
        manifest=manifest,
        config=config,
        id=manifest["config"]["digest"],
        layers=tuple(layers),
        layout=layout,
        pushed=tuple(pushed),
        runner=runner,
    )


def unpack_oci_archive(archive: Path, layout: Path) -> Path:
    """Extract an OCI layout tar (``type=oci`` output) into directory ``layout``."""
    layout.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive) as tf:
        # Not extractall(filter="data"): that came in Python 3.11.4, and Debian bookworm's
        # python3 (the worker image's) is 3.11.2. An OCI layout holds only directories and
        # regular files with plain relative names; anything else is refused.
        for member in tf.getmembers():
            parts = PurePosixPath(member.name).parts
            if not parts and member.isdir():
                continue  # "./", the layout itself
            if not parts or parts[0] == "/" or ".." in parts:
                raise ValueError(f"{archive}: unsafe path {member.name!r} in an OCI layout")
            dest = layout.joinpath(*parts)
            if member.isdir():
                dest.mkdir(parents=True, exist_ok=True)
            elif member.isfile():
                dest.parent.mkdir(parents=True, exist_ok=True)
                src = tf.extractfile(member)
                assert src is not None  # a regular file always has its data
                with src, open(dest, "wb") as out:
                    shutil.copyfileobj(src, out)
            else:
                raise ValueError(f"{archive}: {member.name!r} is not a file or directory")
    return layout


def write_image_layout(layout: Path, blobs: Mapping[str, bytes], manifest_digest: str) -> None:
    """An OCI layout of ``blobs`` (digest -> bytes) whose index names the
    manifest ``manifest_digest`` (a pulled image)."""
    if layout.exists():
        shutil.rmtree(layout)
    for digest, data in blobs.items():
        path = _blob_path(layout, digest)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    manifest = json.loads(blobs[manifest_digest])
    desc = {
        "mediaType": manifest.get("mediaType", "application/vnd.oci.image.manifest.v1+json"),
        "digest": manifest_digest,
        "size": len(blobs[manifest_digest]),
    }
    (layout / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [desc]}))
