"""Session settings: with pytest-xdist's two workers sharing two cores, each worker computes on one thread."""

from __future__ import annotations

import os

import pytest

#: set by pytest-xdist in each worker process (``gw0``, ``gw1``, ...); absent in a plain ``pytest`` run
WORKER = os.environ.get("PYTEST_XDIST_WORKER")


def pytest_configure(config: pytest.Config) -> None:
    """Child processes a worker starts (torchrun, the CLI) inherit one OpenMP thread."""
    if WORKER:
        os.environ["OMP_NUM_THREADS"] = "1"


@pytest.fixture(autouse=True, scope="session")
def _one_thread_per_worker() -> None:
    """After collection (some test modules set their own thread count on import): one torch thread a worker."""
    if WORKER:
        import torch

        torch.set_num_threads(1)
