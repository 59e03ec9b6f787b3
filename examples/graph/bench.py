"""The benchmark cases (``../shared/bench/*/Dockerfile``) written with
``ociworker.graph``: step for step the same graphs, so a Python build of a case
and its Dockerfile's share every cache record.

    python examples/graph/bench.py steps -o type=oci,dest=steps.tar
    python examples/graph/bench.py context --context DIR
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from ociworker import graph as g
from ociworker.progress_ui import PlainPrinter

BASE = "127.0.0.1:5000/busybox:latest"


def steps(base: str = BASE) -> g.State:
    """30 trivial RUN steps."""
    st = g.image(base)
    for i in range(1, 31):
        st = st.run(f"echo {i} >> /log")
    return st


def fanout(base: str = BASE) -> g.State:
    """Three 2-second stages in parallel, their outputs copied together."""
    common = g.image(base).run("mkdir /out")
    names = ("one", "two", "three")
    parts = {n: common.run(f"sleep 2 && echo {n} > /out/{n}") for n in names}
    final = common
    for n in names:
        final = final.copy(parts[n], f"/out/{n}", "/r/")
    return final


def cachemount(base: str = BASE) -> g.State:
    """A cache mount filled once, then a tmpfs."""
    return (
        g.image(base)
        .run(
            "ls /var/cache/thing/marker 2>/dev/null || (head -c 33554432 /dev/urandom > "
            "/var/cache/thing/data && touch /var/cache/thing/marker)",
            mounts=[g.cache("/var/cache/thing")],
        )
        .run("echo hi > /t/x && cat /t/x > /out", mounts=[g.tmpfs("/t")])
    )


def layer_export(base: str = BASE) -> g.State:
    """10,000 small files and 128 MiB of incompressible data in one layer."""
    return (
        g.image(base)
        .run(
            "mkdir -p /d && cd /d && i=0; while [ $i -lt 100 ]; do mkdir s$i; j=0; while "
            "[ $j -lt 100 ]; do echo $i.$j > s$i/$j; j=$((j+1)); done; i=$((i+1)); done"
        )
        .run("head -c 134217728 /dev/urandom > /blob")
    )


def context(base: str = BASE, exclude: tuple[str, ...] = ()) -> g.State:
    """The whole context copied, then measured (``exclude``: its .dockerignore)."""
    return g.image(base).copy(g.local(exclude=exclude), ".", "/src").run("du -s /src > /size")


CASES: dict[str, Callable[[str], g.State]] = {
    "steps": steps,
    "fanout": fanout,
    "cachemount": cachemount,
    "layer-export": layer_export,
    "context": context,
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("case", choices=sorted(CASES))
    p.add_argument("--base", default=BASE)
    p.add_argument("--context", default=".", help="the build context (the context case's files)")
    p.add_argument("-o", "--output", action="append", default=[], help="as ociworker build -o")
    p.add_argument("--root", help="state dir (default $OCIWORKER_ROOT or /var/lib/ociworker)")
    args = p.parse_args()
    result = g.build(
        CASES[args.case](args.base),
        context=args.context,
        outputs=args.output,
        root=args.root,
        events=PlainPrinter(sys.stderr),
    )
    print(f"image digest: {result.manifest.digest if result.manifest else None}")


if __name__ == "__main__":
    main()
