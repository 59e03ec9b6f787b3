"""OCI distribution client (pull, push, auth)."""

from ociworker.registry.auth import (
    CredentialsProvider,
    DockerConfigCredentials,
    docker_config_credentials,
)
from ociworker.registry.client import RegistryClient, ResolvedImage

__all__ = [
    "CredentialsProvider",
    "DockerConfigCredentials",
    "RegistryClient",
    "ResolvedImage",
    "docker_config_credentials",
]
