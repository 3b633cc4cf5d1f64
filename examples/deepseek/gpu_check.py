"""GPU checks for the lead's device run (`python -m kvpager.examples.deepseek.gpu_check`):

0. trained(): a tiny DeepseekV3 trained on a copy task (trained.py; confident predictions, so
   token agreement measures arithmetic, not ties), bf16 with the kernel against the same bf16
   weights with the reference MLA and against transformers' own greedy decoding (bf16, fp32).
1. compare(): the bf16 model on the GPU with the bundled MLA kernel against (kernel) the same bf16
   weights with the float32-compute reference MLA, and (dtype) the float32 model on the CPU;
   greedy, same prompts, through the engine every time. Reported: free-running token agreement,
   and teacher-forced agreement — the run under test is fed the reference's tokens, so one early
   flip cannot derail the rest — with the logit differences.
2. throughput(): decode tokens/s for a batch (64) with and without CUDA graphs.
3. fp8_check() (`--fp8`, alone): the trained model with an FP8 latent cache (656-byte rows,
   kv_cache_dtype='fp8': the fused FP8 decode on Hopper) against the same weights with a bf16
   cache, teacher-forced (bar >= FP8_BAR) and free-running greedy agreement, one summary line.
   `--fp8 --small --device cpu` runs a small version on the CPU (reference MLA on both sides).
"""
from __future__ import annotations

import argparse
import tempfile

import torch

from kvpager.reference import mla_decode_reference
from kvpager.runtime.request import SamplingParams

from . import trained as copy_task
from .cuda_graph import GraphedDecode
from .runner import RunResult, build_engine, mla_path, random_prompts, timed_generate
from .config import ModelConfig
from .weights import demo_model_dir, load_model, random_model, save_model


class Recorded:
    """The model Protocol around a model: records every logits row (float32, CPU) per request;
    with `forced`, hands the engine one-hot logits of the forced tokens (teacher forcing)."""

    def __init__(self, model, forced: dict[str, list[int]] | None = None):
        self.model, self.forced = model, forced
        self.num_layers, self.num_heads = model.num_layers, model.num_heads
        self.vocab_size, self.device = model.vocab_size, model.device
        self.config = model.config  # build_engine checks max_position_embeddings
        self.logits: dict[str, list[torch.Tensor]] = {}

    def _take(self, rid: str, row: torch.Tensor) -> torch.Tensor:
        self.logits.setdefault(rid, []).append(row.float().cpu())
        if self.forced is None:
            return row
        return torch.nn.functional.one_hot(
            torch.tensor(self.forced[rid][len(self.logits[rid]) - 1], device=row.device),
            row.shape[-1]).to(row.dtype)

    def prefill(self, batch, pool):
        out = self.model.prefill(batch, pool)
        rids = [batch.request_ids[b] for b in batch.logits_rows.tolist()]
        return torch.stack([self._take(rid, row) for rid, row in zip(rids, out)]) if rids else out

    def decode(self, batch, pool):
        out = self.model.decode(batch, pool)
        return torch.stack([self._take(rid, out[b, 0])[None] for b, rid in enumerate(batch.request_ids)])


def reference_mla(q, k_cache, block_table, cache_seqlens, head_dim_v, tile_scheduler_metadata,
                  num_splits, softmax_scale=None, causal=False, is_fp8_kvcache=False):
    """kvpager.mla's signature, always the float32-compute PyTorch reference (any device)."""
    return mla_decode_reference(q, k_cache, block_table, cache_seqlens, head_dim_v,
                                softmax_scale=softmax_scale, causal=causal,
                                is_fp8_kvcache=is_fp8_kvcache)


def _greedy(model, prompts: list[list[int]], steps: int, forced=None,
            kv_cache_dtype: str = "auto") -> tuple[list[list[int]], Recorded]:
    rec = Recorded(model, forced)
    engine = build_engine(rec, len(prompts), max(map(len, prompts)) + steps, model.lm_head.weight.dtype,
                          kv_cache_dtype=kv_cache_dtype)
    handles = [engine.submit(p, SamplingParams(max_new_tokens=steps), request_id=str(i))
               for i, p in enumerate(prompts)]
    while not all(h.finished for h in handles):
        engine.step()
    return [h.output_token_ids for h in handles], rec


