"""Executors: run one process in a sandbox on a rootfs (runc | crun)."""

from ociworker.executor.base import Executor, NetworkMode, OutputSink, ProcessSpec
from ociworker.executor.runtime import OCIRuntimeExecutor

__all__ = ["Executor", "NetworkMode", "OCIRuntimeExecutor", "OutputSink", "ProcessSpec"]
