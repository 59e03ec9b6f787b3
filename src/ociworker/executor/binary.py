"""Finding the OCI runtime binary: light enough to run before a worker opens, so
a wrong ``--runtime`` is refused before anything runs, not at the first RUN."""

from __future__ import annotations

import os
import shutil

from ociworker.errors import HostError


def default_runtime() -> str:
    """The runtime used when none is named: crun where it is installed, else runc.
    Both run the same spec with the same isolation; crun (C) starts a container in
    a fraction of runc's (Go) time, which is most of a trivial RUN step's cost."""
    return "crun" if shutil.which("crun") is not None else "runc"


def find_runtime(runtime: str) -> str:
    """The absolute path of ``runtime`` (a name looked up in PATH, or a path)."""
    if "/" in runtime:
        if os.path.isfile(runtime) and os.access(runtime, os.X_OK):
            return os.path.abspath(runtime)
        raise HostError(f"OCI runtime {runtime!r} not found or not executable")
    found = shutil.which(runtime)
    if found is None:
        raise HostError(
            f"OCI runtime {runtime!r} not found in PATH "
            "(--runtime takes runc, crun or the path of an OCI runtime)"
        )
    return found
