"""Parse and convert a 100,000-line Dockerfile; print the seconds each phase took.

Run: .venv/bin/python benchmarks/dockerfile_parse.py [LINES]   (target: under 2 s in all)

ENV and ARG names cycle over a bounded set, as in real files: every RUN carries the
whole environment and its history entry lists every ARG in scope (BuildKit's own
semantics), so 10,000 distinct names would make any faithful converter quadratic.
"""

from __future__ import annotations

import sys
import time

from ociworker.frontend.dockerfile.convert import ImageInfo, Options, convert
from ociworker.frontend.dockerfile.parser import parse

_BODY = (
    "ENV K{k}=v{i}",
    "RUN echo {i} > /f{i}",
    "LABEL l{i}=x",
    "COPY src{i} /dst/",
    "ARG A{k}=d{i}",
    "WORKDIR /w{i}",
    "EXPOSE {p}",
    "RUN <<EOF\necho {i}\nEOF",
)


def make(lines: int) -> str:
    out = ["ARG BASE=busybox", "FROM $BASE AS s0"]
    i = 0
    while len(out) < lines:
        if i and i % 5000 == 0:
            out.append(f"FROM s{i // 5000 - 1} AS s{i // 5000}")
        out.extend(_BODY[i % len(_BODY)].format(i=i, k=i % 40, p=1 + i % 60000).split("\n"))
        i += 1
    return "\n".join(out) + "\n"


def main() -> None:
    lines = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
    text = make(lines)
    base = {"config": {"Env": ["PATH=/bin"]}, "rootfs": {"diff_ids": ["sha256:" + "a" * 64]}}
    t0 = time.perf_counter()
    parsed = parse(text)
    t1 = time.perf_counter()
    plan = convert(parsed, Options(), {"busybox": ImageInfo("busybox@sha256:" + "b" * 64, base)})
    t2 = time.perf_counter()
    assert not plan.missing and plan.target is not None
    print(
        f"{text.count(chr(10))} lines, {len(parsed.instructions)} instructions: "
        f"parse {t1 - t0:.2f} s, convert {t2 - t1:.2f} s, total {t2 - t0:.2f} s"
    )


if __name__ == "__main__":
    main()