def agreement(ref_model, test_model, prompts: list[list[int]], steps: int,
              kv_cache_dtype: str = "auto") -> dict[str, float]:
    """Greedy runs of both models: free-running token agreement, and — feeding test_model the
    reference's tokens — teacher-forced argmax agreement and logit differences.
    kv_cache_dtype: test_model's cache ('fp8': FP8 rows); the reference's is always 'auto'."""
    ref_tokens, ref = _greedy(ref_model, prompts, steps)
    want = torch.stack([torch.stack(ref.logits[str(i)]) for i in range(len(prompts))])    # [B, steps, V]
    return agreement_with(ref_tokens, want, test_model, prompts, steps, kv_cache_dtype)


def agreement_with(ref_tokens: list[list[int]], want: torch.Tensor, test_model,
                   prompts: list[list[int]], steps: int, kv_cache_dtype: str = "auto") -> dict[str, float]:
    """agreement() against given reference tokens [B][steps] and logits float32 [B, steps, V]."""
    free_tokens, _ = _greedy(test_model, prompts, steps, kv_cache_dtype=kv_cache_dtype)
    _, forced = _greedy(test_model, prompts, steps, forced={str(i): t for i, t in enumerate(ref_tokens)},
                        kv_cache_dtype=kv_cache_dtype)
    got = torch.stack([torch.stack(forced.logits[str(i)]) for i in range(len(prompts))])
    return {
        "free_running_agreement": (torch.tensor(free_tokens) == torch.tensor(ref_tokens)).float().mean().item(),
        "teacher_forced_agreement": (got.argmax(-1) == want.argmax(-1)).float().mean().item(),
        "max_abs_logit_diff": (got - want).abs().max().item(),
        "mean_abs_logit_diff": (got - want).abs().mean().item(),
        "logit_std": want.std().item(),
    }


def trained(batch: int = 16, steps: int = 32, seed: int = 0, device: str = "cuda",
            setting: copy_task.TrainSetting = copy_task.GPU) -> dict[str, dict[str, float]]:
    """Train the copy-task model on `device` (float32), save it in the HF format, and run
    compare_trained() on it (figures printed)."""
    with tempfile.TemporaryDirectory() as model_dir:
        report = copy_task.train_and_save(model_dir, setting, device, seed)
        print(f"trained copy task (period {setting.task.period}, vocab {setting.task.vocab_size}) on "
              f"{device}: {report.steps} steps in {report.seconds:.1f} s, held-out accuracy "
              f"{report.accuracy:.4f}, loss {report.loss:.4f}")
        return compare_trained(model_dir, setting.task, batch, steps, seed, device)


def compare_trained(model_dir: str, task: copy_task.CopyTask, batch: int = 16, steps: int = 32,
                    seed: int = 0, device: str = "cuda") -> dict[str, dict[str, float]]:
    """Greedy runs on `batch` copy prompts (ragged, up to task.seq_len - steps tokens), `steps`
    tokens each, of the checkpoint in model_dir loaded in bf16 with the kernel, against:
    trained_kernel:   the same bf16 weights with the float32-compute reference MLA;
    trained_hf_bf16:  transformers' DeepseekV3ForCausalLM in bf16 (its own attention and cache);
    trained_hf_fp32:  transformers in float32.
    `copy_accuracy`: the kernel run's free-running tokens against the task's true continuation."""
    from kvpager.hub_kernels import import_transformers

    transformers = import_transformers()
    model = load_model(model_dir, device, torch.bfloat16)
    with_reference = load_model(model_dir, device, torch.bfloat16)
    with_reference.mla_impl = reference_mla
    prompts = copy_task.copy_prompts(batch, task, steps, seed)
    print(f"MLA on {device}: {mla_path(torch.device(device), torch.bfloat16)}; copy prompts "
          f"{min(map(len, prompts))}-{max(map(len, prompts))} tokens")
    tokens, _ = _greedy(model, prompts, steps)
    truth = [[p[1 + (len(p) - 1 + k) % task.period] for k in range(steps)] for p in prompts]
    results = {"trained_kernel": agreement(with_reference, model, prompts, steps)}
    results["trained_kernel"]["copy_accuracy"] = (torch.tensor(tokens) == torch.tensor(truth)).float().mean().item()
    for name, dt in (("trained_hf_bf16", torch.bfloat16), ("trained_hf_fp32", torch.float32)):
        hf = transformers.DeepseekV3ForCausalLM.from_pretrained(model_dir, dtype=dt).to(device).eval()
        results[name] = agreement_with(*copy_task.hf_greedy(hf, prompts, steps), model, prompts, steps)
    for name, figures in results.items():
        print(f"{name}: batch {batch}, {steps} steps: " + ", ".join(f"{k} {v:.4g}" for k, v in figures.items()))
    return results


