"""Wiring the model into kvpager.runtime: a page pool sized for the batch, the engine, ragged
random prompts, and a timed run that separates prefill steps from pure decode steps."""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from kvpager import kernels
from kvpager.config import CacheConfig
from kvpager.errors import ConfigError
from kvpager.runtime.engine import Engine
from kvpager.runtime.prefill import group_chunks
from kvpager.runtime.request import SamplingParams
from kvpager.runtime.scheduler import SchedulerConfig, pages_for

from .model import DeepseekV3

PAGE_SIZE = 64
TOKEN_BUDGET = 2048  # new tokens per engine step: the prefill chunk size


def mla_path(device: torch.device, dtype: torch.dtype, kv_cache_dtype: str = "auto",
             decode_rows: int | None = None) -> str:
    """Which MLA implementation kvpager.mla dispatches to for this cache, in words. With
    kv_cache_dtype='fp8', decode_rows (s_q * h_q // h_kv of a decode step) says whether the
    fused FP8 decode covers the decode steps; prefill chunks (more than 32 rows) take its 64-row
    blocks when KVPAGER_FP8_SEESAW is on (the default), else the reference."""
    if not kernels.available():
        return f"CUDA kernel not available ({kernels.unavailable_reason()}); using the PyTorch reference MLA"
    if not kernels.supports_device(device):
        return f"CUDA kernel not available (device {device} is not an sm_90 GPU); using the PyTorch reference MLA"
    if dtype not in kernels.DTYPES:
        return f"CUDA kernel not available (it takes bf16/fp16, the cache is {dtype}); using the PyTorch reference MLA"
    gpu = f"sm_90, {torch.cuda.get_device_name(device)}"
    if kv_cache_dtype != "fp8":
        return f"CUDA kernel kvpager.kernels ({gpu})"
    if not kernels.supports_fp8_kvcache(decode_rows):
        why = kernels.fp8_unavailable_reason() or \
            f"{decode_rows} query rows per kv head with {kernels.FP8_SEESAW_ENV} off; it covers <= " \
            f"{kernels.FP8_MMA_SYNC_MAX_ROWS}"
        return f"FP8 cache: fused FP8 decode not used ({why}); using the PyTorch reference MLA"
    if kernels.fp8_seesaw_on():
        return f"FP8 cache: fused FP8 decode kvpager.kernels ({gpu}) for decode steps and prefill chunks"
    return (f"FP8 cache: fused FP8 decode kvpager.kernels ({gpu}) for decode steps, the PyTorch "
            f"reference for prefill chunks of more than {kernels.FP8_MMA_SYNC_MAX_ROWS} query rows")


def build_engine(model: DeepseekV3, max_batch: int, max_model_len: int, dtype: torch.dtype,
                 spare_pages: int = 1, token_budget: int = TOKEN_BUDGET,
                 kv_cache_dtype: str = "auto", batched_prefill: bool = True,
                 prefix_caching: bool = False) -> Engine:
    """An engine whose pool holds max_batch sequences of max_model_len tokens (+ spare_pages,
    e.g. the CUDA-graph padding page), in `dtype` on the model's device (kv_cache_dtype='fp8':
    656-byte FP8 rows, q and out still in `dtype`). A step takes at most
    token_budget new tokens (at least one per running request), so a long prompt is prefilled
    in chunks of about that size: its activations stay O(token_budget), whatever its length.
    batched_prefill=False runs one model call per prefill chunk (the path before batching).
    prefix_caching: reuse the KV pages of cached prompt prefixes across requests."""
    limit = model.config.max_position_embeddings
    if max_model_len > limit:
        raise ConfigError(f"max_model_len={max_model_len} exceeds the model's "
                          f"max_position_embeddings ({limit}); keep prompt + new tokens within it")
    num_pages = max_batch * pages_for(max_model_len, PAGE_SIZE) + spare_pages
    cache = CacheConfig(num_layers=model.num_layers, num_pages=num_pages, page_size=PAGE_SIZE,
                        dtype=dtype, device=str(model.device), kv_cache_dtype=kv_cache_dtype)
    sched = SchedulerConfig(max_batch_size=max_batch, max_model_len=max_model_len,
                            max_num_batched_tokens=max(token_budget, max_batch),
                            batched_prefill=batched_prefill, enable_prefix_caching=prefix_caching)
    return Engine(model, cache, sched)


