"""Writes that must survive a crash (issue 18 item 1): a content commit goes
write -> fsync -> verify -> rename -> fsync the directory, and a user's output
file (an archive, a ``layers`` blob and descriptor, ``--iidfile``) is on disk
before it is renamed to its name, and that rename is on disk before the call
returns. Without the fsync before the rename, a power loss can leave the final
name pointing at an empty or partial file; without the directory's, the file
may be gone after the crash though the build said it was written.

The order is recorded from the system calls themselves (``os.fsync`` and
``os.replace``, wrapped), naming each fsync'd descriptor by its
``/proc/self/fd`` link and hashing what a rename moves at that moment.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from ociworker.content.store import ContentStore
from ociworker.core.digest import sha256_bytes
from ociworker.core.oci import ANNOTATION_STEP_INDEX, OCI_LAYER_GZIP, Descriptor
from ociworker.core.progress import LayerCommitted
from ociworker.errors import DigestMismatchError
from ociworker.exporter.target import open_archive_dest, write_layer
from ociworker.fs.atomic import write_atomic


def _sha(path: str) -> str | None:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest() if os.path.isfile(path) else None


@pytest.fixture
def journal(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, ...]]:
    """The calls, in order: ``("fsync", path, sha256 of the file or "None" for a
    dir)`` and ``("replace", src, dst, sha256 of src)``."""
    events: list[tuple[str, ...]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        path = os.readlink(f"/proc/self/fd/{fd}")
        events.append(("fsync", path, str(_sha(path))))
        real_fsync(fd)

    def replace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        events.append(("replace", os.fspath(src), os.fspath(dst), str(_sha(os.fspath(src)))))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return events


def _file_committed(events: list[tuple[str, ...]], final: Path, data: bytes) -> int:
    """Check that ``final`` was made the durable way: a temp file holding all of
    ``data`` fsync'd, then renamed to ``final``, then ``final``'s dir fsync'd.
    Returns the index of the dir's fsync."""
    want = hashlib.sha256(data).hexdigest()
    renames = [i for i, e in enumerate(events) if e[0] == "replace" and e[2] == str(final)]
    assert len(renames) == 1, events
    r = renames[0]
    tmp = events[r][1]
    assert tmp != str(final)
    assert events[r][3] == want, "renamed before it held all the data"
    synced = [i for i, e in enumerate(events) if e[:2] == ("fsync", tmp)]
    assert synced and synced[-1] < r, f"{tmp} not fsync'd before its rename: {events}"
    assert events[synced[-1]][2] == want, "fsync'd before all the data was written"
    dir_syncs = [i for i, e in enumerate(events) if e[:2] == ("fsync", str(final.parent))]
    assert dir_syncs and dir_syncs[0] > r, f"{final.parent} not fsync'd after the rename: {events}"
    return dir_syncs[0]


def test_a_content_commit_is_fsynced_verified_renamed_and_its_dir_fsynced(
    tmp_path: Path, journal: list[tuple[str, ...]]
) -> None:
    store = ContentStore(tmp_path / "content")
    data = os.urandom(1 << 20)
    digest = store.put(data, expected=sha256_bytes(data))
    final = tmp_path / "content" / "blobs" / "sha256" / hashlib.sha256(data).hexdigest()
    assert digest == "sha256:" + final.name
    _file_committed(journal, final, data)
    assert os.listdir(tmp_path / "content" / "ingest") == []


def test_a_blob_that_fails_verification_is_never_renamed(
    tmp_path: Path, journal: list[tuple[str, ...]]
) -> None:
    store = ContentStore(tmp_path / "content")
    with pytest.raises(DigestMismatchError):
        store.put(b"what arrived", expected=sha256_bytes(b"what was asked for"))
    assert [e for e in journal if e[0] == "replace"] == []
    assert os.listdir(tmp_path / "content" / "blobs" / "sha256") == []
    assert os.listdir(tmp_path / "content" / "ingest") == []


def test_an_ingest_is_never_visible_under_the_blob_name_until_committed(tmp_path: Path) -> None:
    store = ContentStore(tmp_path / "content")
    data = [os.urandom(1 << 16) for _ in range(4)]
    whole = b"".join(data)
    final = store.blob_path(sha256_bytes(whole))
    with store.ingest(sha256_bytes(whole), len(whole)) as w:
        for chunk in data:
            w.write(chunk)
            assert not final.exists()
        w.commit()
    assert final.read_bytes() == whole


@pytest.mark.parametrize(
    "write",
    [
        pytest.param(lambda p, d: write_atomic(p, d), id="iidfile/metadata-file"),
        pytest.param(lambda p, d: _archive(p, d), id="archive"),
    ],
)
def test_an_output_file_is_fsynced_before_its_rename_and_its_dir_after(
    tmp_path: Path, journal: list[tuple[str, ...]], write: Callable[[Path, bytes], None]
) -> None:
    dest = tmp_path / "out"
    data = os.urandom(3 << 20)
    write(dest, data)
    assert dest.read_bytes() == data
    _file_committed(journal, dest, data)
    assert os.listdir(tmp_path) == ["out"]


def _archive(dest: Path, data: bytes) -> None:
    with open_archive_dest(str(dest)) as f:
        for i in range(0, len(data), 1 << 20):
            f.write(data[i : i + (1 << 20)])
            # a reader never sees a partial archive under its name
            assert not dest.exists()


def test_a_layers_output_makes_its_blob_durable_before_its_descriptor(
    tmp_path: Path, journal: list[tuple[str, ...]]
) -> None:
    blob = os.urandom(2 << 20)
    desc = Descriptor(
        OCI_LAYER_GZIP,
        sha256_bytes(blob),
        len(blob),
        ((ANNOTATION_STEP_INDEX, "1"),),
    )
    path = write_layer(tmp_path, LayerCommitted(desc), io.BytesIO(blob))
    blob_synced = _file_committed(
        journal, tmp_path / "blobs" / "sha256" / hashlib.sha256(blob).hexdigest(), blob
    )
    descriptor_renamed = next(
        i for i, e in enumerate(journal) if e[0] == "replace" and e[2] == str(path)
    )
    assert blob_synced < descriptor_renamed, journal
    _file_committed(journal, path, path.read_bytes())
