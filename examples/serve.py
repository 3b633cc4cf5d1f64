"""`python examples/serve.py`: an OpenAI-compatible completions server over kvpager's AsyncEngine.

    pip install -e ".[serve]"
    python examples/serve.py --model tiny --port 8000
    curl localhost:8000/v1/completions -H 'content-type: application/json' \\
         -d '{"prompt": [1, 2, 3], "max_tokens": 8, "temperature": 0}'

--model tiny is the CPU test model (vocab 128, token-id prompts); --model demo the small random
DeepSeek-V3 model of `kvpager demo`; --model-dir a DeepseekV3 checkpoint (text prompts when the
directory has a tokenizer). Metrics at /metrics (Prometheus).
"""
from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="serve.py", description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", choices=("tiny", "demo"), default="demo",
                   help="built-in model when --model-dir is not given")
    p.add_argument("--model-dir", help="DeepseekV3 checkpoint directory (config.json + *.safetensors)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=_positive, default=8000)
    p.add_argument("--max-batch", type=_positive, default=64, help="requests decoded together")
    p.add_argument("--max-model-len", type=_positive, default=2048, help="prompt + output tokens")
    p.add_argument("--num-pages", type=_positive, default=None,
                   help="KV pages in the pool (default: max-batch full-length requests)")
    p.add_argument("--max-waiting", type=_positive, default=1024,
                   help="queued requests before the server answers 429")
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda when present)")
    p.add_argument("--threads", type=_positive, default=1, help="torch CPU threads")
    return p


def _positive(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not an integer") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"{n} must be >= 1")
    return n


def build(args: argparse.Namespace):
    """(AsyncEngine, model name, text) for the arguments."""
    import torch

    from kvpager.config import CacheConfig
    from kvpager.runtime import Engine, SchedulerConfig
    from kvpager.runtime.async_engine import AsyncEngine
    from kvpager.runtime.scheduler import pages_for
    from kvpager.examples.server.text import text_for

    torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    num_pages = args.num_pages or args.max_batch * pages_for(args.max_model_len, 64) + 1
    config = SchedulerConfig(max_batch_size=args.max_batch, max_model_len=args.max_model_len,
                             max_num_batched_tokens=max(2048, args.max_batch))
    if args.model_dir is None and args.model == "tiny":
        from kvpager.runtime.models.tiny import TinyMLA

        model = TinyMLA(device=device)
        cache, name, model_dir = model.cache_config(num_pages), "kvpager-tiny", None
    else:
        from kvpager.examples.deepseek.weights import demo_model_dir, load_model

        model_dir = args.model_dir or demo_model_dir(0)
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        model = load_model(model_dir, device, dtype)
        cache = CacheConfig(num_layers=model.num_layers, num_pages=num_pages, dtype=dtype,
                            device=str(device))
        name = "kvpager-deepseek-demo" if args.model_dir is None else str(args.model_dir)
    engine = Engine(model, cache, config)
    return AsyncEngine(engine, max_waiting=args.max_waiting), name, text_for(model_dir)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        import uvicorn

        from kvpager.examples.server.app import make_app
    except ImportError as exc:
        print(f"serve.py: error: {exc.name} is missing; install the serving extra: "
              f"pip install -e \".[serve]\"", file=sys.stderr)
        return 2
    from kvpager.errors import KVPagerError

    try:
        aengine, name, text = build(args)
    except KVPagerError as exc:
        print(f"serve.py: error: {exc}", file=sys.stderr)
        return 2
    uvicorn.run(make_app(aengine, name, text), host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