def shared_prompt_ttft(model: DeepseekV3, prompt: list[int], dtype: torch.dtype,
                       prefix_caching: bool, kv_cache_dtype: str = "auto"
                       ) -> tuple[float, float, list[int]]:
    """Time to first token (s) of a request, then of a second request with the same prompt run
    after it, in one engine; and the second's first tokens. With caching the second prefills
    only the prompt's last token."""
    engine = build_engine(model, 1, len(prompt) + 2, dtype, kv_cache_dtype=kv_cache_dtype,
                          prefix_caching=prefix_caching)
    sync = torch.cuda.synchronize if engine.device.type == "cuda" else (lambda: None)
    ttft, out = [], []
    for _ in range(2):
        sync()
        start = time.perf_counter()
        handle = engine.submit(prompt, SamplingParams(max_new_tokens=2))
        while handle.num_output_tokens == 0:
            engine.step()
        sync()
        ttft.append(time.perf_counter() - start)
        while not handle.finished:
            engine.step()
        out = handle.output_token_ids
    return ttft[0], ttft[1], out


def random_prompts(n: int, vocab_size: int, min_len: int, max_len: int, seed: int) -> list[list[int]]:
    """n prompts of ragged lengths in [min_len, max_len], token ids in [2, vocab) (0/1 are bos/eos)."""
    gen = torch.Generator().manual_seed(seed)
    lens = torch.randint(min_len, max_len + 1, (n,), generator=gen).tolist()
    return [torch.randint(2, vocab_size, (k,), generator=gen).tolist() for k in lens]


@dataclass
class RunResult:
    outputs: list[list[int]]
    seconds: float              # whole run
    decode_seconds: float       # steps with no prefill chunk
    decode_tokens: int          # tokens generated in those steps
    decode_steps: int
    prefill_seconds: float = 0.0  # steps with prefill chunks (their decode rows included)
    prefill_tokens: int = 0       # prompt tokens prefilled in those steps
    prefill_calls: int = 0        # model.prefill calls in those steps

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_tokens / self.decode_seconds if self.decode_seconds else float("nan")

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prefill_tokens / self.prefill_seconds if self.prefill_seconds else float("nan")


def timed_generate(engine: Engine, prompts: list[list[int]], params: list[SamplingParams]) -> RunResult:
    """Submit every prompt (with its params), step to completion; time pure-decode steps apart
    from steps with prefill chunks (all prompts arrive at once, so those are mostly prefill)."""
    handles = [engine.submit(p, sp) for p, sp in zip(prompts, params, strict=True)]
    sync = torch.cuda.synchronize if engine.device.type == "cuda" else (lambda: None)
    decode_s, decode_tokens, decode_steps = 0.0, 0, 0
    prefill_s, prefill_tokens = 0.0, 0
    groups = engine.config.prefill_padding
    prefill_calls = 0
    sync()
    start = time.perf_counter()
    while not all(h.finished for h in handles):
        t0 = time.perf_counter()
        plan = engine.step()
        sync()
        if not plan.prefill:
            decode_s += time.perf_counter() - t0
            decode_tokens += len(plan.decode)
            decode_steps += 1
        else:
            prefill_s += time.perf_counter() - t0
            prefill_tokens += plan.num_prefill_tokens
            prefill_calls += len(group_chunks([n for _, _, n in plan.prefill], groups))
    return RunResult([h.output_token_ids for h in handles], time.perf_counter() - start,
                     decode_s, decode_tokens, decode_steps, prefill_s, prefill_tokens, prefill_calls)
