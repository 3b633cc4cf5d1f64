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


FP8_DECODES = {  # name -> (KVPAGER_FP8_DECODE, KVPAGER_FP8_PAGES_AHEAD)
    "ws": ("ws", "3"),
    "ws2": ("ws", "2"),
    "split": ("split", "3"),
}


@pytest.fixture(params=sorted(FP8_DECODES))
def fp8_decode(request, monkeypatch) -> str:
    """Runs a test on every fused FP8 decode of 16-row blocks: the warp-specialized wgmma kernel
    with 3 pages of loads in flight ("ws", the default) or 2 ("ws2"), and the split-K mma.sync kernel
    ("split"); 32-row blocks always take the latter. The extension reads both variables on every
    call."""
    decode, ahead = FP8_DECODES[request.param]
    monkeypatch.setenv("KVPAGER_FP8_DECODE", decode)
    monkeypatch.setenv("KVPAGER_FP8_PAGES_AHEAD", ahead)
    return request.param
