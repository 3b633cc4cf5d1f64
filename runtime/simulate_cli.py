"""`kvpager simulate`: serve a synthetic or traced workload with the real scheduler and allocator
on a virtual clock priced by the cost model; print a summary; optionally write plots and JSON.

    kvpager simulate --requests 100000 --rate 40 --seed 0 --out sim-out/
    kvpager simulate --trace requests.csv --kv-memory-gb 20 --max-batch-size 128
    kvpager simulate --prefix-caching --workload system-prompts --system-prompts 32
    kvpager simulate --prefix-caching --trace mooncake_trace.jsonl
"""
from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

from kvpager import CacheConfig
from kvpager.cli_args import (KV_CACHE_DTYPE_HELP, KV_CACHE_DTYPES, at_least, input_file,
                              nonneg_float, nonneg_int, output_dir, positive_float, positive_int,
                              probability)
from kvpager.errors import ConfigError, KVPagerError
from kvpager.runtime.metrics import Metrics
from kvpager.runtime.models.cost import (DEEPSEEK_V3_LAYERS, H100_READ_BANDWIDTH, CostModel)
from kvpager.runtime.scheduler import SchedulerConfig
from kvpager.runtime.shared_prefix import chats, system_prompts
from kvpager.runtime.simulator import Simulator
from kvpager.runtime.workload import Workload, load_trace, synthetic


def add_arguments(parser: argparse.ArgumentParser) -> None:
    wl = parser.add_argument_group("workload")
    wl.add_argument("--trace", type=input_file, help="CSV or JSONL with arrival,prompt_len,"
                    "output_len (replaces the synthetic workload)")
    wl.add_argument("--requests", type=positive_int, default=10_000, help="synthetic requests")
    wl.add_argument("--rate", type=positive_float, default=40.0, help="mean arrivals per second")
    wl.add_argument("--arrivals", choices=("poisson", "bursty"), default="poisson",
                    help="arrival process")
    wl.add_argument("--burstiness", type=positive_float, default=4.0,
                    help="coefficient of variation of bursty inter-arrival gaps")
    wl.add_argument("--length-dist", choices=("lognormal", "uniform"), default="lognormal",
                    help="prompt and output length distribution")
    wl.add_argument("--prompt-mean", type=at_least(1), default=512.0, help="mean prompt tokens")
    wl.add_argument("--output-mean", type=at_least(1), default=128.0, help="mean output tokens")
    wl.add_argument("--sigma", type=nonneg_float, default=1.0, help="lognormal shape")
    wl.add_argument("--seed", type=nonneg_int, default=0, help="workload and MTP acceptance seed")

    sched = parser.add_argument_group("scheduler and cache")
    sched.add_argument("--kv-memory-gb", type=positive_float, default=40.0,
                       help="KV pool size in GiB; pages = budget // page bytes")
    sched.add_argument("--kv-cache-dtype", choices=KV_CACHE_DTYPES, default="auto",
                       help=KV_CACHE_DTYPE_HELP + "; sets the page bytes and the cost model's "
                       "bytes read per token")
    sched.add_argument("--num-pages", type=positive_int,
                       help="pool size in pages (overrides --kv-memory-gb)")
    sched.add_argument("--max-batch-size", type=positive_int, default=256,
                       help="running requests at most")
    sched.add_argument("--max-tokens", type=positive_int, default=4096, help="token budget per step")
    sched.add_argument("--headroom-pages", type=nonneg_int, default=1,
                       help="free pages beyond a prompt needed to admit it while others run")
    sched.add_argument("--max-model-len", type=positive_int, default=16384,
                       help="prompt + output tokens at most")
    sched.add_argument("--mtp", type=nonneg_int, default=0,
                       help="draft tokens per decode step (s_q = 1 + mtp)")
    sched.add_argument("--accept-rate", type=probability, default=0.7,
                       help="MTP draft acceptance rate, in [0, 1]")
    sched.add_argument("--prefill", choices=("batched", "per-request"), default="batched",
                       help="prefill chunks share model calls (grouped by length), or one call "
                            "per chunk; each call costs --per-step-ms")

    cost = parser.add_argument_group("cost model (defaults: DeepSeek-V3 on an H100)")
    cost.add_argument("--bandwidth", type=positive_float, default=H100_READ_BANDWIDTH,
                      help="KV read B/s")
    cost.add_argument("--num-layers", type=positive_int, default=DEEPSEEK_V3_LAYERS,
                      help="layers whose KV each step reads")
    cost.add_argument("--per-step-ms", type=nonneg_float, default=CostModel.per_step_s * 1e3,
                      help="fixed cost of each model call (launches, weights, sampling); a "
                           "step makes one decode call and one per prefill batch")
    cost.add_argument("--per-token-us", type=nonneg_float, default=CostModel.per_token_s * 1e6,
                      help="non-attention compute per new token")

    pc = parser.add_argument_group("prefix caching")
    pc.add_argument("--prefix-caching", action="store_true",
                    help="reuse the KV pages of cached prompt prefixes")
    pc.add_argument("--workload", choices=("synthetic", "chat", "system-prompts"),
                    default="synthetic", help="synthetic: unrelated prompts; chat: multi-turn "
                    "conversations extending their previous prompt; system-prompts: shared "
                    "system prompts (Zipf popularity) + a user part of --prompt-mean tokens")
    pc.add_argument("--system-prompts", type=positive_int, default=16,
                    help="number of distinct system prompts (system-prompts workload)")
    pc.add_argument("--system-prompt-len", type=at_least(1), default=2048.0,
                    help="mean system prompt tokens")
    pc.add_argument("--zipf", type=nonneg_float, default=1.1,
                    help="Zipf exponent of system prompt popularity")
    pc.add_argument("--turns", type=at_least(1), default=4.0, help="mean turns per chat")
    pc.add_argument("--think-time", type=nonneg_float, default=10.0,
                    help="mean seconds between a chat's turns")
    pc.add_argument("--message-mean", type=at_least(1), default=128.0,
                    help="mean tokens of a chat's later user messages (the first: --prompt-mean)")

    out = parser.add_argument_group("output")
    out.add_argument("--out", type=output_dir,
                     help="directory to write summary.json and timeline.png into")
    out.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    """KVPagerError / OSError propagate to kvpager.cli.main, which prints them (exit 2)."""
    sim, workload = _build(args)
    started = time.perf_counter()
    metrics = _run_with_progress(sim, len(workload), not args.no_progress)
    wall = time.perf_counter() - started
    summary = metrics.summary()
    summary.update(requests_rejected=sim.rejected, num_pages=sim.allocator.num_pages,
                   simulated_s=sim.clock, wall_s=wall)
    summary["kv_bytes_per_token_per_layer"] = sim.cost.bytes_per_token_per_layer
    _print_summary(summary)
    if args.out is not None:
        write_outputs(args.out, metrics, summary, vars(args))
        print(f"wrote {args.out / 'summary.json'} and {args.out / 'timeline.png'}")
    return 0


