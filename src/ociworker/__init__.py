"""ociworker: a BuildKit-class container image builder."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ociworker.version import __version__

if TYPE_CHECKING:
    from ociworker.api.client import Client
    from ociworker.api.fleet import Fleet

__all__ = ["Client", "Fleet", "__version__"]


def __getattr__(name: str) -> Any:
    # Loaded on first use: the embedded CLI path never pays for importing grpc.
    if name == "Client":
        from ociworker.api.client import Client

        return Client
    if name == "Fleet":
        from ociworker.api.fleet import Fleet

        return Fleet
    raise AttributeError(f"module 'ociworker' has no attribute {name!r}")
