"""kvpager.runtime: continuous batching over the paged latent KV cache, and its simulator.

    from kvpager.runtime import Engine, SamplingParams, SchedulerConfig
    from kvpager.runtime.models.tiny import TinyMLA
    model = TinyMLA()
    engine = Engine(model, model.cache_config(num_pages=64), SchedulerConfig(max_batch_size=8))
    outputs = engine.generate([[1, 2, 3], [4, 5]], SamplingParams(max_new_tokens=16))
    outputs[0].token_ids, outputs[0].finish_reason, outputs[0].timings.ttft

docs/runtime.md describes the scheduler, the model protocol and the simulator.
"""
from kvpager.runtime.engine import Engine
from kvpager.runtime.outputs import OutputTimings, RequestOutput, StreamChunk
from kvpager.runtime.models.protocol import DecodeBatch, Model, PrefillBatch
from kvpager.runtime.request import RequestHandle, SamplingParams, Status
from kvpager.runtime.scheduler import SchedulerConfig

__all__ = ["Engine", "SamplingParams", "SchedulerConfig", "RequestHandle", "Status", "Model",
           "PrefillBatch", "DecodeBatch", "RequestOutput", "OutputTimings", "StreamChunk"]