# Config fields as the user knows them: the flags.
_FLAGS = {"max_batch_size": "--max-batch-size", "max_num_batched_tokens": "--max-tokens",
          "admit_headroom_pages": "--headroom-pages", "num_speculative_tokens": "--mtp",
          "max_model_len": "--max-model-len", "num_pages": "--num-pages",
          "num_layers": "--num-layers"}


def _in_flags(exc: ConfigError) -> ConfigError:
    """The config's own check, its message in flag names."""
    text = re.sub(r"^invalid \w+: ", "", str(exc))
    for field, flag in _FLAGS.items():
        text = re.sub(rf"\b{field}\b", flag, text)
    return ConfigError(text)


def _build(args: argparse.Namespace) -> tuple[Simulator, Workload]:
    try:
        if args.num_pages is None:
            page_bytes = _page_bytes(args.num_layers, args.kv_cache_dtype)
            if int(args.kv_memory_gb * 2**30) // page_bytes < 1:
                raise ConfigError(f"--kv-memory-gb {args.kv_memory_gb:g} holds no page "
                                  f"({page_bytes} bytes at --num-layers "
                                  f"{args.num_layers}); raise it or give --num-pages")
        cache = CacheConfig(num_layers=args.num_layers, dtype="bfloat16",
                            kv_cache_dtype=args.kv_cache_dtype,
                            **({"num_pages": args.num_pages} if args.num_pages is not None
                               else {"memory_budget_bytes": int(args.kv_memory_gb * 2**30)}))
        config = SchedulerConfig(max_batch_size=args.max_batch_size,
                                 max_num_batched_tokens=args.max_tokens,
                                 admit_headroom_pages=args.headroom_pages,
                                 num_speculative_tokens=args.mtp, max_model_len=args.max_model_len,
                                 batched_prefill=args.prefill == "batched",
                                 enable_prefix_caching=args.prefix_caching)
    except ConfigError as exc:
        raise _in_flags(exc) from None
    cost = CostModel(read_bandwidth=args.bandwidth, num_layers=args.num_layers,
                     bytes_per_token_per_layer=cache.bytes_per_token // args.num_layers,
                     per_step_s=args.per_step_ms * 1e-3, per_token_s=args.per_token_us * 1e-6)
    workload = _workload(args)
    try:  # with --prefix-caching the pool must hold one --max-model-len request
        sim = Simulator(workload, cache.resolved_num_pages, config, cost, cache.page_size,
                        accept_rate=args.accept_rate, seed=args.seed)
    except ConfigError as exc:
        raise _in_flags(exc) from None
    return sim, workload


def _workload(args: argparse.Namespace) -> Workload:
    if args.trace is not None:
        return load_trace(args.trace)
    half = args.max_model_len // 2
    if args.workload == "chat":
        return Workload(*chats(args.requests, args.rate, args.seed, args.turns, args.think_time,
                               args.message_mean, args.output_mean, args.prompt_mean, args.sigma,
                               args.max_model_len))
    workload = synthetic(args.requests, args.rate, seed=args.seed, arrivals=args.arrivals,
                         burstiness=args.burstiness, length_dist=args.length_dist,
                         prompt_mean=args.prompt_mean, output_mean=args.output_mean,
                         sigma=args.sigma, max_len=half)
    if args.workload == "system-prompts":
        workload.prompt_len, workload.content = system_prompts(
            workload.arrival, workload.prompt_len, workload.output_len, args.system_prompts,
            args.system_prompt_len, args.zipf, args.seed, half)
    return workload


