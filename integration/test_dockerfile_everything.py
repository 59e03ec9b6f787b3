"""One Dockerfile using every instruction and flag ociworker supports, including those
Docker 20.10's frontend predates (heredocs, --chmod, --link, --parents, --exclude): the
build succeeds and each instruction left its mark in the tree or the image config.
(test_dockerfile_vs_buildkit.py compares the part dockerd understands with BuildKit.)"""

from __future__ import annotations

import gzip
import io
import json
import tarfile
from pathlib import Path
from typing import Any

from conftest import LEGS_MARK, current_cli, exported_ids

pytestmark = LEGS_MARK

DOCKERFILE = r"""# syntax=docker/dockerfile:1
# escape=\
ARG BASE
FROM --platform=$BUILDPLATFORM $BASE AS build
ARG TARGETARCH
ARG TARGETOS
RUN echo "$TARGETOS/$TARGETARCH" > /platform
RUN <<EOF
mkdir -p /out/src/a /out/src/b
echo one > /out/src/a/x.txt
echo two > /out/src/b/y.log
EOF
ONBUILD RUN echo inherited-trigger > /trigger

FROM build AS child
RUN test -f /trigger

FROM $BASE
ARG VERSION=2
MAINTAINER Someone <someone@example.com>
LABEL org.example.version=$VERSION
ENV HOME_DIR=/srv legacy=yes
WORKDIR $HOME_DIR
WORKDIR app
COPY --chmod=0750 --chown=1000:1000 tool.sh /usr/local/bin/tool
COPY --link files/ /files/
COPY --exclude=*.log files/ /no-logs/
COPY --from=build --parents /out/src/**/x.txt /parents/
COPY --from=child /trigger /trigger-in-child
ADD bundle.tar.gz /bundle/
COPY <<EOF /etc/motd
version $VERSION
EOF
RUN cat <<A > /heredoc-fed && echo "$VERSION" >> /heredoc-fed
fed
A
RUN ["/bin/sh", "-c", "echo exec > /exec"]
RUN --mount=type=cache,target=/cache echo cached > /cache/c && cp /cache/c /from-cache
RUN --mount=type=tmpfs,target=/scratch echo t > /scratch/t && test ! -e /scratch-leak
RUN --network=none cat /sys/class/net/lo/operstate > /net
EXPOSE 8080 53/udp
VOLUME ["/data"]
STOPSIGNAL SIGINT
HEALTHCHECK --interval=5s --retries=1 CMD true
SHELL ["/bin/sh", "-e", "-c"]
RUN echo shell > /shell
ONBUILD RUN echo for-children
USER 1000:1000
ENTRYPOINT ["/bin/sh", "-c"]
CMD ["cat /etc/motd"]
"""


def _bundle() -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tf:
        data = b"inside the archive\n"
        info = tarfile.TarInfo("inner/readme")
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    return gzip.compress(raw.getvalue())


def _config(archive: Path) -> dict[str, Any]:
    with tarfile.open(archive) as tf:

        def blob(d: str) -> Any:
            f = tf.extractfile("blobs/sha256/" + d.split(":", 1)[1])
            assert f is not None
            return json.load(f)

        index_file = tf.extractfile("index.json")
        assert index_file is not None
        manifest = blob(json.load(index_file)["manifests"][0]["digest"])
        config: dict[str, Any] = blob(manifest["config"]["digest"])
        return config


def test_every_instruction_in_one_build(
    tmp_path: Path, base_image: str, require_root: None
) -> None:
    ctx = tmp_path / "ctx"
    (ctx / "files").mkdir(parents=True)
    (ctx / "Dockerfile").write_text(DOCKERFILE)
    (ctx / "tool.sh").write_text("#!/bin/sh\necho tool\n")
    (ctx / "files" / "keep.txt").write_text("keep\n")
    (ctx / "files" / "drop.log").write_text("drop\n")
    (ctx / "bundle.tar.gz").write_bytes(_bundle())
    out, img = tmp_path / "out", tmp_path / "img.tar"
    # as root, or as the test user in the rootless leg
    proc = current_cli().run(
        "build", "--root", str(tmp_path / "state"), "--progress", "plain",
        "--build-arg", f"BASE={base_image}", "--output", f"type=local,dest={out}",
        "--output", f"type=oci,dest={img}", str(ctx), check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]

    def text(p: str) -> str:
        return (out / p.lstrip("/")).read_text()

    tool = out / "usr/local/bin/tool"
    assert oct(tool.stat().st_mode & 0o7777) == "0o750"
    assert (tool.stat().st_uid, tool.stat().st_gid) == exported_ids(1000, 1000)
    assert text("/files/keep.txt") == "keep\n" and text("/files/drop.log") == "drop\n"
    assert (out / "no-logs/keep.txt").exists() and not (out / "no-logs/drop.log").exists()
    assert text("/parents/out/src/a/x.txt") == "one\n"
    assert not (out / "parents/out/src/b").exists()
    assert text("/trigger-in-child") == "inherited-trigger\n"
    assert text("/bundle/inner/readme") == "inside the archive\n"
    assert text("/etc/motd") == "version 2\n"
    assert text("/heredoc-fed") == "fed\n2\n"
    assert text("/exec") == "exec\n"
    assert text("/from-cache") == "cached\n"
    assert not (out / "cache/c").exists()  # cache contents never enter a layer
    assert text("/net").strip() in ("up", "unknown")
    assert text("/shell") == "shell\n"
    assert (out / "srv/app").is_dir()

    config = _config(img)
    c = config["config"]
    assert config["author"] == "Someone <someone@example.com>"
    assert c["Labels"] == {"org.example.version": "2"}
    assert "HOME_DIR=/srv" in c["Env"] and "legacy=yes" in c["Env"]
    assert c["WorkingDir"] == "/srv/app"
    assert set(c["ExposedPorts"]) == {"8080/tcp", "53/udp"}
    assert c["Volumes"] == {"/data": {}}
    assert c["StopSignal"] == "SIGINT"
    assert c["Healthcheck"]["Test"] == ["CMD-SHELL", "true"]
    assert c["Shell"] == ["/bin/sh", "-e", "-c"]
    assert c["OnBuild"] == ["RUN echo for-children"]
    assert c["User"] == "1000:1000"
    assert c["Entrypoint"] == ["/bin/sh", "-c"] and c["Cmd"] == ["cat /etc/motd"]
    layers = [h for h in config["history"] if not h.get("empty_layer")]
    assert len(layers) == len(config["rootfs"]["diff_ids"])
