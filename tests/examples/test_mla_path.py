"""mla_path's words for every dispatch the DeepSeek example can take, on any machine: the kernel
module's availability is faked, so the GPU-only branches (the FP8 ones above all) run on the CPU
too. s20 found the FP8 branch reading a constant the kernel module no longer had."""
from __future__ import annotations

import pytest
import torch

from kvpager import kernels
from kvpager.examples.deepseek.runner import mla_path

GPU = torch.device("cuda", 0)


@pytest.fixture
def hopper(monkeypatch):
    """kvpager.kernels as on an H100 with the extension built."""
    monkeypatch.setattr(kernels, "available", lambda: True)
    monkeypatch.setattr(kernels, "supports_device", lambda device: True)
    monkeypatch.setattr(kernels, "fp8_unavailable_reason", lambda: "")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")


def test_bf16_cache_on_the_kernel(hopper) -> None:
    assert mla_path(GPU, torch.bfloat16) == "CUDA kernel kvpager.kernels (sm_90, NVIDIA H100 80GB HBM3)"


@pytest.mark.parametrize("seesaw, prefill", [("1", "for decode steps and prefill chunks"),
                                             ("0", "the PyTorch reference for prefill chunks of more than 32")])
def test_fp8_cache_says_where_prefill_runs(hopper, monkeypatch, seesaw: str, prefill: str) -> None:
    monkeypatch.setenv(kernels.FP8_SEESAW_ENV, seesaw)
    path = mla_path(GPU, torch.bfloat16, "fp8", 16)
    assert path.startswith("FP8 cache: fused FP8 decode kvpager.kernels (sm_90, NVIDIA H100 80GB HBM3)")
    assert prefill in path


def test_fp8_cache_with_wide_decode_rows_and_the_64_row_blocks_off(hopper, monkeypatch) -> None:
    monkeypatch.setenv(kernels.FP8_SEESAW_ENV, "0")
    path = mla_path(GPU, torch.bfloat16, "fp8", 128)
    assert "fused FP8 decode not used (128 query rows per kv head with KVPAGER_FP8_SEESAW off" in path
    assert path.endswith("using the PyTorch reference MLA")


def test_no_extension_falls_back_to_the_reference(monkeypatch) -> None:
    monkeypatch.setattr(kernels, "available", lambda: False)
    monkeypatch.setattr(kernels, "unavailable_reason", lambda: "not built")
    assert mla_path(GPU, torch.bfloat16, "fp8", 16) == \
        "CUDA kernel not available (not built); using the PyTorch reference MLA"
