"""`kvpager demo` / `python examples/deepseek_decode.py`: a DeepSeek-V3-architecture model decoding a
ragged batch through kvpager end to end — prefill, paged 576-wide latent cache, the MLA kernel
(the PyTorch reference on CPU), continuous batching in kvpager.runtime — and its tokens/s.

With no --model-dir it runs a small random model (3 layers, 16 heads, MoE, YaRN), created
once in ~/.cache/kvpager. --model-dir takes a Hugging Face DeepseekV3 checkpoint directory
(config.json + *.safetensors, bf16/fp32). Nothing is downloaded.
"""
from __future__ import annotations

import argparse
import sys

import torch

from kvpager.cli_args import KV_CACHE_DTYPE_HELP, KV_CACHE_DTYPES, nonneg_float, nonneg_int, positive_int

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def device_arg(text: str) -> torch.device:
    """--device: a torch device this process can use (argparse type)."""
    from kvpager.config import CacheConfig
    from kvpager.errors import ConfigError

    try:  # CacheConfig's device check: the one place that knows what "usable" means
        return torch.device(CacheConfig(num_layers=1, num_pages=1, device=text).device)
    except ConfigError as exc:
        why = str(exc).removeprefix("invalid CacheConfig: ").replace("device=", "")
        raise argparse.ArgumentTypeError(why) from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model-dir", help="DeepseekV3 checkpoint directory (default: the random demo model)")
    parser.add_argument("--batch", type=positive_int, default=8, help="requests decoded together")
    parser.add_argument("--max-new-tokens", "--steps", dest="max_new_tokens", type=positive_int, default=32,
                        help="tokens generated per request")
    parser.add_argument("--prompt-len", type=positive_int, default=48,
                        help="longest prompt; prompts are ragged in [prompt_len / 4, prompt_len]; "
                             "prompt_len + max_new_tokens must fit the model's max_position_embeddings")
    parser.add_argument("--device", type=device_arg, default=None,
                        help="cpu | cuda[:i] (default: cuda when present)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="weights and cache (default: bfloat16 on cuda, float32 on cpu)")
    parser.add_argument("--kv-cache-dtype", choices=KV_CACHE_DTYPES, default="auto", help=KV_CACHE_DTYPE_HELP)
    sampling = parser.add_mutually_exclusive_group()
    sampling.add_argument("--greedy", action="store_true", help="argmax decoding (the default)")
    sampling.add_argument("--temperature", type=nonneg_float, default=0.0,
                          help="sample at this temperature (0: greedy)")
    parser.add_argument("--seed", type=nonneg_int, default=0, help="demo weights, prompts and sampling")
    parser.add_argument("--cuda-graphs", action="store_true", help="replay the decode step from CUDA graphs")
    parser.add_argument("--prefill", choices=("batched", "per-request", "both"), default="batched",
                        help="prefill chunks share model calls, or one call per chunk (the path "
                             "before batched prefill); both: run each, same prompts, and compare")
    parser.add_argument("--prefix-caching", action="store_true",
                        help="reuse cached prompt prefixes; also report the time to first token of "
                             "a request whose prompt was just served, with caching on and off")
    parser.add_argument("--threads", type=positive_int, default=1,
                        help="CPU threads for torch (1: the demo's small matrices gain nothing "
                             "from more, and OpenMP threads stall badly on a busy machine)")


def run(args: argparse.Namespace) -> int:
    """KVPagerError propagates: kvpager.cli.main (or main() below) prints it, exit status 2."""
    from kvpager.errors import ConfigError
    from kvpager.examples.deepseek.config import load_config
    from kvpager.examples.deepseek.cuda_graph import GraphedDecode
    from kvpager.examples.deepseek.runner import (build_engine, mla_path, random_prompts,
                                                  shared_prompt_ttft, timed_generate)
    from kvpager.examples.deepseek.weights import demo_model_dir, load_model
    from kvpager.runtime.request import SamplingParams

    device = args.device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = DTYPES[args.dtype or ("bfloat16" if device.type == "cuda" else "float32")]
    if args.cuda_graphs and device.type != "cuda":
        raise ConfigError(f"--cuda-graphs needs a CUDA device, not {device}; drop it or use --device cuda")
    if args.kv_cache_dtype == "fp8" and dtype == torch.float16:
        raise ConfigError("--kv-cache-dtype fp8 serves bfloat16 queries (its RoPE part is bf16), not "
                          "--dtype float16; use --dtype bfloat16 (or float32 on the CPU)")
    # each request its own seed: the same seed would draw the same uniforms for every request
    params = [SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed + i)
              for i in range(args.batch)]
    torch.set_num_threads(args.threads)
    model_dir = args.model_dir or demo_model_dir(args.seed)
    cfg = load_config(model_dir)  # a small JSON: check the lengths before loading any weight
    if args.prompt_len + args.max_new_tokens > cfg.max_position_embeddings:
        raise ConfigError(
            f"--prompt-len {args.prompt_len} + --max-new-tokens {args.max_new_tokens} exceeds the "
            f"model's max_position_embeddings ({cfg.max_position_embeddings}); keep their sum "
            f"within it")
    model = load_model(model_dir, device, dtype)
    print(f"model: {model_dir} ({cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, "
          f"{cfg.num_attention_heads} heads, {cfg.n_routed_experts} routed experts, vocab {cfg.vocab_size}) "
          f"on {device}, {str(dtype).removeprefix('torch.')}")
    print(f"MLA: {mla_path(device, dtype, args.kv_cache_dtype, cfg.num_attention_heads)}")

    prompts = random_prompts(args.batch, cfg.vocab_size, max(1, args.prompt_len // 4), args.prompt_len, args.seed)
    mode = "greedy" if params[0].greedy else f"temperature {args.temperature}"
    graphs = ", CUDA graphs" if args.cuda_graphs else ""
    print(f"batch {args.batch}, prompts {min(map(len, prompts))}-{max(map(len, prompts))} tokens, "
          f"{args.max_new_tokens} new tokens each, {mode}{graphs}")
    results = {}
    for prefill in (("per-request", "batched") if args.prefill == "both" else (args.prefill,)):
        engine = build_engine(model, args.batch, args.prompt_len + args.max_new_tokens, dtype,
                              kv_cache_dtype=args.kv_cache_dtype, batched_prefill=prefill == "batched",
                              prefix_caching=args.prefix_caching)
        if not results:
            cache = engine.cache_config
            print(f"KV cache: {cache.kv_cache_dtype}, {cache.bytes_per_token // cfg.num_hidden_layers:,} "
                  f"bytes a token per layer, {cache.resolved_num_pages} pages of {cache.page_size} tokens")
        if args.cuda_graphs:
            engine.model = GraphedDecode(model, args.batch)  # same Protocol, graphed decode
        if device.type == "cuda":  # the same run once untimed: CUDA / cuBLAS start-up, graph capture
            timed_generate(engine, prompts, params)
        result = results[prefill] = timed_generate(engine, prompts, params)
        print(f"prefill ({prefill}): {result.prefill_tokens_per_s:,.1f} tokens/s "
              f"({result.prefill_tokens} tokens in {result.prefill_seconds:.2f} s, "
              f"{result.prefill_calls} model calls; steps with prefill, their decode rows included)")
        print(f"decode: {result.decode_tokens_per_s:,.1f} tokens/s ({result.decode_tokens} tokens in "
              f"{result.decode_seconds:.2f} s); whole run incl. prefill {result.seconds:.2f} s")
        del engine  # its pool, before the next one is built
    if len(results) == 2:
        old, new = results["per-request"], results["batched"]
        same = sum(a == b for x, y in zip(old.outputs, new.outputs) for a, b in zip(x, y))
        print(f"batched / per-request prefill tokens/s: "
              f"{new.prefill_tokens_per_s / old.prefill_tokens_per_s:.2f}x; tokens equal in "
              f"{same} of {sum(map(len, old.outputs))} positions")
    for i, out in enumerate(result.outputs[:3]):
        print(f"  request {i}: prompt {len(prompts[i])} tokens -> {out[:12]}{' …' if len(out) > 12 else ''}")
    if args.prefix_caching:
        longest = max(prompts, key=len)
        (_, off, want), (first, on, got) = (
            shared_prompt_ttft(model, longest, dtype, caching, args.kv_cache_dtype)
            for caching in (False, True))
        same = "same tokens" if got == want else f"tokens differ: {got} vs {want}"
        print(f"second request with the same {len(longest)}-token prompt: time to first token "
              f"{off * 1e3:.1f} ms without prefix caching, {on * 1e3:.1f} ms with it "
              f"(the first request: {first * 1e3:.1f} ms; {same})")
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python examples/deepseek_decode.py`: the same command outside `kvpager`."""
    from kvpager.errors import KVPagerError

    parser = argparse.ArgumentParser(prog="deepseek_decode", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except (KVPagerError, OSError) as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
