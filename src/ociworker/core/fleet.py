"""Which worker of a fleet builds a context: rendezvous (highest-random-weight) hashing.

Every worker gets a score ``sha256(addr NUL key)`` for the build's key; the
workers are tried from the highest score down. The same key ranks the same
list the same way on every client, whatever order the addresses were given
in, so a project keeps landing on the worker that holds its cache. Adding or
removing one of N workers moves only the keys whose top-ranked worker it is
(about 1/N of them): every other key's top worker keeps the highest score.

This is what BuildKit's kubernetes driver does with ``loadbalance=sticky`` (a
consistent-hash ring over its pods, keyed by the context path); a rendezvous
ranking also gives the failover order for free, and needs no virtual nodes to
spread evenly over a handful of workers.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

from ociworker.errors import ConfigError


def score(key: str, node: str) -> int:
    """``node``'s weight for ``key``: the first 8 bytes of sha256 over both.

    The NUL keeps ``("ab", "c")`` and ``("a", "bc")`` apart.
    """
    digest = hashlib.sha256(node.encode() + b"\0" + key.encode()).digest()
    return int.from_bytes(digest[:8], "big")


def rank(key: str, nodes: Iterable[str]) -> list[str]:
    """``nodes`` (duplicates dropped) in the order to try them for ``key``.

    Ties (two 64-bit scores equal) are broken by the address, so the order
    never depends on how the list was given.
    """
    unique = set(nodes)
    if not unique:
        raise ConfigError("a fleet needs at least one worker address")
    return sorted(unique, key=lambda n: (-score(key, n), n))
