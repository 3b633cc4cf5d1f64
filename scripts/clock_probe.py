"""The SM clock and board power while one kernel runs back to back (s20): is the compute-bound decode
power-capped, and at what clock, against cuBLAS and a memory-bound decode? Samples nvidia-smi every
100 ms over ~3 s of CUDA-graph replays (no L2 clear: the steady state), and prints each workload's
median clock, power and the active clock-throttle reasons. Since s26 also the FP8 cache's decodes
(the ws kernel at h_q 16, the seesaw with its converter at h_q 128 s_q 2): does dequantization's
ALU work cost clock under the power cap where the bf16 memory-bound decode runs at the maximum?
    python scripts/clock_probe.py
"""
import statistics
import subprocess
import time

import torch

from kvpager import fp8, kernels
from kvpager.benchmarks import kernel as bench

QUERY = "clocks.sm,power.draw,clocks_throttle_reasons.active"


def decode_graph(case: bench.Case, fp8_cache: bool = False):
    x = bench.make_inputs(case, torch.bfloat16, 0)
    if fp8_cache:
        x["k_cache"] = fp8.quantize(x["k_cache"])
    rows = case.s_q * case.h_q // case.h_kv
    meta, splits = kernels.get_mla_metadata(x["cache_seqlens"], rows, case.h_kv)

    def call():
        return kernels.flash_mla_with_kvcache(x["q"], x["k_cache"], x["block_table"], x["cache_seqlens"],
                                              bench.DV, meta, splits, causal=True, is_fp8_kvcache=fp8_cache)
    call()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call()
    return graph.replay


def matmul_fn():
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    return lambda: a @ b


def sample(name: str, fn, seconds: float = 3.0) -> None:
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    while time.perf_counter() - start < 0.5:  # let the clock settle under this load first
        fn()
    torch.cuda.synchronize()
    smi = subprocess.Popen(["nvidia-smi", f"--query-gpu={QUERY}", "--format=csv,noheader,nounits", "-lms", "100"],
                           stdout=subprocess.PIPE, text=True)
    ev0, ev1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    t0 = time.perf_counter()
    ev0.record()
    calls = 0
    while time.perf_counter() - t0 < seconds:
        for _ in range(20):
            fn()
        calls += 20
        torch.cuda.synchronize()
    ev1.record()
    torch.cuda.synchronize()
    smi.terminate()
    out, _ = smi.communicate()
    rows = [line.split(", ") for line in out.strip().splitlines() if line.count(",") == 2]
    clocks = [float(r[0]) for r in rows[2:-1]]
    power = [float(r[1]) for r in rows[2:-1]]
    reasons = sorted({r[2] for r in rows[2:-1]})
    per_call = ev0.elapsed_time(ev1) * 1e3 / calls
    print(f"{name}: {per_call:.1f} µs a call | SM clock median {statistics.median(clocks):.0f} MHz "
          f"(min {min(clocks):.0f}) | power median {statistics.median(power):.0f} W | throttle {reasons}")


def main() -> None:
    print(torch.cuda.get_device_name(), subprocess.run(["nvidia-smi", "--query-gpu=power.limit,clocks.max.sm",
                                                        "--format=csv,noheader"], capture_output=True, text=True).stdout.strip())
    sample("cuBLAS bf16 8192^3", matmul_fn())
    for case in (bench.Case(128, 2, 128, 8192, False), bench.Case(128, 1, 128, 8192, False),
                 bench.Case(128, 1, 16, 8192, False)):
        sample(f"decode b={case.b} s_q={case.s_q} h_q={case.h_q} s_k={case.s_k}", decode_graph(case))
    if kernels.supports_fp8_kvcache():
        for case in (bench.Case(128, 1, 16, 8192, False), bench.Case(128, 2, 128, 8192, False)):
            sample(f"fp8 decode b={case.b} s_q={case.s_q} h_q={case.h_q} s_k={case.s_k}", decode_graph(case, True))


if __name__ == "__main__":
    main()
