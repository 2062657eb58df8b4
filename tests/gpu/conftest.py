"""Tests marked ``gpu`` run only where torch sees a CUDA device; elsewhere (CI, the CPU machines)
they are skipped with the reason, never failed. ``bench/gpu_check.sh`` runs them on a GPU."""

from __future__ import annotations

import pytest

NO_CUDA = (
    "needs a CUDA device: torch.cuda.is_available() is False (a CPU-only torch or no GPU; "
    "bench/gpu_check.sh runs these on a GPU machine)"
)


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Before any fixture is built: a skipped test loads no model and starts no service."""
    if item.get_closest_marker("gpu") is None:
        return
    import torch

    if not torch.cuda.is_available():
        pytest.skip(NO_CUDA)
