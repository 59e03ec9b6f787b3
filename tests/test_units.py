"""Go durations: the values Go's own time.ParseDuration documents and tests."""

from __future__ import annotations

import pytest

from ociworker.core.build import parse_duration
from ociworker.core.units import go_duration_ns


@pytest.mark.parametrize(
    ("text", "ns"),
    [
        # from Go's time package tests (parseDurationTests)
        ("0", 0),
        ("5s", 5 * 10**9),
        ("30s", 30 * 10**9),
        ("1478s", 1478 * 10**9),
        ("1.5h", 5400 * 10**9),
        ("100ms", 100 * 10**6),
        ("10ns", 10),
        ("11us", 11_000),
        ("12µs", 12_000),
        ("3h30m", 12600 * 10**9),
        ("1h15m30.918273645s", 4530918273645),
        (".5s", 5 * 10**8),
        ("2.s", 2 * 10**9),
    ],
)
def test_go_duration_matches_go(text: str, ns: int) -> None:
    assert go_duration_ns(text) == ns


@pytest.mark.parametrize("text", ["", "3", "1d", "s", "1.2.3s", "5x", "-", "1h 30m", "."])
def test_not_a_go_duration(text: str) -> None:
    assert go_duration_ns(text) is None


def test_buildx_durations_take_days_and_bare_seconds() -> None:
    assert parse_duration("2d") == 2 * 86400
    assert parse_duration("1d12h") == 36 * 3600
    assert parse_duration("90") == 90
    assert go_duration_ns("1d", days=True) == 86400 * 10**9
