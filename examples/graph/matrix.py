"""A build matrix: the same app on three base images, the results merged into
one image. What a Dockerfile cannot say: ``diff`` takes each run's own changes
(its report, nothing of its base) and ``merge`` lays them side by side, so the
final image is one base plus three independent layers of results.

    python examples/graph/matrix.py -o type=local,dest=out   # out/results/*.txt
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ociworker import graph as g
from ociworker.progress_ui import PlainPrinter

#: the context: the app's sources
CONTEXT = Path(__file__).resolve().parent / "app"
BASE = "127.0.0.1:5000/busybox:latest"


def bases(base: str = BASE) -> dict[str, g.State]:
    """Three bases: the image as it is, and two variants made from it."""
    plain = g.image(base)
    return {
        "plain": plain,
        "tools": plain.run("mkdir -p /opt/tools && touch /opt/tools/jq /opt/tools/yq"),
        "hardened": plain.mkfile("/etc/flavor", "hardened\n")
        .run("echo app:x:4242:4242::/:/bin/sh >> /etc/passwd && echo app:x:4242: >> /etc/group")
        .mkdir("/results", chown="app")
        .with_user("app"),
    }


def matrix(base: str = BASE) -> g.State:
    app = g.local()
    results = []
    for name, b in bases(base).items():
        with_app = b.copy(app, "report.sh", "/app/report.sh")
        ran = with_app.run(f"mkdir -p /results && sh /app/report.sh {name} > /results/{name}.txt")
        # the run's own changes (its report), without the base or the app under it
        results.append(g.diff(with_app, ran))
    return g.merge([g.image(base), *results]).with_cmd(["cat", "/results/plain.txt"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", default=BASE)
    p.add_argument("-o", "--output", action="append", default=[], help="as ociworker build -o")
    p.add_argument("-t", "--tag", action="append", default=[])
    p.add_argument("--root", help="state dir (default $OCIWORKER_ROOT or /var/lib/ociworker)")
    args = p.parse_args()
    result = g.build(
        matrix(args.base),
        context=CONTEXT,
        outputs=args.output,
        tags=args.tag,
        root=args.root,
        events=PlainPrinter(sys.stderr),
    )
    print(f"image digest: {result.manifest.digest if result.manifest else None}")


if __name__ == "__main__":
    main()
