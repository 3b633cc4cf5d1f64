"""How the number of scheduler parts (hence splits) trades decode-kernel time against combine
time for small batches: the kernel runs whatever metadata it is given, so this times one call
(CUDA-graph replay, L2 cleared) with kernels.schedule.plan(cache_seqlens, num_parts) for several
num_parts, without a rebuild.
    python scripts/split_sweep.py
"""
import torch

from kvpager import kernels  # noqa: F401 - loads the op library
from kvpager.benchmarks import kernel as bench
from kvpager.kernels import schedule

CASES = [bench.Case(1, 1, 128, 4096, False), bench.Case(8, 1, 16, 2048, False),
         bench.Case(8, 1, 128, 4096, False), bench.Case(32, 1, 128, 4096, False),
         bench.Case(64, 1, 128, 1024, False), bench.Case(32, 1, 128, 2048, True)]


def sweep(case: bench.Case, time_us) -> None:
    x = bench.make_inputs(case, torch.bfloat16, 0)
    rows = case.s_q * case.h_q // case.h_kv
    default = schedule.num_sm_parts(torch.cuda.get_device_properties(0).multi_processor_count,
                                    rows, case.h_kv)
    results = []
    for parts in sorted({default, default // 2, default // 4, default // 8, 2 * default} - {0}):
        meta, splits = schedule.plan(x["cache_seqlens"], parts)

        def call():  # the raw op: the wrapper insists on the default number of parts
            return torch.ops.kvpager.mla_decode(x["q"], x["k_cache"], x["block_table"],
                                                x["cache_seqlens"], bench.DV, meta, splits,
                                                bench.D ** -0.5, False)

        call()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            call()
        results.append(f"{parts}{'*' if parts == default else ''}: {time_us(graph.replay):.1f} µs "
                       f"({int(splits[-1])} splits)")
    print(f"b={case.b} h_q={case.h_q} s_k={case.s_k}: " + " | ".join(results))


if __name__ == "__main__":
    timer, how = bench.make_timer()
    print(torch.cuda.get_device_name(), "|", how, "| * = the default num_sm_parts")
    for case in CASES:
        sweep(case, timer)
