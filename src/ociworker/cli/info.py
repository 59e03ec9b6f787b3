"""``ociworker info``: what a running daemon says about itself (``buildctl debug info``).

The worker image's HEALTHCHECK runs it, so it must answer fast either way: a daemon that
does not answer within a few seconds is reported as unreachable (exit 1, one line), never
waited on.
"""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING

from ociworker.fs.userns import default_socket

if TYPE_CHECKING:
    from ociworker.api.client import DaemonInfo

# Below the worker image's HEALTHCHECK --timeout (10 s): the check fails with our one-line
# reason rather than being killed by dockerd without one.
INFO_TIMEOUT_S = 5.0


def format_info(info: DaemonInfo, fmt: str) -> str:
    """The report, without a trailing newline."""
    if fmt == "json":
        return json.dumps(
            {
                "version": info.version,
                "root": info.root,
                "runtime": info.runtime,
                "snapshotter": info.snapshotter,
                "snapshotter_picked": info.snapshotter_picked,
                "rootless": info.rootless,
                "running_builds": info.running_builds,
            },
            indent=2,
        )
    rows = (
        ("Version", info.version),
        ("Root", info.root),
        ("Runtime", info.runtime),
        ("Snapshotter", info.snapshotter_picked or info.snapshotter),
        ("Rootless", "true" if info.rootless else "false"),
        ("Running builds", str(info.running_builds)),
    )
    return "\n".join(f"{name + ':':<16}{value}" for name, value in rows)


async def cmd_info(args: argparse.Namespace) -> int:
    # grpc and the protobuf modules load here, not with the parser: every command's
    # start-up (an embedded build's most of all) would pay for them otherwise.
    from ociworker.api.client import Client

    # The daemon's own default when no address is given: root's socket under /run, a user's
    # under $XDG_RUNTIME_DIR (what `ociworker serve` listens on as that user).
    addr = args.addr or f"unix://{default_socket()}"
    async with Client(
        addr, tlscacert=args.tlscacert, tlscert=args.tlscert, tlskey=args.tlskey
    ) as client:
        info = await client.info(timeout=INFO_TIMEOUT_S)
    print(format_info(info, args.format))
    return 0
