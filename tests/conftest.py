"""Shared fixtures. Ray starts once per test session (each start costs seconds on 2 cores)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def ray_local():
    """A real local Ray cluster for the whole session, shut down at the end.

    Tests that use it bound their own wait time (pytest-timeout, see pyproject), so a starved pool
    fails the test instead of hanging CI."""
    import ray

    from raywsl.runtime import ray_session

    with ray_session(num_cpus=4):
        yield ray
