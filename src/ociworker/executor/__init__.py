"""Run one process in a sandbox through an OCI runtime (runc | crun).

``OCIRuntimeExecutor`` loads on first use (PEP 562): the Protocol and values in
``ociworker.executor.base`` are cheap, the driver (pyroute2, subprocess
plumbing) is not, and a fully cached build starts no container.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ociworker.executor.base import Executor, NetworkMode, OutputSink, ProcessSpec

if TYPE_CHECKING:
    from ociworker.executor.runtime import OCIRuntimeExecutor

__all__ = ["Executor", "NetworkMode", "OCIRuntimeExecutor", "OutputSink", "ProcessSpec"]


def __getattr__(name: str) -> Any:
    if name == "OCIRuntimeExecutor":
        return importlib.import_module("ociworker.executor.runtime").OCIRuntimeExecutor
    raise AttributeError(f"module 'ociworker.executor' has no attribute {name!r}")
