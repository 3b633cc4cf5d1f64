import pytest
import torch

from kvpager import CacheConfig
from kvpager.errors import ConfigError, KVPagerError


def test_defaults_and_derived_sizes():
    c = CacheConfig(num_layers=2, num_pages=10)
    assert (c.page_size, c.num_kv_heads, c.head_dim, c.head_dim_v) == (64, 1, 576, 512)
    assert c.torch_dtype == torch.bfloat16
    assert c.bytes_per_token == 2 * 576 * 2
    assert c.bytes_per_page == 64 * c.bytes_per_token
    assert c.resolved_num_pages == 10


def test_memory_budget_gives_whole_pages():
    per_page = CacheConfig(num_layers=3, num_pages=1).bytes_per_page
    c = CacheConfig(num_layers=3, memory_budget_bytes=per_page * 7 + per_page // 2)
    assert c.resolved_num_pages == 6 and c.pool_pages == 7  # the null page is paid from the budget


@pytest.mark.parametrize("value,name", [(torch.float16, "float16"), ("bf16", "bfloat16"),
                                        (torch.float32, "float32"), ("fp32", "float32")])
def test_dtype_aliases(value, name):
    assert CacheConfig(num_layers=1, num_pages=1, dtype=value).dtype == name


def test_frozen():
    c = CacheConfig(num_layers=1, num_pages=1)
    with pytest.raises(Exception):
        c.num_pages = 3


@pytest.mark.parametrize("kwargs,needle", [
    (dict(page_size=32), "allow_any_page_size"),
    (dict(page_size=0, allow_any_page_size=True), "page_size=0"),
    (dict(dtype="int8"), "bfloat16"),
    (dict(dtype=torch.int32), "float16"),
    (dict(head_dim_v=600), "head_dim_v <= head_dim"),
    (dict(num_kv_heads=0), "num_kv_heads"),
    (dict(num_layers=0), "num_layers"),
    (dict(device="gpu7"), "torch device"),
    (dict(num_pages=None), "exactly one"),
    (dict(memory_budget_bytes=10**9), "exactly one"),
    (dict(num_pages=0), "num_pages=0"),
    (dict(num_pagez=3), "not a CacheConfig field"),
])
def test_bad_values_say_what_to_change(kwargs, needle):
    base = dict(num_layers=2, num_pages=4)
    base.update(kwargs)
    with pytest.raises(ConfigError, match=needle) as info:
        CacheConfig(**base)
    assert isinstance(info.value, KVPagerError) and isinstance(info.value, ValueError)


def test_missing_num_layers_and_tiny_budget():
    with pytest.raises(ConfigError, match="num_layers is required"):
        CacheConfig(num_pages=1)
    with pytest.raises(ConfigError, match="raise it to at least"):
        CacheConfig(num_layers=1, memory_budget_bytes=100)
    per_page = CacheConfig(num_layers=1, num_pages=1).bytes_per_page
    with pytest.raises(ConfigError, match="besides the reserved null page"):  # one page: null only
        CacheConfig(num_layers=1, memory_budget_bytes=2 * per_page - 1)
    assert CacheConfig(num_layers=1, memory_budget_bytes=2 * per_page).resolved_num_pages == 1


def test_other_page_size_on_reference_path():
    c = CacheConfig(num_layers=1, num_pages=2, page_size=16, allow_any_page_size=True)
    assert c.bytes_per_page == 16 * c.bytes_per_token


# ---- kv_cache_dtype="fp8": 656-byte rows ------------------------------------------------------


def test_fp8_rows_are_656_bytes():
    c = CacheConfig(num_layers=3, num_pages=2, num_kv_heads=2, kv_cache_dtype="fp8")
    assert c.kv_cache_dtype == "fp8" and c.torch_dtype == torch.bfloat16
    assert (c.cache_dtype, c.row_width) == (torch.uint8, 656)
    assert c.bytes_per_token == 3 * 2 * 656
    assert c.bytes_per_page == 64 * 3 * 2 * 656
    bf16 = CacheConfig(num_layers=3, num_pages=2, num_kv_heads=2)
    assert (bf16.kv_cache_dtype, bf16.cache_dtype, bf16.row_width) == ("auto", torch.bfloat16, 576)
    assert c.bytes_per_token / bf16.bytes_per_token == 656 / 1152


def test_fp8_budget_holds_more_pages():
    budget = 10**9
    fp8 = CacheConfig(num_layers=61, memory_budget_bytes=budget, kv_cache_dtype="fp8")
    bf16 = CacheConfig(num_layers=61, memory_budget_bytes=budget)
    # the budget also pays for the reserved null page
    assert fp8.resolved_num_pages == budget // (64 * 61 * 656) - 1
    assert bf16.resolved_num_pages == budget // (64 * 61 * 1152) - 1
    with pytest.raises(ConfigError, match=f"at least {2 * 64 * 656}"):
        CacheConfig(num_layers=1, memory_budget_bytes=2 * 64 * 656 - 1, kv_cache_dtype="fp8")


@pytest.mark.parametrize("value", ["fp8", "FP8", "fp8_e4m3", "float8_e4m3fn", torch.float8_e4m3fn])
def test_fp8_spellings(value):
    assert CacheConfig(num_layers=1, num_pages=1, kv_cache_dtype=value).kv_cache_dtype == "fp8"


@pytest.mark.parametrize("kwargs,needle", [
    (dict(kv_cache_dtype="int4"), "kv_cache_dtype='int4' is not supported"),
    (dict(kv_cache_dtype="fp8", dtype="float16"), "dtype='bfloat16'"),
    (dict(kv_cache_dtype="fp8", head_dim=72, head_dim_v=64), "head_dim=576"),
    (dict(kv_cache_dtype="fp8", head_dim_v=256), "head_dim_v=512"),
])
def test_fp8_bad_values(kwargs, needle):
    with pytest.raises(ConfigError, match=needle):
        CacheConfig(num_layers=1, num_pages=1, **kwargs)


def test_fp8_with_float32_model_on_the_reference():
    c = CacheConfig(num_layers=1, num_pages=1, dtype="float32", kv_cache_dtype="fp8")
    assert (c.torch_dtype, c.cache_dtype) == (torch.float32, torch.uint8)
