"""Fixtures shared by the GPU tests."""
import pytest

from kvpager import kernels


@pytest.fixture
def fused_calls(monkeypatch) -> list:
    """Query shapes of kvpager.mla's calls into the fused FP8 decode."""
    calls, real = [], kernels.flash_mla_with_kvcache

    def spy(*args, **kwargs):
        if kwargs.get("is_fp8_kvcache"):
            calls.append(tuple(args[0].shape))
        return real(*args, **kwargs)

    monkeypatch.setattr(kernels, "flash_mla_with_kvcache", spy)
    return calls
