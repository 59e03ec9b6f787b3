"""Shared test configuration: the hypothesis profiles of the fuzz suite.

``ci`` (the default) keeps ``scripts/test`` short and reproducible: a modest
example count and ``derandomize=True``, so every run tries the same inputs
(a CI failure reproduces locally with no seed to copy; the price is that CI
never explores new inputs, which is what ``long`` is for). ``long`` draws fresh
random inputs each run and many more of them. Select it with
``OCIWORKER_FUZZ_PROFILE=long`` (or hypothesis's own ``HYPOTHESIS_PROFILE``);
``OCIWORKER_FUZZ_EXAMPLES`` overrides its example count. The fuzz modules are
marked ``stress``, so the long run is::

    OCIWORKER_FUZZ_PROFILE=long pytest -m stress tests/test_fuzz_*.py \\
        --hypothesis-show-statistics

No example database is written (``database=None``): a shared checkout must not
grow a ``.hypothesis`` directory, and a found failure is kept as an
``@example`` in the test instead.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

_BASE = settings(
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)

settings.register_profile("ci", _BASE, max_examples=100, derandomize=True)
settings.register_profile(
    "long", _BASE, max_examples=int(os.environ.get("OCIWORKER_FUZZ_EXAMPLES", "2000"))
)
settings.load_profile(
    os.environ.get("OCIWORKER_FUZZ_PROFILE") or os.environ.get("HYPOTHESIS_PROFILE") or "ci"
)
