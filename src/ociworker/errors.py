"""The one error hierarchy of ociworker.

Every error says whose fault it was: ``UserError`` subclasses are caused by the
caller's input (a Dockerfile, a context, a flag) and are fixed by changing that
input; ``WorldError`` subclasses are caused by the host, the network or a remote
service. The gRPC boundary maps each class to a status code once (see api/).
"""

from __future__ import annotations

import errno


class OciworkerError(Exception):
    """Base of all errors raised on purpose by ociworker."""

    #: stable machine-readable code, carried across the gRPC boundary
    code = "internal"


# --- caller's fault -----------------------------------------------------------


class UserError(OciworkerError):
    """Bad input from the caller; nothing on the host was changed."""

    code = "invalid"


class DockerfileError(UserError):
    """The Dockerfile cannot be parsed or converted.

    ``line`` is 1-based; ``source_line`` is the offending text when known.
    """

    code = "dockerfile"

    def __init__(
        self,
        message: str,
        *,
        filename: str | None = None,
        line: int | None = None,
        source_line: str | None = None,
    ) -> None:
        self.message = message
        self.filename = filename
        self.line = line
        self.source_line = source_line
        super().__init__(self._render())

    def _render(self) -> str:
        where = ""
        if self.filename and self.line:
            where = f"{self.filename}:{self.line}: "
        elif self.line:
            where = f"line {self.line}: "
        text = f"{where}{self.message}"
        if self.source_line:
            text += f"\n    {self.source_line.rstrip()}"
        return text


class UnsafePathError(UserError):
    """A path in a context, a tar or a COPY destination tries to leave its root."""

    code = "unsafe_path"


class NotFoundError(UserError):
    """A named thing (file in the context, stage, image, cache record) does not exist."""

    code = "not_found"


class ConfigError(UserError):
    """A flag or configuration value is invalid."""

    code = "config"


class EntitlementError(UserError):
    """A step needs an entitlement (``network.host``, ``security.insecure``) the
    build did not ask for or the worker does not grant."""

    code = "entitlement"


class UnsupportedError(UserError):
    """The request is valid but this worker cannot do it (e.g. a foreign platform)."""

    code = "unsupported"


class ExecError(UserError):
    """A command run by a step exited non-zero."""

    code = "exec"

    def __init__(self, step: str, command: str, exit_code: int, *, killed_by: str = "") -> None:
        self.step = step
        self.command = command
        self.exit_code = exit_code
        #: the limit that killed the process (``memory limit 256MiB``), if one did
        self.killed_by = killed_by
        # A process can also end by itself once a limit bit (a shell whose
        # forks were refused exits 2): only a SIGKILL is worded as "killed".
        killed = ""
        if killed_by:
            killed = f": {'killed: ' if exit_code == 137 else ''}{killed_by} reached"
        super().__init__(
            f"step {step}: process {command!r} did not complete successfully: "
            f"exit code: {exit_code}{killed}"
        )


# --- the world's fault -------------------------------------------------------


class WorldError(OciworkerError):
    """The host, network or a remote service failed; the input may be fine."""

    code = "unavailable"


class RegistryError(WorldError):
    """A registry answered with an error or could not be reached."""

    code = "registry"


class RegistryAuthError(RegistryError):
    """A registry refused us (401/403) with whatever credentials we had: a wrong
    password, or none where the registry wants one."""


class DigestMismatchError(WorldError):
    """Content did not match the digest that named it."""

    code = "digest_mismatch"


class HostError(WorldError):
    """The host lacks something we need (a runtime binary, overlayfs, a privilege)."""

    code = "host"


class RuntimeFailure(WorldError):
    """The OCI runtime itself failed (as opposed to the command it ran)."""

    code = "runtime"


class DaemonUnavailable(WorldError):
    """The worker daemon could not be reached (no socket, refused, timed out)."""

    code = "daemon_unavailable"


class WorkerRefused(DaemonUnavailable):
    """A worker did not take a build: it refused it (shutting down, no room) or
    could not be reached before the build was handed to it. Nothing of the
    build ran there, so a fleet client may hand it to the next worker."""

    code = "worker_refused"


class CacheVerifyError(WorldError):
    """``--verify-cache`` found a false cache hit: a cached result that runs of its
    step without the cache do not make (a stale or damaged record). The build's
    input is fine; the worker's cache is not."""

    code = "cache_verify"


class BuildCancelled(OciworkerError):
    """The build was cancelled by its caller."""

    code = "cancelled"


class BuildFailed(OciworkerError):
    """A build run for a caller that wants the whole story in one exception (the
    pytest plugin's ``ociworker_build``) failed. The message ends with the
    build's log (its progress as ``--progress=plain`` prints it); ``cause`` is
    the error that ended the build, whose ``code`` (whose fault) it keeps."""

    def __init__(self, message: str, log: str, cause: OciworkerError) -> None:
        super().__init__(f"{message}\n--- build log ---\n{log.rstrip()}\n--- end of build log ---")
        self.log = log
        self.cause = cause
        self.code = cause.code


def os_error_text(exc: OSError) -> str:
    """An OSError in words: ``[Errno 28] No space left on device: '/x'`` is Python's
    spelling; users read ``no space left on device: /x`` (as Go tools print it). Here, not in
    ``fs``, because the pure scheduler words a step's host error with it."""
    if exc.errno == errno.EPIPE:
        return "the reader went away before everything was written (broken pipe)"
    reason = (exc.strerror or errno.errorcode.get(exc.errno or 0, "unknown error")).lower()
    if exc.filename is None:
        return reason
    # A failed rename (temp file -> dest) is about the dest, the name the user gave.
    where = exc.filename if exc.filename2 is None else exc.filename2
    shown = where.decode(errors="surrogateescape") if isinstance(where, bytes) else str(where)
    return f"{reason}: {shown}"
