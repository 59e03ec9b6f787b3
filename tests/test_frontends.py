"""Frontend selection and what a frontend may read: the registry (built-ins,
aliases, entry points), ``# syntax=`` picking a registered frontend, the
confined context reader, and a plugin's output checked like a definition."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from ociworker import controller, plugins
from ociworker.core.build import BuildDefinition, BuildRequest
from ociworker.core.graph import FileOp, Mkfile, Vertex
from ociworker.core.oci import Platform
from ociworker.definition import DefinitionError, encode
from ociworker.errors import ConfigError, NotFoundError, UnsafePathError, UserError
from ociworker.frontend.base import FrontendInputs, FrontendResult
from ociworker.fs.ignore import IgnoreMatcher
from ociworker.fs.reader import ContextFiles

# --- the confined reader --------------------------------------------------------------


@pytest.fixture
def ctx(tmp_path: Path) -> Path:
    root = tmp_path / "ctx"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "a.txt").write_text("in the context\n")
    (root / "secret.key").write_text("hidden by .dockerignore\n")
    (tmp_path / "outside.txt").write_text("host file\n")
    return root


def test_reader_reads_context_files(ctx: Path) -> None:
    files = ContextFiles(ctx)
    assert files.read("sub/a.txt") == b"in the context\n"
    assert files.read("./sub//a.txt") == b"in the context\n"


@pytest.mark.parametrize("path", ["../outside.txt", "sub/../../outside.txt", "/etc/hostname", ""])
def test_reader_refuses_paths_out_of_the_context(ctx: Path, path: str) -> None:
    with pytest.raises(UnsafePathError, match="inside the context"):
        ContextFiles(ctx).read(path)


def test_reader_resolves_symlinks_inside_the_context(ctx: Path, tmp_path: Path) -> None:
    # an absolute link is the context's /, never the host's
    os.symlink(str(tmp_path / "outside.txt"), ctx / "abs-link")
    os.symlink("../outside.txt", ctx / "rel-link")
    os.symlink("sub/a.txt", ctx / "good-link")
    files = ContextFiles(ctx)
    assert files.read("good-link") == b"in the context\n"
    for link in ("abs-link", "rel-link"):
        with pytest.raises(NotFoundError):
            files.read(link)


def test_reader_hides_ignored_files_and_bounds_size(ctx: Path) -> None:
    files = ContextFiles(ctx, IgnoreMatcher(["*.key"]), limit=8)
    with pytest.raises(NotFoundError, match="dockerignore"):
        files.read("secret.key")
    with pytest.raises(UserError, match="larger than 8 bytes"):
        files.read("sub/a.txt")
    with pytest.raises(UserError, match="not a regular file"):
        files.read("sub")
    os.mkfifo(ctx / "fifo")  # opening it must not block the build
    with pytest.raises(UserError, match="not a regular file"):
        files.read("fifo")


# --- the registry ---------------------------------------------------------------------


def test_builtin_names_and_alias() -> None:
    assert plugins.get("").name == "dockerfile.v0" and plugins.get("").frontend is None
    assert plugins.get("dockerfile").name == "dockerfile.v0"
    assert plugins.get("graph.v1").frontend is not None
    assert plugins.names()[:2] == ["dockerfile.v0", "graph.v1"]


def test_unknown_frontend_names_the_registered_ones() -> None:
    with pytest.raises(ConfigError) as info:
        plugins.get("nosuch.v9")
    assert "unknown frontend 'nosuch.v9'" in str(info.value)
    assert "dockerfile.v0" in str(info.value) and "graph.v1" in str(info.value)


@pytest.fixture
def installed_plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A distribution on sys.path with an ``ociworker.frontends`` entry point,
    as pip leaves it (dist-info + module), found by importlib.metadata."""
    site = tmp_path / "site"
    dist = site / "echo_frontend-1.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: echo-frontend\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(
        "[ociworker.frontends]\necho.v1 = echo_frontend:Echo\nbroken.v1 = echo_frontend:nope\n"
    )
    (site / "echo_frontend.py").write_text(
        "from ociworker.core.graph import FileOp, Mkfile, Vertex\n"
        "from ociworker.frontend.base import FrontendResult\n"
        "class Echo:\n"
        "    def solve(self, inputs):\n"
        "        op = FileOp((Mkfile('/echo', inputs.definition.decode(), 0o644),))\n"
        "        return FrontendResult(Vertex(op, (None,)), {'config': {'Cmd': ['cat']}})\n"
    )
    monkeypatch.syspath_prepend(str(site))
    yield "echo.v1"
    sys.modules.pop("echo_frontend", None)


