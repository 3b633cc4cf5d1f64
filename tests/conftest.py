import os

import pytest
from hypothesis import HealthCheck, settings

from kvpager.hub_kernels import prefer_installed_kernels

# Before any test imports transformers: `python -m pytest` puts this checkout's root on sys.path,
# where `kernels` is our CUDA source directory, not the Hub package transformers imports.
prefer_installed_kernels()

# CI profile: enough steps to matter, fast enough for a 2-core machine. `long`: the soak run.
settings.register_profile("ci", max_examples=100, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("long", max_examples=1000, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models' ops are microseconds long; on a 2-core machine intra-op threads only add
    contention (15x slower under load), so such test modules run on one thread
    (`pytestmark = pytest.mark.usefixtures("one_torch_thread")`)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _has_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if _has_cuda():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run tests/gpu on the device machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
