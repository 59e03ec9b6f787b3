"""The same Dockerfile built by ociworker and by Docker Engine's BuildKit must give the
same image config: every instruction and flag Docker 20.10's built-in frontend knows."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import pytest

from dockerd import DOCKER, Dockerd

COMPARED = (
    "Env",
    "Cmd",
    "Entrypoint",
    "WorkingDir",
    "User",
    "Labels",
    "ExposedPorts",
    "Volumes",
    "StopSignal",
    "Healthcheck",
    "Shell",
    "OnBuild",
)


def _dockerfile(base: str) -> str:
    repo, tag = base.rsplit(":", 1)
    return f"""\
ARG REPO={repo}
ARG TAG={tag}
FROM $REPO:$TAG AS tools
ARG TOOL=hammer
RUN echo "$TOOL" > /tool && mkdir -p /out && cp /tool /out/
ONBUILD RUN echo stage-trigger

FROM ${{REPO}}:${{TAG}}
ARG TAG
ARG VERSION=1.0
MAINTAINER Someone <someone@example.com>
LABEL org.example.version=$VERSION "org.example.two words"="a b" plain=x
ENV APP_HOME=/srv/app PATH=/srv/app/bin:$PATH
ENV legacy value with spaces
WORKDIR $APP_HOME
WORKDIR sub/dir
COPY --chown=1000:1000 files/ ./files/
COPY files/a.txt files/b.txt /opt/two/
ADD archive.tar /unpacked/
COPY --from=tools /tool /out/tool
COPY --from=0 /out/ /out-copy/
RUN echo "$VERSION $TAG $APP_HOME" > /built && ls /unpacked > /listing
RUN ["/bin/sh", "-c", "echo exec-form > /exec"]
EXPOSE 80 443/tcp 53/udp 7000-7002
VOLUME /data
VOLUME ["/var/log/app", "/cache"]
STOPSIGNAL SIGQUIT
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=2 CMD wget -q -O- localhost
SHELL ["/bin/sh", "-e", "-c"]
RUN echo shell-form-with-custom-shell > /shell
ONBUILD RUN echo child-trigger
ONBUILD COPY . /child-context
USER 1000:1000
ENTRYPOINT ["/bin/sh", "-c"]
CMD echo hello
"""


def _context(tmp: Path, base: str) -> Path:
    ctx = tmp / "ctx"
    (ctx / "files" / "nested").mkdir(parents=True)
    (ctx / "files" / "a.txt").write_text("a\n")
    (ctx / "files" / "b.txt").write_text("b\n")
    (ctx / "files" / "nested" / "c.txt").write_text("c\n")
    payload = tmp / "payload"
    payload.mkdir()
    (payload / "inside.txt").write_text("from the archive\n")
    subprocess.run(["tar", "-C", str(payload), "-cf", str(ctx / "archive.tar"), "."], check=True)
    (ctx / "Dockerfile").write_text(_dockerfile(base))
    return ctx


def _inspect(dockerd: Dockerd, tag: str) -> dict[str, Any]:
    got: list[dict[str, Any]] = json.loads(dockerd.docker("image", "inspect", tag).stdout)
    return got[0]


def _history(dockerd: Dockerd, tag: str) -> list[str]:
    out = dockerd.docker("history", "--no-trunc", "--format", "{{.CreatedBy}}", tag).stdout
    return out.splitlines()


@pytest.mark.usefixtures("require_root")
def test_image_config_matches_docker_buildkit(
    dockerd: Dockerd, tmp_path: Path, base_image: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    ctx = _context(tmp_path, base_image)

    # The fixture's client inherits our environment: this selects BuildKit in dockerd.
    monkeypatch.setenv("DOCKER_BUILDKIT", "1")
    dockerd.docker("build", "--network=host", "-t", "theirs:1", str(ctx), timeout=600)

    archive = tmp_path / "ours.tar"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "ociworker",
            "build",
            "--root",
            str(tmp_path / "state"),
            "--progress",
            "plain",
            "-t",
            "ours:1",
            "--output",
            f"type=docker,dest={archive}",
            str(ctx),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    dockerd.docker("load", "-i", str(archive))

    theirs, ours = _inspect(dockerd, "theirs:1"), _inspect(dockerd, "ours:1")
    for key in COMPARED:
        assert ours["Config"].get(key) == theirs["Config"].get(key), key
    assert ours["Author"] == theirs["Author"]
    assert len(ours["RootFS"]["Layers"]) == len(theirs["RootFS"]["Layers"])
    # The texts differ in small ways Docker itself changed between releases (how
    # HEALTHCHECK is printed, whether ARG values are listed); the steps must not.
    theirs_steps, our_steps = _history(dockerd, "theirs:1"), _history(dockerd, "ours:1")
    assert any(h.endswith("# buildkit") for h in theirs_steps), "dockerd did not use BuildKit"
    assert len(our_steps) == len(theirs_steps), (our_steps, theirs_steps)

    # And the trees agree where the Dockerfile wrote files.
    for tag in ("theirs:1", "ours:1"):
        dockerd.docker("create", "--name", tag.split(":")[0], tag)
    for path in ("/built", "/listing", "/exec", "/shell", "/out/tool", "/out-copy/tool"):
        assert _cat(dockerd, "ours", path) == _cat(dockerd, "theirs", path), path


def _cat(dockerd: Dockerd, container: str, path: str) -> str:
    """A file of a created container, through ``docker cp`` (a tar on stdout)."""
    proc = subprocess.run(
        [DOCKER, "-H", f"unix://{dockerd.socket}", "cp", f"{container}:{path}", "-"],
        env={**os.environ, "DOCKER_CONFIG": str(dockerd.client_config)},
        capture_output=True,
        check=True,
    )
    with tarfile.open(fileobj=io.BytesIO(proc.stdout)) as tf:
        f = tf.extractfile(tf.getmembers()[0])
        assert f is not None, path
        return f.read().decode()
