from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ociworker.core.digest import sha256_bytes
from ociworker.core.oci import OCI_MANIFEST, Descriptor, Platform
from ociworker.errors import UserError
from ociworker.exporter.imagestore import ImageStore


def _desc(n: int) -> Descriptor:
    return Descriptor(
        media_type=OCI_MANIFEST,
        digest=sha256_bytes(str(n).encode()),
        size=100 + n,
        annotations=(("a", str(n)),),
        platform=Platform("linux", "arm64", "v8"),
    )


def test_put_get_list_delete(tmp_path: Path) -> None:
    store = ImageStore(tmp_path)
    assert store.get("docker.io/library/foo:latest") is None
    store.put("docker.io/library/foo:latest", _desc(1))
    store.put("docker.io/library/bar:1", _desc(2))
    assert store.get("docker.io/library/foo:latest") == _desc(1)
    assert store.list() == [
        ("docker.io/library/bar:1", _desc(2)),
        ("docker.io/library/foo:latest", _desc(1)),
    ]
    assert store.delete("docker.io/library/bar:1") is True
    assert store.delete("docker.io/library/bar:1") is False
    assert store.list() == [("docker.io/library/foo:latest", _desc(1))]


def test_retag_keeps_created_time(tmp_path: Path) -> None:
    store = ImageStore(tmp_path)
    store.put("docker.io/library/foo:latest", _desc(1))
    first = store.record("docker.io/library/foo:latest")
    store.put("docker.io/library/foo:latest", _desc(2))
    second = store.record("docker.io/library/foo:latest")
    assert first is not None and second is not None
    assert second.descriptor == _desc(2)
    assert second.created == first.created
    assert second.updated >= first.updated


def test_survives_reopen(tmp_path: Path) -> None:
    ImageStore(tmp_path).put("docker.io/library/foo:latest", _desc(3))
    assert ImageStore(tmp_path).get("docker.io/library/foo:latest") == _desc(3)


def test_names_are_normalized(tmp_path: Path) -> None:
    store = ImageStore(tmp_path)
    store.put("foo", _desc(1))
    assert store.get("docker.io/library/foo:latest") == _desc(1)
    assert store.get("index.docker.io/library/foo") == _desc(1)
    assert store.list() == [("docker.io/library/foo:latest", _desc(1))]
    assert store.delete("foo:latest") is True


def test_rejects_bad_names(tmp_path: Path) -> None:
    store = ImageStore(tmp_path)
    for bad in ("", " foo", "a\x00b"):
        with pytest.raises(UserError):
            store.put(bad, _desc(1))


def test_two_processes_write_concurrently(tmp_path: Path) -> None:
    script = textwrap.dedent(
        """
        import sys
        from pathlib import Path
        from ociworker.core.digest import sha256_bytes
        from ociworker.core.oci import Descriptor
        from ociworker.exporter.imagestore import ImageStore
        store = ImageStore(Path(sys.argv[1]))
        for i in range(100):
            d = Descriptor("m", sha256_bytes(f"{sys.argv[2]}{i}".encode()), i)
            store.put(f"example.com/{sys.argv[2]}:{i}", d)
            store.put("example.com/shared:latest", d)
        """
    )
    procs = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path), w]) for w in ("a", "b")]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    names = [n for n, _ in ImageStore(tmp_path).list()]
    assert len(names) == 201
    assert "example.com/a:99" in names and "example.com/b:0" in names


def test_tagging_the_same_manifest_again_changes_nothing(tmp_path: Path) -> None:
    # an unchanged rebuild tags the manifest it tagged before: no write (the record,
    # its times included, stays as it was); a new manifest is recorded as before
    store = ImageStore(tmp_path)
    store.put("docker.io/library/foo:latest", _desc(1))
    first = store.record("docker.io/library/foo:latest")
    store.put("foo", _desc(1))
    assert store.record("docker.io/library/foo:latest") == first
    store.put("foo", _desc(2))
    second = store.record("docker.io/library/foo:latest")
    assert first is not None and second is not None
    assert second.descriptor == _desc(2) and second.created == first.created
