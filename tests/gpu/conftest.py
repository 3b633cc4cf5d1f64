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


@pytest.fixture(params=["ws", "split"])
def fp8_decode(request, monkeypatch) -> str:
    """Runs a test on both fused FP8 decodes of 16-row blocks: the warp-specialized wgmma kernel
    ("ws", the default) and the split-K mma.sync kernel ("split"); 32-row blocks always take the
    latter. KVPAGER_FP8_DECODE is read by the extension on every call."""
    monkeypatch.setenv("KVPAGER_FP8_DECODE", request.param)
    return request.param
