"""Fixtures shared by the whole suite: one local Ray instance for the test session.

Run: `python -m pytest -q` (everything) or `python -m pytest tests/orchestrator -q`.

Key decisions:
- Ray starts at most once per session (about 5 s on 2 cores), and only when a test asks for
  the `ray_session` fixture; tests that need no Ray never import it.
- It is the orchestrator's own local start (`orchestrator.ray_cluster.start_local_ray`): 127.0.0.1
  only, no dashboard, 2 CPUs, an 80 MB object store (results are small dicts). Code under test
  that connects (`Cluster.connect`) finds it initialized and reuses it without stopping it.
"""

from __future__ import annotations

import pytest

RAY_CPUS = 2
RAY_OBJECT_STORE_BYTES = 80 * 1024 * 1024


def pytest_configure(config):
    """MLflow's HTTP retries, timeout and telemetry as the commands set them before MLflow is
    imported (orchestrator/tracking_env.py): a test of a dead server fails in seconds."""
    from orchestrator.tracking_env import set_mlflow_defaults

    set_mlflow_defaults()


@pytest.fixture(scope="session")
def ray_session():
    """The session's Ray (started on first use, stopped at the end of the session)."""
    import ray

    from orchestrator.ray_cluster import start_local_ray

    started = not ray.is_initialized()
    if started:
        start_local_ray(num_cpus=RAY_CPUS, object_store_bytes=RAY_OBJECT_STORE_BYTES)
    yield ray
    if started:
        ray.shutdown()
