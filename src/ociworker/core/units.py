"""Sizes as people write them and as BuildKit prints them (pure)."""

from __future__ import annotations

import re

from ociworker.errors import ConfigError

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kKmMgG]i?[bB]?|[bB])?\s*$")
_UNITS = {"": 1, "b": 1, "k": 1000, "m": 1000**2, "g": 1000**3}


def human_size(n: float, precision: int = 4) -> str:
    """go-units HumanSizeWithPrecision: decimal units, ``precision`` significant
    digits (BuildKit's progress uses 4: ``1.234MB``; ``du`` here uses 3)."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if n < 1000:
            return f"{n:.{precision}g}{unit}"
        n /= 1000
    return f"{n:.{precision}g}PB"


def parse_size(value: int | str) -> int:
    """Bytes from 2097152, "2MiB", "2MB", "512k" (binary with i, decimal without)."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise ConfigError(f"invalid size {value!r}: must not be negative")
        return value
    m = _SIZE.match(str(value))
    if m is None:
        raise ConfigError(f"invalid size {value!r}: want bytes or e.g. 2MiB")
    num, unit = float(m.group(1)), (m.group(2) or "").lower().rstrip("b")
    mult = 1024 ** {"k": 1, "m": 2, "g": 3}[unit[0]] if unit.endswith("i") else _UNITS[unit]
    return int(num * mult)


_GO_DURATION_NS = {
    "ns": 1,
    "us": 10**3,
    "µs": 10**3,
    "μs": 10**3,
    "ms": 10**6,
    "s": 10**9,
    "m": 60 * 10**9,
    "h": 3600 * 10**9,
}
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)([^\d.]+)")


def go_duration_ns(text: str, *, days: bool = False) -> int | None:
    """Nanoseconds of a Go duration (``30s``, ``1m30s``, ``500ms``; Go's
    ``time.ParseDuration`` units), or None when ``text`` is not one. ``days``
    also takes ``d``, which buildx's ``--keep-duration`` and filters accept."""
    body = text.strip()
    if body == "0":
        return 0
    units = {**_GO_DURATION_NS, "d": 86400 * 10**9} if days else _GO_DURATION_NS
    parts = _DURATION_PART.findall(body)
    if not body or "".join(n + u for n, u in parts) != body:
        return None
    if any(u not in units for _, u in parts):
        return None
    return int(sum(float(n) * units[u] for n, u in parts))
