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
