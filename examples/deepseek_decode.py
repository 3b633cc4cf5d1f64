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

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model-dir", help="DeepseekV3 checkpoint directory (default: the random demo model)")
    parser.add_argument("--batch", type=int, default=8, help="requests decoded together (default 8)")
    parser.add_argument("--max-new-tokens", "--steps", dest="max_new_tokens", type=int, default=32,
                        help="tokens generated per request (default 32)")
    parser.add_argument("--prompt-len", type=int, default=48,
                        help="longest prompt; prompts are ragged in [prompt_len / 4, prompt_len] (default 48)")
    parser.add_argument("--device", default=None, help="cpu | cuda[:i] (default: cuda when present)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="weights and cache (default: bfloat16 on cuda, float32 on cpu)")
    sampling = parser.add_mutually_exclusive_group()
    sampling.add_argument("--greedy", action="store_true", help="argmax decoding (the default)")
    sampling.add_argument("--temperature", type=float, default=0.0, help="sample at this temperature")
    parser.add_argument("--seed", type=int, default=0, help="demo weights, prompts and sampling (default 0)")
    parser.add_argument("--cuda-graphs", action="store_true", help="replay the decode step from CUDA graphs")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads for torch (default 1: the demo's small matrices gain nothing "
                             "from more, and OpenMP threads stall badly on a busy machine)")


def run(args: argparse.Namespace) -> int:
    from kvpager.errors import KVPagerError

    try:
        return _run(args)
    except KVPagerError as exc:
        print(f"kvpager demo: error: {exc}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    from kvpager.errors import ConfigError
    from kvpager.examples.deepseek.cuda_graph import GraphedDecode
    from kvpager.examples.deepseek.runner import build_engine, mla_path, random_prompts, timed_generate
    from kvpager.examples.deepseek.weights import demo_model_dir, load_model
    from kvpager.runtime.request import SamplingParams

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = DTYPES[args.dtype or ("bfloat16" if device.type == "cuda" else "float32")]
    if min(args.batch, args.max_new_tokens, args.prompt_len, args.threads) < 1:
        raise ConfigError("--batch, --max-new-tokens, --prompt-len and --threads must be >= 1")
    torch.set_num_threads(args.threads)
    model_dir = args.model_dir or demo_model_dir(args.seed)
    model = load_model(model_dir, device, dtype)
    cfg = model.config
    print(f"model: {model_dir} ({cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, "
          f"{cfg.num_attention_heads} heads, {cfg.n_routed_experts} routed experts, vocab {cfg.vocab_size}) "
          f"on {device}, {str(dtype).removeprefix('torch.')}")
    print(f"MLA: {mla_path(device, dtype)}")

    engine = build_engine(model, args.batch, args.prompt_len + args.max_new_tokens, dtype)
    if args.cuda_graphs:
        engine.model = GraphedDecode(model, args.batch)  # same Protocol, graphed decode
    prompts = random_prompts(args.batch, cfg.vocab_size, max(1, args.prompt_len // 4), args.prompt_len, args.seed)
    # each request its own seed: the same seed would draw the same uniforms for every request
    params = [SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed + i)
              for i in range(args.batch)]
    if device.type == "cuda":  # the same run once untimed: CUDA / cuBLAS start-up, graph capture
        timed_generate(engine, prompts, params)
    result = timed_generate(engine, prompts, params)

    mode = "greedy" if params[0].greedy else f"temperature {args.temperature}"
    graphs = ", CUDA graphs" if args.cuda_graphs else ""
    print(f"batch {args.batch}, prompts {min(map(len, prompts))}-{max(map(len, prompts))} tokens, "
          f"{args.max_new_tokens} new tokens each, {mode}{graphs}")
    print(f"decode: {result.decode_tokens_per_s:,.1f} tokens/s ({result.decode_tokens} tokens in "
          f"{result.decode_seconds:.2f} s); whole run incl. prefill {result.seconds:.2f} s")
    for i, out in enumerate(result.outputs[:3]):
        print(f"  request {i}: prompt {len(prompts[i])} tokens -> {out[:12]}{' …' if len(out) > 12 else ''}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="deepseek_decode", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
