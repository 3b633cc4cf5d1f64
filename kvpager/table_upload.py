"""TableUpload: brings a GPU copy of block_table / cache_seqlens up to date from their host
mirrors with two async torch calls a step, however many rows changed."""
from __future__ import annotations

import numpy as np
import torch


class TableUpload:
    """Owns the device cache_seqlens (the head of one device buffer laid out as
    [cache_seqlens (max_batch) | changed row ids (int64) | changed rows]) and two pinned host
    twins of that buffer. upload() packs cache_seqlens, the changed row ids and rows into a twin,
    copies it in one H2D transfer, then scatters the rows into block_table with one index_copy_:
    both enqueued on the current stream. The twins alternate and each is rewritten only after
    the event of its last copy has completed, so the host never races a transfer in flight.

    Each torch call (slicing included) costs microseconds on the host (docs/foundation.md), so
    every slice for k changed rows is made once and cached: a step costs a few numpy ops plus
    copy_, record, index_copy_.
    """

    def __init__(self, max_batch: int, max_pages: int, device: torch.device,
                 cache_seqlens: torch.Tensor) -> None:
        self.max_batch, self.max_pages = max_batch, max_pages
        self._ids_at = max_batch + max_batch % 2  # int64 ids start 8-byte aligned
        size = self._ids_at + 2 * max_batch + max_batch * max_pages
        self._device = torch.zeros(size, dtype=torch.int32, device=device)
        self._device[:max_batch].copy_(cache_seqlens)
        self.cache_seqlens = self._device[:max_batch]
        pinned = [torch.zeros(size, dtype=torch.int32, pin_memory=True) for _ in range(2)]
        self._stages = [(host, host.numpy(), torch.cuda.Event(), {}) for host in pinned]
        self._next = 0

    def upload(self, batch: int, lens: np.ndarray, table: np.ndarray, dirty: np.ndarray,
               block_table: torch.Tensor) -> None:
        """Copy lens (all max_batch) and the rows r < batch with dirty[r] set; clears dirty."""
        rows = np.flatnonzero(dirty[:batch])
        dirty[:] = 0
        k, mp, base = len(rows), self.max_pages, self._ids_at
        stage = self._stages[self._next]
        self._next ^= 1
        packed, copied, slices = stage[1], stage[2], stage[3]
        copied.synchronize()  # recorded two uploads ago: done unless the GPU lags that far
        packed[:self.max_batch] = lens
        packed[base:base + 2 * k].view(np.int64)[:] = rows
        packed[base + 2 * k:base + 2 * k + k * mp].reshape(k, mp)[:] = table[rows]
        host, dev, ids, new_rows = slices.get(k) or self._slices(stage, k)
        dev.copy_(host, non_blocking=True)
        copied.record()
        if k:
            block_table.index_copy_(0, ids, new_rows)

    def _slices(self, stage: tuple, k: int) -> tuple:
        """(host, device, ids int64 [k], rows [k, max_pages]) slices of one stage for k rows."""
        base, end = self._ids_at, self._ids_at + 2 * k + k * self.max_pages
        dev = self._device
        slices = (stage[0][:end], dev[:end], dev[base:base + 2 * k].view(torch.int64),
                  dev[base + 2 * k:end].view(k, self.max_pages))
        stage[3][k] = slices
        return slices
