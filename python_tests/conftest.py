"""Test setup: Triton kernels run in the interpreter on CPU-only machines; hypothesis profiles.

TRITON_INTERPRET must be set before triton is imported anywhere.
Hypothesis profiles, chosen by $HYPOTHESIS_PROFILE (default "ci"):
  ci   derandomized (the same examples on every run), modest max_examples, no deadline (shared 2-core machines);
  dev  random examples, more of them, for hunting bugs locally.
Tests that pass their own ``@settings(max_examples=...)`` keep that count; the profile supplies the rest.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile("ci", derandomize=True, max_examples=25, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

requires_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(requires_gpu)


@pytest.fixture
def one_thread():
    """Tiny models: one torch thread avoids OpenMP oversubscription on a shared 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