def compare(model_dir: str | None = None, batch: int = 16, steps: int = 32, prompt_len: int = 256,
            seed: int = 0, device: str = "cuda") -> dict[str, dict[str, float]]:
    """Two comparisons, greedy, `batch` ragged prompts, `steps` tokens each (figures printed):
    kernel:  the bf16 model on `device` with the kernel vs the same bf16 weights with the
             float32-compute reference MLA — only the attention differs;
    dtype:   that bf16 kernel run vs the float32 model on the CPU (reference MLA) — on a random
             MoE model, bf16 rounding flips expert choices, so expect this lower than `kernel`."""
    model_dir = model_dir or demo_model_dir(seed)
    model = load_model(model_dir, device, torch.bfloat16)
    print(f"MLA on {device}: {mla_path(torch.device(device), torch.bfloat16)}")
    prompts = random_prompts(batch, model.vocab_size, prompt_len // 4, prompt_len, seed)
    with_reference = load_model(model_dir, device, torch.bfloat16)
    with_reference.mla_impl = reference_mla
    results = {"kernel": agreement(with_reference, model, prompts, steps),
               "dtype": agreement(load_model(model_dir, "cpu", torch.float32), model, prompts, steps)}
    # The same kernel-vs-reference check on a dense model: no expert routing to flip, so what is
    # left is the attention's own rounding.
    # std 0.1 weights (the demo's) make the random network chaotic: a 1e-3 change in one
    # attention output grows layer by layer; std 0.02 (transformers' init) does not.
    for name, std in (("kernel_dense", 0.1), ("kernel_dense_std0.02", 0.02)):
        with tempfile.TemporaryDirectory() as dense_dir:
            save_model(random_model(ModelConfig(n_routed_experts=0), seed, std=std), dense_dir)
            dense = load_model(dense_dir, device, torch.bfloat16)
            dense_ref = load_model(dense_dir, device, torch.bfloat16)
            dense_ref.mla_impl = reference_mla
            results[name] = agreement(dense_ref, dense, prompts, steps)
    for name, figures in results.items():
        print(f"{name}: batch {batch}, {steps} steps: " + ", ".join(f"{k} {v:.4g}" for k, v in figures.items()))
    return results


FP8_BAR = 0.99  # issue 14: teacher-forced greedy agreement of the FP8 cache with the bf16 cache


def compare_fp8(model_dir: str, task: copy_task.CopyTask, batch: int = 16, steps: int = 32,
                seed: int = 0, device: str = "cuda", dtype: torch.dtype = torch.bfloat16
                ) -> dict[str, float]:
    """The checkpoint in model_dir, loaded in `dtype`, greedy on `batch` copy prompts, `steps`
    tokens each, through the engine with an FP8 cache (kv_cache_dtype='fp8') against the same
    weights with a `dtype` cache: agreement()'s figures, plus copy_accuracy (the FP8 run's
    free-running tokens against the task's true continuation)."""
    model = load_model(model_dir, device, dtype)  # one model for both: it keeps no request state
    prompts = copy_task.copy_prompts(batch, task, steps, seed)
    print(f"MLA on {device}: {mla_path(torch.device(device), dtype, 'fp8', model.num_heads)}; copy "
          f"prompts {min(map(len, prompts))}-{max(map(len, prompts))} tokens")
    figures = agreement(model, model, prompts, steps, kv_cache_dtype="fp8")
    tokens, _ = _greedy(model, prompts, steps, kv_cache_dtype="fp8")
    truth = [[p[1 + (len(p) - 1 + k) % task.period] for k in range(steps)] for p in prompts]
    figures["copy_accuracy"] = (torch.tensor(tokens) == torch.tensor(truth)).float().mean().item()
    return figures


def fp8_summary(figures: dict[str, float], device: str, dtype: torch.dtype, batch: int,
                steps: int) -> str:
    """compare_fp8's figures as the one line a device run reports."""
    tf = figures["teacher_forced_agreement"]
    name = str(dtype).removeprefix("torch.")
    return (f"fp8check {'PASS' if tf >= FP8_BAR else 'FAIL'}: teacher-forced {tf:.4f} (bar >= "
            f"{FP8_BAR}), free-running {figures['free_running_agreement']:.4f}, copy accuracy "
            f"{figures['copy_accuracy']:.4f}; FP8 cache vs {name} cache, trained copy model on "
            f"{device}, {batch} prompts x {steps} steps, |dlogit| max "
            f"{figures['max_abs_logit_diff']:.3g} mean {figures['mean_abs_logit_diff']:.3g} (logit "
            f"std {figures['logit_std']:.3g})")


def fp8_check(batch: int = 16, steps: int = 32, seed: int = 0, device: str = "cuda",
              setting: copy_task.TrainSetting = copy_task.GPU,
              dtype: torch.dtype = torch.bfloat16) -> tuple[dict[str, float], str]:
    """Train the copy-task model on `device`, save it, run compare_fp8 on it. Returns the
    figures and fp8_summary's line (printed too)."""
    with tempfile.TemporaryDirectory() as model_dir:
        report = copy_task.train_and_save(model_dir, setting, device, seed)
        print(f"trained copy task (period {setting.task.period}, vocab {setting.task.vocab_size}) on "
              f"{device}: {report.steps} steps in {report.seconds:.1f} s, held-out accuracy "
              f"{report.accuracy:.4f}")
        figures = compare_fp8(model_dir, setting.task, batch, steps, seed, device, dtype)
    line = fp8_summary(figures, device, dtype, batch, steps)
    print(line)
    return figures, line


def throughput(model_dir: str | None = None, batch: int = 64, steps: int = 64, prompt_len: int = 512,
               cuda_graphs: bool = False, seed: int = 0, device: str = "cuda") -> RunResult:
    """Decode tokens/s for `batch` ragged prompts (prompt_len / 2 .. prompt_len) in bf16, after an
    identical warm-up run (which also captures the graphs). Only steps with no prefill chunk count."""
    model = load_model(model_dir or demo_model_dir(seed), device, torch.bfloat16)
    engine = build_engine(model, batch, prompt_len + steps, torch.bfloat16)
    if cuda_graphs:
        engine.model = GraphedDecode(model, batch)
    prompts = random_prompts(batch, model.vocab_size, prompt_len // 2, prompt_len, seed)
    params = [SamplingParams(max_new_tokens=steps)] * batch
    timed_generate(engine, prompts, params)  # warm-up: the same run, so every graph size is captured
    result = timed_generate(engine, prompts, params)
    print(f"batch {batch}, prompts <= {prompt_len}, CUDA graphs {'on' if cuda_graphs else 'off'}: "
          f"{result.decode_tokens_per_s:,.0f} decode tokens/s ({result.decode_tokens} tokens, "
          f"{result.decode_seconds * 1e3 / max(1, result.decode_steps):.2f} ms/step)")
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-dir")
    p.add_argument("--device", default="cuda")
    p.add_argument("--batch", type=int, default=64, help="throughput batch (default 64)")
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=512)
    fp8 = p.add_argument_group("FP8 cache check (issue 14)")
    fp8.add_argument("--fp8", action="store_true", help="run only fp8_check: FP8 cache vs bf16 cache")
    fp8.add_argument("--small", action="store_true", help="trained.py's small (CPU) setting, 16 steps")
    fp8.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16",
                     help="the model's dtype, and the baseline cache's")
    fp8.add_argument("--summary", help="also write the summary line to this file")
    args = p.parse_args(argv)
    if args.fp8:
        setting = copy_task.SMALL if args.small else copy_task.GPU
        figures, line = fp8_check(batch=16, steps=16 if args.small else 32, device=args.device,
                                  setting=setting, dtype=getattr(torch, args.dtype))
        if args.summary:
            with open(args.summary, "w") as f:
                f.write(line + "\n")
        return 0 if figures["teacher_forced_agreement"] >= FP8_BAR else 1
    trained(device=args.device)
    compare(args.model_dir, device=args.device)
    kw = dict(model_dir=args.model_dir, batch=args.batch, steps=args.steps, prompt_len=args.prompt_len,
              device=args.device)
    throughput(**kw, cuda_graphs=False)
    throughput(**kw, cuda_graphs=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