def _page_bytes(num_layers: int, kv_cache_dtype: str) -> int:
    return CacheConfig(num_layers=num_layers, num_pages=1, dtype="bfloat16",
                       kv_cache_dtype=kv_cache_dtype).bytes_per_page


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
        ("KV bytes a token per layer", str(s["kv_bytes_per_token_per_layer"])),
        ("preemptions", str(s["preemptions"])),
        ("KV usage mean / max", f"{s['kv_usage_tokens_mean']:.0f} / {s['kv_usage_tokens_max']} tokens"),
        ("prefix hit rate (tokens)", f"{s['prefix_hit_rate']:.1%} of {s['prefix_query_tokens']}"),
        ("evictions", str(s["evictions"])),
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
    out/timeline.png: batch size, page utilisation (preemptions marked), queue length, KV usage
    in tokens and the prefix hit rate over simulated time, the configuration in the title."""
    out.mkdir(parents=True, exist_ok=True)
    series = metrics.timeseries()
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in config.items()
              if not k.startswith("_") and k not in ("func", "command")}
    doc = {
        "config": config,
        "summary": summary,
        "requests": {"ttft_s": metrics.ttft.values, "tpot_s": metrics.tpot.values,
                     "e2e_s": metrics.e2e.values},
        "timeline": series,
    }
    (out / "summary.json").write_text(json.dumps(doc, indent=1))
    _plot(series, out / "timeline.png", _title(config, summary))


def _title(c: dict, s: dict) -> str:
    """The run's configuration in two lines: workload, then pool / scheduler / cost model."""
    if c.get("trace"):
        load = f"trace {Path(c['trace']).name}"
    else:
        load = (f"{c['requests']} requests, {c['arrivals']} {c['rate']:g}/s, {c['length_dist']} "
                f"prompt {c['prompt_mean']:g} / output {c['output_mean']:g} tokens")
    if c.get("workload") == "system-prompts" and not c.get("trace"):
        load += (f" + {c['system_prompts']} system prompts of ~{c['system_prompt_len']:g} "
                 f"(Zipf {c['zipf']:g})")
    elif c.get("workload") == "chat" and not c.get("trace"):
        load = (f"{c['requests']} chat turns, {c['rate']:g}/s, ~{c['turns']:g} turns, "
                f"think {c['think_time']:g} s")
    mtp = f", MTP {c['mtp']} @ {c['accept_rate']:g}" if c.get("mtp") else ""
    mtp += ", prefix caching" if c.get("prefix_caching") else ""
    return (f"kvpager simulate: {load}\n{s['num_pages']} pages, batch <= {c['max_batch_size']}, "
            f"{c['max_tokens']} tokens/step{mtp}, {c['num_layers']} layers, "
            f"{c.get('kv_cache_dtype', 'auto')} cache, "
            f"{c['bandwidth'] / 1e12:g} TB/s, seed {c['seed']}")


def _plot(series: dict[str, list[float]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = series["time"]
    fig, (batch, pages, queue, kv) = plt.subplots(4, 1, figsize=(10, 10), sharex=True)
    batch.plot(t, series["batch_size"], lw=0.8)
    batch.set_ylabel("batch size (mean)")
    pages.plot(t, [v * 100 for v in series["page_utilisation"]], lw=0.8)
    pages.set_ylabel("pages used (%, mean)")
    pages.set_ylim(0, 105)
    hit = [(x, n) for x, n in zip(t, series["preemptions"]) if n > 0]
    if hit:  # a marker at the top of the pages panel for every bin with a preemption
        pages.scatter([x for x, _ in hit], [102] * len(hit), marker="v", color="tab:red", s=14,
                      label=f"preemptions ({int(sum(n for _, n in hit))} in {len(hit)} bins)")
        pages.legend(loc="lower right", fontsize="small")
    queue.step(t, series["waiting_max"], where="mid", lw=0.8)
    queue.set_ylabel("queue length (max)")
    kv.plot(t, series["kv_usage_tokens"], lw=0.8, color="tab:green")
    kv.set_ylabel("KV usage (tokens, mean)")
    rate = [(x, r * 100) for x, r in zip(t, series["prefix_hit_rate"]) if r is not None]
    if rate:  # bins that admitted something
        hits = kv.twinx()
        hits.plot([x for x, _ in rate], [r for _, r in rate], lw=0.6, color="tab:purple")
        hits.set_ylabel("prefix hit rate (%)", color="tab:purple")
        hits.set_ylim(0, 105)
    for ax in (batch, pages, queue, kv):
        ax.grid(alpha=0.3)
    kv.set_xlabel("simulated time (s)")
    fig.suptitle(title, fontsize="medium")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
