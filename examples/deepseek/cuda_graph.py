"""CUDA-graph replay of the decode step: the whole model forward (every layer's projections,
cache write, MLA kernel, MoE, lm_head) as one graph launch instead of hundreds of kernel launches.

A graph is captured per padded batch size (powers of two up to max_batch, on first use) over
static input buffers. Each decode copies the batch into rows [:B] of those buffers; rows B..
are padding: cache_seqlens 0 and block_table rows of zeros (the kernel reads no page for them),
their latent written to the null page 0 (allocator.NULL_PAGE, never handed out, never read as a
request's KV), their logits dropped. The engine's MLA metadata describes B rows, the graph
runs B_pad, so the metadata is recomputed for the padded lengths (one small kernel) and copied in.
Prefill is not graphed: it runs eagerly through the wrapped model.
An FP8 pool (kv_cache_dtype='fp8') needs nothing more: the captured forward quantizes its latents
on the GPU without a host sync (PagePool.write) and calls the fused FP8 decode, which uses the
bf16 split-KV schedule (so the metadata is the same), and padding rows quantize into the null
page like any other.
"""
from __future__ import annotations

import torch

from kvpager.allocator import NULL_PAGE
from kvpager.errors import ConfigError
from kvpager.mla import get_mla_metadata
from kvpager.pool import PagePool
from kvpager.runtime.models.protocol import DecodeBatch, PrefillBatch

from .model import DeepseekV3


class GraphedDecode:
    """The model Protocol around a DeepseekV3 on CUDA, with decode replayed from CUDA graphs.
    Padding rows point at the null page, so the graphs take no page from the allocator."""

    def __init__(self, model: DeepseekV3, max_batch: int):
        if model.device.type != "cuda":
            raise ConfigError(f"--cuda-graphs needs a CUDA device; the model is on {model.device}")
        self.model, self.max_batch = model, max_batch
        self.num_layers, self.num_heads, self.vocab_size = model.num_layers, model.num_heads, model.vocab_size
        self.device = model.device
        self.sizes = [1 << i for i in range(max_batch.bit_length()) if 1 << i < max_batch] + [max_batch]
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, DecodeBatch, torch.Tensor]] = {}
        self.static: DecodeBatch | None = None  # max_batch rows; each graph uses views of rows [:bs]

    def prefill(self, batch: PrefillBatch, pool: PagePool) -> torch.Tensor:
        return self.model.prefill(batch, pool)

    def decode(self, batch: DecodeBatch, pool: PagePool) -> torch.Tensor:
        """Copy the batch into the static buffers of the smallest captured size >= B, replay.
        Cost: ~7 small copies / fills + one metadata kernel + one graph launch."""
        b = batch.batch_size
        bs = next(s for s in self.sizes if s >= b)
        if self.static is None:
            self.static = self._allocate_static(batch)
        st = self.static
        st.input_ids[:b].copy_(batch.input_ids)
        st.positions[:b].copy_(batch.positions)
        st.slot_mapping[:b * batch.s_q].copy_(batch.slot_mapping)
        st.block_table[:b].copy_(batch.block_table)
        st.cache_seqlens[:b].copy_(batch.cache_seqlens)
        # padding rows: nothing to attend to, writes land in the null page
        st.input_ids[b:bs].zero_()
        st.positions[b:bs].zero_()
        st.slot_mapping[b * batch.s_q:bs * batch.s_q].fill_(NULL_PAGE * pool.page_size)
        st.cache_seqlens[b:bs].zero_()
        st.block_table[b:bs].zero_()  # not stale rows of an earlier batch: the null page
        metadata = get_mla_metadata(st.cache_seqlens[:bs], batch.s_q * self.num_heads, 1)
        if bs not in self.graphs:
            self.graphs[bs] = self._capture(bs, batch.s_q, pool, metadata)
        graph, sbatch, logits = self.graphs[bs]
        for static, fresh in zip(sbatch.mla_metadata, metadata):
            static.copy_(fresh)
        graph.replay()
        return logits[:b]

    def _allocate_static(self, batch: DecodeBatch) -> DecodeBatch:
        """Input buffers for max_batch rows (the metadata buffers are per graph)."""
        n, s_q, dev = self.max_batch, batch.s_q, self.device
        return DecodeBatch(
            request_ids=[], input_ids=torch.zeros(n, s_q, dtype=torch.int64, device=dev),
            positions=torch.zeros(n, s_q, dtype=torch.int64, device=dev),
            slot_mapping=torch.zeros(n * s_q, dtype=torch.int64, device=dev),
            block_table=torch.zeros(n, batch.block_table.shape[1], dtype=torch.int32, device=dev),
            cache_seqlens=torch.zeros(n, dtype=torch.int32, device=dev), mla_metadata=(None, None))

    def _capture(self, bs: int, s_q: int, pool: PagePool, metadata: tuple[torch.Tensor, torch.Tensor]):
        """Warm up on a side stream, then capture model.decode over rows [:bs] of the static
        buffers (which already hold this step's batch, so the warm-up writes what replay will)."""
        st = self.static
        sbatch = DecodeBatch(
            request_ids=[], input_ids=st.input_ids[:bs], positions=st.positions[:bs],
            slot_mapping=st.slot_mapping[:bs * s_q], block_table=st.block_table[:bs],
            cache_seqlens=st.cache_seqlens[:bs], mla_metadata=(metadata[0].clone(), metadata[1].clone()))
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):  # warm up (lazy inits, cuBLAS workspaces) off the graph
            for _ in range(2):
                self.model.decode(sbatch, pool)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            logits = self.model.decode(sbatch, pool)
        return graph, sbatch, logits
