"""Worker processes sharing a state dir open its SQLite files at the same moment."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path


def test_processes_opening_fresh_cache_indexes_together_all_succeed(tmp_path: Path) -> None:
    # Each round is a fresh database, so every round races on the switch to WAL.
    script = textwrap.dedent(
        """
        import sys
        from pathlib import Path
        from ociworker.cachedb.records import SQLiteCacheIndex
        for i in range(40):
            SQLiteCacheIndex(Path(sys.argv[1]) / f"round{i}" / "cache.db").close()
        """
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], stderr=subprocess.PIPE)
        for _ in range(4)
    ]
    errors = [p.communicate(timeout=120)[1].decode() for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0, 0], errors
