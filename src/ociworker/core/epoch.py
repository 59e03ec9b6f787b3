"""``SOURCE_DATE_EPOCH``: the one time a reproducible build writes (pure).

The value travels as a build argument, as buildx sends it (the CLI copies the
client's environment variable into ``--build-arg`` unless one is given). When it
is set, the image config's ``created`` and the ``created`` of every history
entry the build adds are that time, and the files of the layers the build makes
are clamped to it (``diff.tarutil.LayerTarWriter``); base image layers are kept
as they came. See https://reproducible-builds.org/specs/source-date-epoch/.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping

from ociworker.errors import ConfigError

SOURCE_DATE_EPOCH = "SOURCE_DATE_EPOCH"

#: 9999-12-31T23:59:59Z: RFC 3339 (and Go's JSON time) has four-digit years
MAX_EPOCH = 253_402_300_799

_DECIMAL = re.compile(r"[0-9]+")


def parse_epoch(value: str, what: str = SOURCE_DATE_EPOCH) -> int | None:
    """Seconds since 1970-01-01 UTC, as ``date +%s`` prints them; an empty value
    means unset (as BuildKit reads it). Anything else is refused rather than
    guessed at: a build meant to be reproducible must not silently stop being so."""
    if value == "":
        return None
    # int() would also take " 1_700_000_000" or "+5"; the spec wants plain digits
    if not _DECIMAL.fullmatch(value):
        raise ConfigError(
            f"invalid {what} {value!r}: want a whole number of seconds since "
            "1970-01-01 00:00:00 UTC (as printed by date +%s)"
        )
    seconds = int(value)
    if seconds > MAX_EPOCH:
        raise ConfigError(f"invalid {what} {value!r}: after the year 9999")
    return seconds


def epoch_from_build_args(build_args: Mapping[str, str]) -> int | None:
    """The build's ``SOURCE_DATE_EPOCH`` (None when not given or empty)."""
    value = build_args.get(SOURCE_DATE_EPOCH)
    return None if value is None else parse_epoch(value)


def rfc3339(seconds: int, nanos: int = 0) -> str:
    """A UTC time as Go marshals ``time.Time`` to JSON (RFC 3339, what BuildKit
    writes in image configs): the fraction's trailing zeros are trimmed, and a
    whole second has none (``2023-11-14T22:13:20Z``)."""
    if not 0 <= nanos < 1_000_000_000:
        raise ValueError(f"nanos out of range: {nanos}")
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
    frac = f"{nanos:09d}".rstrip("0")
    return f"{stamp}.{frac}Z" if frac else f"{stamp}Z"


def rfc3339_ns(ns: int) -> str:
    """``rfc3339`` of a time in nanoseconds (``time.time_ns()``)."""
    seconds, nanos = divmod(ns, 1_000_000_000)
    return rfc3339(seconds, nanos)
