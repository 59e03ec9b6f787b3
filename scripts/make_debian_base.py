"""Turn a debootstrapped root filesystem into a deterministic OCI image and push it.

Used by scripts/make-debian-base (which runs debootstrap and trims the tree first). Standard
library only, so it runs before the project is installed; the blob, layout and push helpers
are scripts/make_base_image.py's. The layer is a sorted PAX tar with numeric owners, no user
or group names and every mtime clamped to SOURCE_DATE_EPOCH, gzipped with a zero header
mtime: the same tree always yields the same manifest digest, which is what lets a re-run
compare digests with the registry and skip the push.
"""

from __future__ import annotations

import argparse
import io
import os
import stat
import sys
import tarfile
import time
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from make_base_image import host_arch, push_verified, split_ref

# The OCI writing is the busybox image's (ociworker.testing.busybox, standard library only);
# make_base_image put the source tree on sys.path for it.
from ociworker.testing import busybox
from ociworker.testing.busybox import Image, write_layout

DEFAULT_REF = "127.0.0.1:5000/debian:bookworm"
# Capabilities are the only extended attributes a package sets that matter to what runs
# (e.g. ping's cap_net_raw); SELinux/user xattrs of the build host must not leak into the image.
KEPT_XATTRS = ("security.capability",)


def walk_sorted(root: Path) -> list[str]:
    out: list[str] = []

    def visit(rel: str) -> None:
        base = root / rel if rel else root
        for name in sorted(os.listdir(base)):
            child = f"{rel}/{name}" if rel else name
            out.append(child)
            full = root / child
            if full.is_dir() and not full.is_symlink():
                visit(child)

    visit("")
    return out


def build_layer_tar(root: Path, epoch: int) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for rel in walk_sorted(root):
            full = root / rel
            st = full.lstat()
            if stat.S_ISSOCK(st.st_mode):
                continue  # a socket is runtime state, and tar cannot hold one anyway
            ti = tar.gettarinfo(str(full), arcname=rel)
            ti.uname = ti.gname = ""
            ti.mtime = min(int(st.st_mtime), epoch)
            pax: dict[str, str] = {}
            for name in KEPT_XATTRS:
                try:
                    value = os.getxattr(full, name, follow_symlinks=False)
                except OSError:
                    continue
                pax["SCHILY.xattr." + name] = value.decode("latin-1")
            ti.pax_headers = pax
            if ti.isreg():
                with open(full, "rb") as f:
                    tar.addfile(ti, f)
            else:
                tar.addfile(ti)
    return buf.getvalue()


def _created(epoch: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


def build_image(layer_tar: bytes, arch: str, epoch: int, created_by: str) -> Image:
    # gzip level 6: the Debian layer is ~30x busybox's, and 9 buys little on it
    return busybox.build_image(
        layer_tar,
        arch,
        cmd="bash",
        created=_created(epoch),
        created_by=created_by,
        compresslevel=6,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rootfs", type=Path, required=True)
    parser.add_argument("--layout", type=Path, required=True)
    parser.add_argument("--ref", default=DEFAULT_REF)
    parser.add_argument("--epoch", type=int, required=True, help="SOURCE_DATE_EPOCH")
    parser.add_argument("--created-by", default="ociworker scripts/make-debian-base")
    parser.add_argument("--no-push", action="store_true", help="only write the OCI layout")
    args = parser.parse_args(argv)

    arch = host_arch()
    tag = split_ref(args.ref)[2]
    image = build_image(build_layer_tar(args.rootfs, args.epoch), arch, args.epoch, args.created_by)
    digest = image.manifest.digest
    print(f"==> debian base: {args.ref} manifest {digest}", file=sys.stderr)
    write_layout(image, args.layout, tag, arch)
    print(f"==> debian base: wrote OCI layout {args.layout}", file=sys.stderr)
    if args.no_push:
        return 0
    return push_verified(args.layout, tag, args.ref, digest, "debian base")


if __name__ == "__main__":
    sys.exit(main())
