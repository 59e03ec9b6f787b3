"""Entitlements (pure): what a build may do beyond the default sandbox.

As BuildKit: an entitlement is usable only when the worker's configuration
allows it (buildkitd's ``insecure-entitlements``) *and* the build asks for it
(``--allow``). Either missing refuses the step that needs it.
"""

from __future__ import annotations

from collections.abc import Collection

from ociworker.errors import UserError

NETWORK_HOST = "network.host"
SECURITY_INSECURE = "security.insecure"
KNOWN: tuple[str, ...] = (NETWORK_HOST, SECURITY_INSECURE)


class EntitlementError(UserError):
    """A step needs an entitlement the worker does not allow or the build did not ask for."""

    code = "entitlement"


def require_entitlement(
    name: str, allowed: Collection[str], requested: Collection[str], step: str
) -> None:
    """Refuse ``step`` unless ``name`` is both ``allowed`` (worker) and ``requested`` (build)."""
    if name in allowed and name in requested:
        return
    why = (
        f"the build did not ask for it: pass --allow {name}"
        if name in allowed
        else "the worker's configuration does not allow it"
    )
    raise EntitlementError(f"step {step}: entitlement {name} is not allowed ({why})")
