"""OCI distribution client (pull, push, auth)."""

from ociworker.registry.client import RegistryClient, ResolvedImage

__all__ = ["RegistryClient", "ResolvedImage"]
