"""The engine's step-by-step behaviour on a fixed workload, as plain data, for the caching-off
regression test (tests/runtime/test_prefix_engine.py). It uses only what main had before prefix
caching, so `python tests/runtime/caching_off_trace.py OUT.json` run against main's code wrote
tests/runtime/data/caching_off_trace.json."""
import json
import sys

import torch

from kvpager.runtime.engine import Engine
from kvpager.runtime.models.tiny import TinyMLA
from kvpager.runtime.request import SamplingParams
from kvpager.runtime.scheduler import SchedulerConfig

MODEL = TinyMLA(num_layers=2, num_heads=4, hidden=32, vocab_size=96, seed=0)
# Shared prefixes (what caching would reuse), chunked prefill, preemption and an abort.
BASE = [(7 * j + 3) % 96 for j in range(100)]
PROMPTS = [BASE[:50] + [i, i + 1] for i in range(3)] + [BASE + [(i * 5) % 96] * 20 for i in range(3)]


def trace(**config) -> dict:
    cfg = SchedulerConfig(max_batch_size=4, max_num_batched_tokens=48, admit_headroom_pages=0,
                          max_model_len=256, **config)
    eng = Engine(MODEL, MODEL.cache_config(5), cfg)
    handles = [eng.submit(p, SamplingParams(max_new_tokens=20 + 3 * i))
               for i, p in enumerate(PROMPTS)]
    steps = []
    while eng.has_unfinished():
        plan = eng.step()
        if len(steps) == 5:
            handles[4].abort()
        steps.append({
            "prefill": [[r.request_id, start, n] for r, start, n in plan.prefill],
            "decode": [r.request_id for r in plan.decode],
            "preempted": [r.request_id for r in plan.preempted],
            "pages_used": eng.allocator.num_used, "pages_free": eng.allocator.num_free})
    return {"steps": steps, "outputs": [h.output_token_ids for h in handles]}


if __name__ == "__main__":
    torch.set_num_threads(1)
    with open(sys.argv[1], "w") as f:
        json.dump(trace(), f)
