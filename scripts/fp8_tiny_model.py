"""The trained tiny DeepSeek copy-task model with an FP8 latent cache vs its own cache, on the CPU.

Until the engine has a kv_cache_dtype option, the FP8 side quantizes each layer's cache right
before the MLA call (kvpager.fp8.quantize of the pool's rows: the bytes a kv_cache_dtype='fp8'
pool would hold) and decodes it with is_fp8_kvcache=True; the baseline is the same weights on the
pool's own dtype. Both run through the engine (examples/deepseek/gpu_check.agreement):
free-running and teacher-forced greedy token agreement, logit differences.

    python scripts/fp8_tiny_model.py [--dtype float32|bfloat16] [--prompts 16] [--steps 16]
"""
from __future__ import annotations

import argparse
import tempfile
import time

import torch

from kvpager import flash_mla_with_kvcache, fp8
from kvpager.examples.deepseek import gpu_check, trained
from kvpager.examples.deepseek.weights import load_model


def fp8_mla(q, k_cache, block_table, cache_seqlens, head_dim_v, tile_scheduler_metadata,
            num_splits, softmax_scale=None, causal=False):
    """kvpager.mla's signature; reads k_cache as the FP8 cache holding the same latents."""
    return flash_mla_with_kvcache(q, fp8.quantize(k_cache), block_table, cache_seqlens,
                                  head_dim_v, tile_scheduler_metadata, num_splits,
                                  softmax_scale=softmax_scale, causal=causal, is_fp8_kvcache=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)  # a tiny model: threads only add contention
    dtype = getattr(torch, args.dtype)
    setting = trained.SMALL
    with tempfile.TemporaryDirectory() as model_dir:
        start = time.perf_counter()
        report = trained.train_and_save(model_dir, setting, "cpu", seed=args.seed)
        print(f"trained in {time.perf_counter() - start:.1f} s: held-out accuracy "
              f"{report.accuracy:.4f}")
        baseline, with_fp8 = load_model(model_dir, "cpu", dtype), load_model(model_dir, "cpu", dtype)
        with_fp8.mla_impl = fp8_mla
        prompts = trained.copy_prompts(args.prompts, setting.task, args.steps, seed=args.seed)
        figures = gpu_check.agreement(baseline, with_fp8, prompts, args.steps)
    print(f"{args.dtype} model, {args.prompts} prompts of {min(map(len, prompts))}-"
          f"{max(map(len, prompts))} tokens, {args.steps} steps: FP8 cache vs {args.dtype} cache")
    for name, value in figures.items():
        print(f"  {name}: {value:.4g}")


if __name__ == "__main__":
    main()
