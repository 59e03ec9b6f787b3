"""What the daemon makes of a Solve request's Dockerfile fields: the same checks
the embedded CLI applies to the file it reads (session.context)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ociworker.api.server import build_definition
from ociworker.api.v1 import control_pb2 as pb
from ociworker.errors import ConfigError, DockerfileError, UnsafePathError
from ociworker.session.context import read_dockerfile


def test_the_clients_bytes_become_the_definition() -> None:
    req = pb.SolveRequest(
        dockerfile_name="app.Dockerfile",
        dockerfile="FROM scratch\nLABEL a=ü\n".encode(),
        ignore_patterns=["*.log", "!keep.log"],
    )
    d = build_definition(req)
    assert (d.dockerfile, d.filename, d.ignore_patterns) == (
        "FROM scratch\nLABEL a=ü\n",
        "app.Dockerfile",
        ("*.log", "!keep.log"),
    )
    assert build_definition(pb.SolveRequest(dockerfile=b"FROM scratch\n")).filename == "Dockerfile"


def test_non_utf8_is_refused_as_the_embedded_path_refuses_it(tmp_path: Path) -> None:
    raw = b"FROM scratch\nLABEL a=\xff\n"
    (tmp_path / "Dockerfile").write_bytes(raw)
    with pytest.raises(DockerfileError, match="is not UTF-8 text") as embedded:
        read_dockerfile(tmp_path, None)
    with pytest.raises(DockerfileError, match="is not UTF-8 text") as daemon:
        build_definition(pb.SolveRequest(dockerfile_name="Dockerfile", dockerfile=raw))
    assert (
        str(daemon.value)
        == f"Dockerfile is not UTF-8 text: {str(embedded.value).split(': ', 1)[1]}"
    )


@pytest.mark.parametrize("name", ["sub/Dockerfile", "../Dockerfile", ".."])
def test_a_dockerfile_name_that_is_a_path_is_refused(name: str) -> None:
    with pytest.raises((ConfigError, UnsafePathError)):
        build_definition(pb.SolveRequest(dockerfile_name=name, dockerfile=b"FROM scratch\n"))
