"""The writers of a user's files (``--iidfile``/``--metadata-file``, archives, a
daemon client's outputs): temp files beside the destination, gone after any
failure, and no parent directory created (buildx's os.Create creates none)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ociworker.api.client import OutputData, _OutputWriters
from ociworker.core.outputs import OutputSpec
from ociworker.errors import UserError
from ociworker.exporter.target import LocalExportTarget, open_archive_dest, write_errors
from ociworker.fs.atomic import write_atomic


def test_write_atomic_creates_no_parent_and_names_the_missing_dir(tmp_path: Path) -> None:
    target = tmp_path / "no" / "such" / "iid"
    with pytest.raises(FileNotFoundError) as exc:
        write_atomic(target, b"sha256:x")
    assert exc.value.filename == str(tmp_path / "no" / "such")  # not the temp's name
    assert os.listdir(tmp_path) == []


def test_write_atomic_onto_a_directory_leaves_no_temp(tmp_path: Path) -> None:
    (tmp_path / "meta.json").mkdir()
    with pytest.raises(IsADirectoryError):
        write_atomic(tmp_path / "meta.json", b"{}")
    assert os.listdir(tmp_path) == ["meta.json"]
    assert os.listdir(tmp_path / "meta.json") == []


def test_write_atomic_replaces_and_leaves_only_the_file(tmp_path: Path) -> None:
    dest = tmp_path / "iid"
    dest.write_text("old")
    write_atomic(dest, b"new")
    write_atomic(dest, b"newer")
    assert dest.read_bytes() == b"newer"
    assert os.listdir(tmp_path) == ["iid"]


def test_write_errors_turn_oserrors_into_one_line_user_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError) as exc, write_errors(f"cannot write --iidfile {tmp_path}"):
        write_atomic(tmp_path, b"x")
    assert str(exc.value) == f"cannot write --iidfile {tmp_path}: is a directory: {tmp_path}"


def test_an_archive_needs_its_directory(tmp_path: Path) -> None:
    dest = tmp_path / "sub" / "img.tar"
    out = OutputSpec("oci", (("dest", str(dest)),))
    with pytest.raises(UserError) as exc, LocalExportTarget().stream(out) as f:
        f.write(b"never")
    assert f"cannot write output type=oci to {dest}" in str(exc.value)
    assert str(tmp_path / "sub") in str(exc.value)
    assert os.listdir(tmp_path) == []


def test_an_archive_that_cannot_replace_its_dest_leaves_no_temp(tmp_path: Path) -> None:
    (tmp_path / "img.tar").mkdir()  # appeared while the build ran
    out = OutputSpec("oci", (("dest", str(tmp_path / "img.tar")),))
    with (
        pytest.raises(UserError, match="cannot write output type=oci"),
        LocalExportTarget().stream(out) as f,
    ):
        f.write(b"whole archive")
    assert os.listdir(tmp_path) == ["img.tar"]


def test_two_writers_of_one_dest_use_distinct_temps(tmp_path: Path) -> None:
    dest = str(tmp_path / "a.tar")
    with open_archive_dest(dest) as one, open_archive_dest(dest) as two:
        one.write(b"one")
        two.write(b"two")
        assert len(os.listdir(tmp_path)) == 2  # two temps, neither the dest
    assert os.listdir(tmp_path) == ["a.tar"]


def test_client_writer_drops_an_unfinished_archive(tmp_path: Path) -> None:
    # a daemon build that fails or is cancelled mid-stream: close() runs
    dest = tmp_path / "img.tar"
    writers = _OutputWriters([OutputSpec("oci", (("dest", str(dest)),))])
    writers.write(OutputData(0, b"first part", eof=False))
    assert len(os.listdir(tmp_path)) == 1  # the temp, beside the dest
    writers.close()
    assert os.listdir(tmp_path) == []


def test_client_writer_reports_a_missing_directory_as_our_error(tmp_path: Path) -> None:
    dest = tmp_path / "sub" / "img.tar"
    writers = _OutputWriters([OutputSpec("oci", (("dest", str(dest)),))])
    with pytest.raises(UserError, match="cannot write output type=oci"):
        writers.write(OutputData(0, b"data", eof=False))
    writers.close()
    assert os.listdir(tmp_path) == []


def test_client_writer_writes_a_whole_archive(tmp_path: Path) -> None:
    dest = tmp_path / "img.tar"
    writers = _OutputWriters([OutputSpec("tar", (("dest", str(dest)),))])
    writers.write(OutputData(0, b"a", eof=False))
    writers.write(OutputData(0, b"b", eof=True))
    writers.close()
    assert dest.read_bytes() == b"ab"
    assert os.listdir(tmp_path) == ["img.tar"]
