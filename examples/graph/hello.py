"""examples/hello, written in Python: the same steps as its Dockerfile, so the
same cache records and the same image digest as ``ociworker build
examples/hello`` (built first, this one is all CACHED; and the other way round).

    python examples/graph/hello.py -o type=oci,dest=hello.oci.tar
    # or its serialized graph, for a daemon or the CLI (the context is the cwd):
    cd examples/hello
    python ../graph/hello.py --definition pb | ociworker build --frontend graph.v1 -
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ociworker import graph as g
from ociworker.progress_ui import PlainPrinter

#: the build context: the Dockerfile example's own directory
CONTEXT = Path(__file__).resolve().parent.parent / "hello"
BASE = "127.0.0.1:5000/busybox:latest"


def hello(base: str = BASE) -> g.State:
    """``FROM $BASE AS greeter`` ... ``CMD ["cat", "/hello.txt"]``, step for step."""
    image = g.image(base)
    greeter = image.with_arg("GREETING", "hello").run(
        'echo "$GREETING from stage one, running as $(id -un) on $(uname -s)" > /greeting.txt'
    )
    return (
        image.copy(g.local(), "message.txt", "/message.txt")
        .copy(greeter, "/greeting.txt", "/hello.txt")
        .run("cat /message.txt >> /hello.txt && wc -l /hello.txt")
        .with_cmd(["cat", "/hello.txt"])
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", default=BASE, help="base image (the Dockerfile's BASE)")
    p.add_argument("-o", "--output", action="append", default=[], help="as ociworker build -o")
    p.add_argument("-t", "--tag", action="append", default=[])
    p.add_argument("--root", help="state dir (default $OCIWORKER_ROOT or /var/lib/ociworker)")
    p.add_argument(
        "--definition", choices=("pb", "json"), help="write the graph to stdout, build nothing"
    )
    args = p.parse_args()
    if args.definition:
        sys.stdout.buffer.write(g.definition(hello(args.base), args.definition))
        return
    result = g.build(
        hello(args.base),
        context=CONTEXT,
        outputs=args.output,
        tags=args.tag,
        root=args.root,
        events=PlainPrinter(sys.stderr),
    )
    print(f"image digest: {result.manifest.digest if result.manifest else None}")


if __name__ == "__main__":
    main()
