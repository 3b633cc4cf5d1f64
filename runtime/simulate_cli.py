"""`kvpager simulate`: serve a synthetic or traced workload with the real scheduler and allocator
on a virtual clock priced by the cost model; print a summary; optionally write plots and JSON.

    kvpager simulate --requests 100000 --rate 40 --seed 0 --out sim-out/
    kvpager simulate --trace requests.csv --kv-memory-gb 20 --max-batch-size 128
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from kvpager import CacheConfig
from kvpager.errors import KVPagerError
from kvpager.runtime.metrics import Metrics
from kvpager.runtime.models.cost import (DEEPSEEK_V3_LAYERS, H100_READ_BANDWIDTH, CostModel)
from kvpager.runtime.scheduler import SchedulerConfig
from kvpager.runtime.simulator import Simulator
from kvpager.runtime.workload import Workload, load_trace, synthetic


def add_arguments(parser: argparse.ArgumentParser) -> None:
    wl = parser.add_argument_group("workload")
    wl.add_argument("--trace", type=Path, help="CSV or JSONL with arrival,prompt_len,output_len "
                    "(replaces the synthetic workload)")
    wl.add_argument("--requests", type=int, default=10_000, help="synthetic requests (default 10000)")
    wl.add_argument("--rate", type=float, default=40.0, help="mean arrivals per second (default 40)")
    wl.add_argument("--arrivals", choices=("poisson", "bursty"), default="poisson")
    wl.add_argument("--burstiness", type=float, default=4.0,
                    help="coefficient of variation of bursty inter-arrival gaps (default 4)")
    wl.add_argument("--length-dist", choices=("lognormal", "uniform"), default="lognormal")
    wl.add_argument("--prompt-mean", type=float, default=512)
    wl.add_argument("--output-mean", type=float, default=128)
    wl.add_argument("--sigma", type=float, default=1.0, help="lognormal shape (default 1.0)")
    wl.add_argument("--seed", type=int, default=0, help="workload and MTP acceptance seed")

    sched = parser.add_argument_group("scheduler and cache")
    sched.add_argument("--kv-memory-gb", type=float, default=40.0,
                       help="KV pool size in GiB (default 40); pages = budget // page bytes")
    sched.add_argument("--num-pages", type=int, help="pool size in pages (overrides --kv-memory-gb)")
    sched.add_argument("--max-batch-size", type=int, default=256)
    sched.add_argument("--max-tokens", type=int, default=4096, help="token budget per step")
    sched.add_argument("--headroom-pages", type=int, default=1)
    sched.add_argument("--max-model-len", type=int, default=16384)
    sched.add_argument("--mtp", type=int, default=0, help="draft tokens per decode step (s_q = 1 + mtp)")
    sched.add_argument("--accept-rate", type=float, default=0.7, help="MTP draft acceptance rate")

    cost = parser.add_argument_group("cost model (defaults: DeepSeek-V3 on an H100)")
    cost.add_argument("--bandwidth", type=float, default=H100_READ_BANDWIDTH, help="KV read B/s")
    cost.add_argument("--num-layers", type=int, default=DEEPSEEK_V3_LAYERS)
    cost.add_argument("--per-step-ms", type=float, default=CostModel.per_step_s * 1e3)
    cost.add_argument("--per-token-us", type=float, default=CostModel.per_token_s * 1e6)

    out = parser.add_argument_group("output")
    out.add_argument("--out", type=Path, help="write summary.json and timeline.png here")
    out.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    try:
        sim, workload = _build(args)
    except (KVPagerError, OSError) as exc:
        print(f"kvpager simulate: {exc}")
        return 2
    started = time.perf_counter()
    metrics = _run_with_progress(sim, len(workload), not args.no_progress)
    wall = time.perf_counter() - started
    summary = metrics.summary()
    summary.update(requests_rejected=sim.rejected, num_pages=sim.allocator.num_pages,
                   simulated_s=sim.clock, wall_s=wall)
    _print_summary(summary)
    if args.out is not None:
        write_outputs(args.out, metrics, summary, vars(args))
        print(f"wrote {args.out / 'summary.json'} and {args.out / 'timeline.png'}")
    return 0


def _build(args: argparse.Namespace) -> tuple[Simulator, Workload]:
    cache = CacheConfig(num_layers=args.num_layers, dtype="bfloat16",
                        **({"num_pages": args.num_pages} if args.num_pages
                           else {"memory_budget_bytes": int(args.kv_memory_gb * 2**30)}))
    config = SchedulerConfig(max_batch_size=args.max_batch_size, max_num_batched_tokens=args.max_tokens,
                             admit_headroom_pages=args.headroom_pages, num_speculative_tokens=args.mtp,
                             max_model_len=args.max_model_len)
    cost = CostModel(read_bandwidth=args.bandwidth, num_layers=args.num_layers,
                     bytes_per_token_per_layer=cache.bytes_per_token // args.num_layers,
                     per_step_s=args.per_step_ms * 1e-3, per_token_s=args.per_token_us * 1e-6)
    if args.trace is not None:
        workload = load_trace(args.trace)
    else:
        workload = synthetic(args.requests, args.rate, seed=args.seed, arrivals=args.arrivals,
                             burstiness=args.burstiness, length_dist=args.length_dist,
                             prompt_mean=args.prompt_mean, output_mean=args.output_mean,
                             sigma=args.sigma, max_len=args.max_model_len // 2)
    sim = Simulator(workload, cache.resolved_num_pages, config, cost, cache.page_size,
                    accept_rate=args.accept_rate, seed=args.seed)
    return sim, workload


def _run_with_progress(sim: Simulator, total: int, show: bool) -> Metrics:
    if not show:
        return sim.run()
    from tqdm import tqdm

    with tqdm(total=total, unit="req", desc="simulating", mininterval=0.5) as bar:
        return sim.run(on_progress=bar.update)


def _print_summary(s: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="kvpager simulate", show_header=True)
    table.add_column("metric")
    for col in ("value", "p50", "p90", "p99"):
        table.add_column(col, justify="right")
    rows = [
        ("requests finished / rejected", f"{s['requests_finished']} / {s['requests_rejected']}"),
        ("simulated time", f"{s['simulated_s']:.1f} s"),
        ("output throughput", f"{s['throughput_tok_s']:.0f} tok/s"),
        ("request throughput", f"{s['throughput_req_s']:.2f} req/s"),
        ("mean batch size", f"{s['mean_batch_size']:.1f}"),
        ("page utilisation mean / max", f"{s['page_utilisation_mean']:.1%} / {s['page_utilisation_max']:.1%}"),
        ("pages", str(s["num_pages"])),
        ("preemptions", str(s["preemptions"])),
        ("steps", str(s["steps"])),
        ("wall time", f"{s['wall_s']:.1f} s"),
    ]
    for name, value in rows:
        table.add_row(name, value, "", "", "")
    for name, unit, scale in (("ttft", "s", 1), ("tpot", "ms", 1e3), ("e2e", "s", 1), ("queued", "s", 1)):
        d = s[name]
        cells = ["-" if d[k] is None else f"{d[k] * scale:.3f}" for k in ("mean", "p50", "p90", "p99")]
        table.add_row(f"{name.upper()} ({unit}; value = mean)", *cells)
    Console().print(table)


def write_outputs(out: Path, metrics: Metrics, summary: dict, config: dict) -> None:
    """out/summary.json: config, summary, per-request latencies, binned per-step timeline;
    out/timeline.png: batch size, page utilisation and queue length over simulated time."""
    out.mkdir(parents=True, exist_ok=True)
    series = metrics.timeseries()
    doc = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in config.items()
                   if not k.startswith("_") and k != "func"},
        "summary": summary,
        "requests": {"ttft_s": metrics.ttft, "tpot_s": metrics.tpot, "e2e_s": metrics.e2e},
        "timeline": series,
    }
    (out / "summary.json").write_text(json.dumps(doc, indent=1))
    _plot(series, out / "timeline.png")


def _plot(series: dict[str, list[float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 1, figsize=(10, 8), sharex=True)
    panels = (("batch_size", "batch size", 1), ("page_utilisation", "pages used (%)", 100),
              ("waiting", "queue length", 1))
    for ax, (key, label, scale) in zip(axes, panels):
        ax.plot(series["time"], [v * scale for v in series[key]], lw=0.8)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("simulated time (s)")
    fig.suptitle("kvpager simulate")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
