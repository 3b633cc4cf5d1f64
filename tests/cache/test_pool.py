import pytest
import torch

from kvpager import CacheConfig, PagePool
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