def test_entry_point_frontend_is_found_by_name(installed_plugin: str) -> None:
    assert installed_plugin in plugins.names()
    chosen = plugins.get(installed_plugin)
    assert chosen.frontend is not None
    got = chosen.frontend.solve(FrontendInputs(b"hello", "x", ContextFiles(Path("/nonexistent"))))
    assert isinstance(got.target, Vertex) and isinstance(got.target.op, FileOp)
    with pytest.raises(ConfigError, match=r"broken\.v1.*could not be loaded"):
        plugins.get("broken.v1")


def _req(**kw: Any) -> BuildRequest:
    return BuildRequest(context=Path("."), **kw)


def test_syntax_line_picks_a_registered_frontend(installed_plugin: str) -> None:
    text = f"# syntax={installed_plugin}\nwhatever the plugin reads\n"
    assert controller.choose_frontend(_req(), BuildDefinition(text)).name == installed_plugin
    graph = "# syntax = graph.v1\n"
    assert controller.choose_frontend(_req(), BuildDefinition(graph)).name == "graph.v1"
    # an image reference that names no plugin: the Dockerfile frontend (which warns)
    for syntax in ("docker/dockerfile:1", "example.com/me/frontend:2", "dockerfile"):
        df = BuildDefinition(f"# syntax={syntax}\nFROM scratch\n")
        assert controller.choose_frontend(_req(), df).frontend is None
    # --frontend picks first; the syntax line is the Dockerfile frontend's to follow
    chosen = controller.choose_frontend(_req(frontend="graph.v1"), BuildDefinition(text))
    assert chosen.name == "graph.v1"


@dataclass
class _Config:
    platform: Platform = field(default_factory=lambda: Platform.parse("linux/amd64"))


@dataclass
class _Worker:
    config: _Config = field(default_factory=_Config)


class _Returns:
    def __init__(self, result: FrontendResult | Exception) -> None:
        self.result = result

    def solve(self, inputs: FrontendInputs) -> FrontendResult:
        if isinstance(self.result, Exception):
            raise self.result
        return self.result


def _plan(frontend: _Returns, tmp_path: Path) -> controller.Plan:
    chosen = plugins.Chosen("test.v1", frontend)
    return asyncio.run(
        controller.plan_frontend(
            _Worker(),  # type: ignore[arg-type]
            chosen,
            _req(),
            BuildDefinition("", "def", source=b"x"),
            tmp_path,
        )
    )


def test_plugin_graph_is_checked_like_a_definition(tmp_path: Path) -> None:
    escape = Vertex(FileOp((Mkfile("/../../etc/cron.d/x", "boom", 0o644),)), (None,))
    with pytest.raises(DefinitionError, match="escapes its root"):
        _plan(_Returns(FrontendResult(escape)), tmp_path)
    with pytest.raises(UserError, match=r"frontend test\.v1 failed: KeyError"):
        _plan(_Returns(KeyError("boom")), tmp_path)
    good = Vertex(FileOp((Mkfile("/f", "ok", 0o644),)), (None,))
    plan = _plan(_Returns(FrontendResult(good, {"config": {"Cmd": ["x"]}})), tmp_path)
    assert plan.target == good
    assert plan.config["architecture"] == "amd64" and plan.config["os"] == "linux"
    assert plan.config["config"] == {"Cmd": ["x"]}


