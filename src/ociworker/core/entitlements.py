"""Entitlements: what a step may do beyond the sandbox (pure).

As BuildKit's: a step that needs one runs only when both keys turn, the
worker's configuration grants it (``WorkerConfig.entitlements``, the daemon's
``entitlements = [...]``) and the build asks for it (``--allow NAME``,
``BuildRequest.allow``). Checked before the step's cache is looked up, so a
cached result never lets a build skip the check.
"""

from __future__ import annotations

from collections.abc import Sequence

from ociworker.errors import ConfigError, EntitlementError

NETWORK_HOST = "network.host"
SECURITY_INSECURE = "security.insecure"

#: every entitlement there is (buildx's names)
ENTITLEMENTS: tuple[str, ...] = (NETWORK_HOST, SECURITY_INSECURE)


def parse_entitlements(names: Sequence[str], origin: str) -> tuple[str, ...]:
    """``names`` checked against ``ENTITLEMENTS`` (order kept, duplicates dropped);
    ``origin`` says where they came from (``--allow``, a config file) in the error."""
    out: list[str] = []
    for name in names:
        if name not in ENTITLEMENTS:
            raise ConfigError(
                f"unknown entitlement {name} ({origin}): use one of {', '.join(ENTITLEMENTS)}"
            )
        if name not in out:
            out.append(name)
    return tuple(out)


def require_entitlement(
    name: str, allowed: Sequence[str], requested: Sequence[str], step: str
) -> None:
    """Refuse ``step`` unless the worker allows ``name`` and the build requested it."""
    if name in allowed and name in requested:
        return
    if name not in requested:
        how = f"pass --allow {name} to the build"
        if name not in allowed:
            how += f', and the worker must grant it (entitlements = ["{name}"] in its config)'
    else:
        how = f'the worker does not grant it: add "{name}" to entitlements = [...] in its config'
    raise EntitlementError(f"step {step}: entitlement {name} is not allowed ({how})")
