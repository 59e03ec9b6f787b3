"""Build the project's busybox base image as an OCI layout and push it to the local registry.

Used by scripts/make-base-image. Standard library only (the image itself comes from
``ociworker.testing.busybox``, read from the source tree), so it runs before the project is
installed. Everything that goes into the image is fixed (mtimes, owners, order, gzip header),
so the same busybox binary always yields the same manifest digest; that is what lets a re-run
compare digests with the registry and skip the push.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

# The image itself is made by the package (the pytest plugin's base image is the same one);
# its module is standard library only, so it is imported from the source tree, uninstalled.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from ociworker.testing.busybox import (
    MEDIA_INDEX,
    MEDIA_MANIFEST,
    Image,
    build_image,
    build_layer_tar,
    busybox_image,
    write_layout,
)
from ociworker.testing.busybox import host_arch as _host_arch

__all__ = ["Image", "build_image", "build_layer_tar", "busybox_image", "write_layout"]

DEFAULT_REF = "127.0.0.1:5000/busybox:latest"
DEFAULT_LAYOUT = "/var/lib/ociworker-dev/busybox-oci"


def split_ref(ref: str) -> tuple[str, str, str]:
    """``host:port/repo:tag`` -> (host:port, repo, tag)."""
    host, _, rest = ref.partition("/")
    if not rest:
        raise ValueError(f"reference needs a registry host: {ref!r}")
    repo, sep, tag = rest.rpartition(":")
    if not sep or "/" in tag:
        repo, tag = rest, "latest"
    return host, repo, tag


def registry_digest(ref: str) -> str | None:
    """The manifest digest the registry serves for ``ref``, or None if it has no such tag."""
    host, repo, tag = split_ref(ref)
    req = urllib.request.Request(
        f"http://{host}/v2/{repo}/manifests/{tag}",
        method="HEAD",
        headers={"Accept": f"{MEDIA_MANIFEST}, {MEDIA_INDEX}"},
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            value = resp.headers.get("Docker-Content-Digest")
            return str(value) if value else None
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return None
        raise


def push(layout: Path, tag: str, ref: str) -> None:
    subprocess.run(
        [
            "skopeo",
            # The host's trust policy is not ours to rely on; this copy is loopback-only.
            "--insecure-policy",
            "copy",
            "--quiet",
            "--preserve-digests",
            "--dest-tls-verify=false",
            f"oci:{layout}:{tag}",
            f"docker://{ref}",
        ],
        check=True,
        stdin=subprocess.DEVNULL,
    )


def host_arch() -> str:
    try:
        return _host_arch()
    except ValueError as exc:
        raise SystemExit(str(exc)) from None


def push_verified(layout: Path, tag: str, ref: str, digest: str, label: str) -> int:
    """Push unless the registry already serves DIGEST, then check it serves exactly that."""
    if registry_digest(ref) == digest:
        print(f"==> {label}: registry already has this digest", file=sys.stderr)
        return 0
    push(layout, tag, ref)
    got = registry_digest(ref)
    if got != digest:
        print(f"ERROR: pushed {digest} but the registry serves {got}", file=sys.stderr)
        return 1
    print(f"==> {label}: pushed to {ref}", file=sys.stderr)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--busybox", type=Path, default=Path("/bin/busybox"))
    parser.add_argument("--layout", type=Path, default=Path(DEFAULT_LAYOUT))
    parser.add_argument("--ref", default=DEFAULT_REF)
    parser.add_argument("--no-push", action="store_true", help="only write the OCI layout")
    args = parser.parse_args(argv)

    arch = host_arch()
    tag = split_ref(args.ref)[2]
    image = busybox_image(args.busybox, arch)
    digest = image.manifest.digest
    print(f"==> base image: {args.ref} manifest {digest}", file=sys.stderr)

    index = args.layout / "index.json"
    if not (index.exists() and digest in index.read_text()):
        write_layout(image, args.layout, tag, arch)
        print(f"==> base image: wrote OCI layout {args.layout}", file=sys.stderr)
    if args.no_push:
        return 0
    return push_verified(args.layout, tag, args.ref, digest, "base image")


if __name__ == "__main__":
    sys.exit(main())
