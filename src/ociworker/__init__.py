"""ociworker: a BuildKit-class container image builder."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ociworker.version import __version__

if TYPE_CHECKING:
    from ociworker.api.client import Client

__all__ = ["Client", "__version__"]


def __getattr__(name: str) -> Any:
    # Loaded on first use: the embedded CLI path never pays for importing grpc.
    if name == "Client":
        from ociworker.api.client import Client

        return Client
    raise AttributeError(f"module 'ociworker' has no attribute {name!r}")