def test_graph_frontend_reads_its_definition(tmp_path: Path) -> None:
    good = Vertex(FileOp((Mkfile("/f", "ok", 0o644),)), (None,))
    chosen = plugins.get("graph.v1")
    assert chosen.frontend is not None
    got = chosen.frontend.solve(
        FrontendInputs(encode(good, {"config": {}}, "json"), "g.json", ContextFiles(tmp_path))
    )
    assert got.target == good and got.image_config == {"config": {}}


@pytest.mark.parametrize(
    ("syntax", "warns"),
    [
        ("example.com/me/frontend:2", True),
        ("docker/dockerfile:1", False),
        ("dockerfile.v0", False),
        ("dockerfile", False),
    ],
)
def test_syntax_naming_no_plugin_keeps_the_dockerfile_warning(syntax: str, warns: bool) -> None:
    from ociworker.frontend.dockerfile.convert import Options, convert
    from ociworker.frontend.dockerfile.parser import parse

    plan = convert(parse(f"# syntax={syntax}\nFROM scratch\n"), Options(), {})
    found = [w for w in plan.warnings if "syntax directive names the frontend" in w]
    assert bool(found) == warns, plan.warnings


def test_client_refuses_an_oversize_definition_before_sending(tmp_path: Path) -> None:
    from ociworker.api.client import Client
    from ociworker.definition import MAX_BYTES

    async def go() -> None:
        # no daemon listens there: the refusal comes before any connection is tried
        async with Client(f"unix://{tmp_path}/none.sock") as client:
            req = BuildRequest(context=tmp_path, frontend="graph.v1")
            async for _ in client.solve(req, definition=b" " * (MAX_BYTES + 1)):
                pass

    with pytest.raises(DefinitionError, match="over the limit"):
        asyncio.run(go())


@pytest.mark.parametrize(
    ("returned", "words"),
    [
        (Vertex(FileOp((Mkfile("/f", "x", 0o644),)), (None,)), "returned Vertex"),
        (FrontendResult("not a vertex"), "target is str"),  # type: ignore[arg-type]
        (FrontendResult(None, None), "image_config is NoneType"),  # type: ignore[arg-type]
        (FrontendResult(None, {"config": {1, 2}}), "image_config is not JSON"),
        (FrontendResult(None, {"config": "Cmd"}), "config is not an object"),
        (FrontendResult(None, {"history": ["x"]}), "history is not a list of objects"),
    ],
)
def test_what_a_plugin_returns_is_checked(returned: Any, words: str, tmp_path: Path) -> None:
    with pytest.raises(UserError, match=words):
        _plan(_Returns(returned), tmp_path)


def test_a_json_definition_can_name_graph_v1_by_its_syntax_line(tmp_path: Path) -> None:
    good = Vertex(FileOp((Mkfile("/f", "ok", 0o644),)), (None,))
    text = "# syntax=graph.v1\n" + encode(good, None, "json").decode()
    chosen = controller.choose_frontend(_req(), BuildDefinition(text, "Dockerfile"))
    assert chosen.name == "graph.v1" and chosen.frontend is not None
    got = chosen.frontend.solve(FrontendInputs(text.encode(), "Dockerfile", ContextFiles(tmp_path)))
    assert got.target == good


def test_client_wants_a_frontend_for_definition_bytes(tmp_path: Path) -> None:
    from ociworker.api.client import Client

    async def go() -> None:
        async with Client(f"unix://{tmp_path}/none.sock") as client:
            async for _ in client.solve(BuildRequest(context=tmp_path), definition=b"x"):
                pass

    with pytest.raises(ConfigError, match=r'frontend="graph\.v1"'):
        asyncio.run(go())
