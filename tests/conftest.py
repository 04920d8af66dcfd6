"""Shared fixtures: a session-wide embedded Ray cluster, stopped by handle at the end."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def ray_local():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, namespace="asyncrl-tests",
             log_to_driver=False)
    yield ray
    ray.shutdown()
