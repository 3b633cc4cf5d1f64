import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from kvpager import CacheConfig, PagePool, fp8
from kvpager.errors import InvalidArgument


def make(h_kv=1, **kw):
    return PagePool(CacheConfig(num_layers=3, num_pages=5, num_kv_heads=h_kv, head_dim=8,
                                head_dim_v=4, dtype="float32", **kw))


def test_one_allocation_and_layer_views():
    pool = make(h_kv=2)
    assert pool.kv.shape == (3, 6, 64, 2, 8)  # 5 pages + the null page 0
    assert pool.num_pages == 5
    view = pool.layer(1)
    assert view.shape == (6, 64, 2, 8) and view.is_contiguous()
    assert view.data_ptr() == pool.kv[1].data_ptr()  # a view, no copy
    view[2, 3, 1, 0] = 7.0
    assert pool.kv[1, 2, 3, 1, 0] == 7.0
    assert pool.capacity_tokens == 5 * 64
    assert pool.bytes_per_token == 3 * 2 * 8 * 4
    assert pool.bytes_used(2) == 2 * 64 * pool.bytes_per_token


def test_write_scatters_to_slots():
    pool = make()
    slots = torch.tensor([0, 65, 64 * 4 + 63], dtype=torch.int64)  # the pool accepts any slot
    latent = torch.arange(24, dtype=torch.float32).view(3, 8)
    pool.write(2, slots, latent)
    assert torch.equal(pool.kv[2, 0, 0, 0], latent[0])
    assert torch.equal(pool.kv[2, 1, 1, 0], latent[1])
    assert torch.equal(pool.kv[2, 4, 63, 0], latent[2])
    assert pool.kv[0].abs().sum() == 0  # other layers untouched
    pool.write(0, torch.empty(0, dtype=torch.int64), torch.empty(0, 8))


def test_write_with_heads_and_cast():
    pool = make(h_kv=2)
    latent = torch.randn(2, 2, 8, dtype=torch.float64)
    pool.write(0, torch.tensor([3, 4]), latent)
    assert torch.allclose(pool.kv[0, 0, 3:5].double(), latent)


@pytest.mark.parametrize("layer,slots,latent", [
    (3, torch.tensor([0]), torch.zeros(1, 8)),
    (0, torch.tensor([0], dtype=torch.int32), torch.zeros(1, 8)),
    (0, torch.tensor([[0]]), torch.zeros(1, 8)),
    (0, torch.tensor([0, 1]), torch.zeros(1, 8)),
    (0, torch.tensor([0]), torch.zeros(1, 7)),
    (0, torch.tensor([6 * 64]), torch.zeros(1, 8)),
    (0, torch.tensor([-1]), torch.zeros(1, 8)),
])
def test_write_rejects_bad_input_and_changes_nothing(layer, slots, latent):
    pool = make()
    before = pool.kv.clone()
    with pytest.raises(InvalidArgument):
        pool.write(layer, slots, latent + 1)
    assert torch.equal(pool.kv, before)


def test_copy_pages_all_layers_and_overlap():
    pool = make()
    pool.kv.copy_(torch.randn_like(pool.kv))
    before = pool.kv.clone()
    pool.copy_pages([0, 1], [1, 3])
    assert torch.equal(pool.kv[:, 1], before[:, 0])
    assert torch.equal(pool.kv[:, 3], before[:, 1])  # read before the overlapping write
    assert torch.equal(pool.kv[:, 2], before[:, 2])
    pool.copy_pages([], [])


@pytest.mark.parametrize("src,dst", [([0], []), ([0], [6]), ([-1], [0]), ([0, 1], [2, 2])])
def test_copy_pages_rejects_bad_input(src, dst):
    pool = make()
    before = pool.kv.clone()
    with pytest.raises(InvalidArgument):
        pool.copy_pages(src, dst)
    assert torch.equal(pool.kv, before)


# ---- kv_cache_dtype="fp8" -----------------------------------------------------------------------


def make_fp8(h_kv=1, num_pages=3, **kw):
    return PagePool(CacheConfig(num_layers=2, num_pages=num_pages, num_kv_heads=h_kv,
                                kv_cache_dtype="fp8", **kw))


def test_fp8_pool_holds_656_byte_rows():
    pool = make_fp8(h_kv=2)
    assert pool.kv.shape == (2, 4, 64, 2, 656) and pool.kv.dtype == torch.uint8  # + null page
    assert pool.layer(1).shape == (4, 64, 2, 656) and pool.layer(1).is_contiguous()
    assert pool.bytes_per_token == 2 * 2 * 656 and pool.head_dim == 576
    assert (fp8.dequantize(pool.layer(0)) == 0).all()  # a fresh pool reads as zeros


@given(st.data())
def test_fp8_writes_read_back_as_their_quantization(data):
    """Any sequence of writes (overwrites included): each slot dequantizes to the quantization
    of the last row written to it, bytes and values; every other slot stays zero."""
    h_kv = data.draw(st.sampled_from([1, 2]))
    pool = make_fp8(h_kv=h_kv, num_pages=2, dtype=data.draw(st.sampled_from(["bfloat16", "float32"])))
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**32 - 1)))
    want = {}  # (layer, slot) -> [h_kv, 576] row written last
    for _ in range(data.draw(st.integers(1, 4))):
        layer = data.draw(st.integers(0, 1))
        slots = data.draw(st.lists(st.integers(0, pool.capacity_tokens - 1), min_size=0,
                                   max_size=6, unique=True))
        scale = 2.0 ** data.draw(st.integers(-20, 20))
        latent = (torch.randn(len(slots), h_kv, 576, generator=gen) * scale).to(pool.config.torch_dtype)
        pool.write(layer, torch.tensor(slots, dtype=torch.int64), latent)
        want.update({(layer, s): latent[i] for i, s in enumerate(slots)})
    for layer in range(2):
        rows = pool.layer(layer).view(-1, h_kv, 656)
        mine = [s for (lay, s) in want if lay == layer]
        expected = torch.zeros_like(rows)
        if mine:
            expected[mine] = fp8.quantize(torch.stack([want[layer, s] for s in mine]))
        assert torch.equal(rows, expected)
        got = fp8.dequantize(pool.layer(layer)).view(-1, h_kv, 576)
        assert torch.equal(got, fp8.dequantize(expected))


def test_fp8_write_rejects_non_finite_and_changes_nothing():
    pool = make_fp8()
    latent = torch.randn(2, 576, dtype=torch.bfloat16)
    pool.write(0, torch.tensor([0, 1]), latent)
    before = pool.kv.clone()
    latent[1, 400] = math.nan
    with pytest.raises(InvalidArgument, match="latent group 3"):
        pool.write(0, torch.tensor([5, 6]), latent)
    with pytest.raises(InvalidArgument, match=r"\(2, 1, 576\)"):
        pool.write(0, torch.tensor([5, 6]), torch.zeros(2, 656, dtype=torch.uint8))
    assert torch.equal(pool.kv, before)


def test_fp8_copy_pages():
    pool = make_fp8()
    latent = torch.randn(3 * 64, 576)
    pool.write(1, torch.arange(3 * 64), latent)
    before = pool.kv.clone()
    pool.copy_pages([2], [0])
    assert torch.equal(pool.kv[:, 0], before[:, 2]) and torch.equal(pool.kv[:, 1:], before[:, 1:])
    assert torch.equal(fp8.dequantize(pool.layer(1)[0, :, 0]), fp8.dequantize(fp8.quantize(latent[128:])))
