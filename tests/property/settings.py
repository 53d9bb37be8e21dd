"""Shared hypothesis settings of the property suite: derandomised (the same examples every
run, in CI too), bounded example counts, no deadline (timing is not a property)."""

from __future__ import annotations

from hypothesis import HealthCheck, settings

#: examples per property; each test may scale it (see the test's own @settings)
EXAMPLES = 25


def bounded(max_examples: int = EXAMPLES):
    """@settings for one property: ``max_examples`` examples, derandomised, no deadline."""
    return settings(max_examples=max_examples, derandomize=True, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.function_scoped_fixture])
