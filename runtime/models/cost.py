"""CostModel: the simulator's stand-in for a model. It does no arithmetic; it prices a step.

    step_time = per_step_s * model_calls + per_token_s * new_tokens
                + kv_tokens_read * bytes_per_token / read_bandwidth

The batched form: a step makes the model calls the engine makes — one for the decode batch and
one per prefill batch (kvpager.runtime.prefill.group_chunks: the step's chunks grouped by
length; with SchedulerConfig(batched_prefill=False), one per chunk) — and each call pays
per_step_s. new_tokens counts every column a call computes: decode tokens, prefill tokens and
the prefill batches' padding columns. kv_tokens_read counts, for each decode row, its cache
length (every layer reads every cached token's latent once), and for each prefill chunk the
cache it attends over (start + chunk).

Defaults: DeepSeek-V3 attention on one H100.
  read_bandwidth   3.0e12 B/s   achievable HBM3 read rate measured on an H100 (docs/kernel-perf.md:
                                the read ceiling, the decode kernel's bound)
  bytes per token  576 * 2 * 61 = 70,272 B  (576-wide bf16 latent per layer, 61 layers);
                   656 * 61 = 40,016 B for an FP8 cache (kvpager.fp8's row): `kvpager simulate
                   --kv-cache-dtype fp8` takes bytes_per_token_per_layer from its CacheConfig
  per_step_s       1.5e-3 s     assumption: launches, weight reads and sampling per model call
  per_token_s      2.5e-5 s     assumption: the non-attention compute of one token
                                (~74 GFLOP of V3's 37B active params at ~3 PFLOP/s, i.e. spread
                                over a node); override for other deployments
Only the bandwidth and bytes are measured figures; the two overheads are round assumptions.
"""
from __future__ import annotations

from dataclasses import dataclass

from kvpager.errors import ConfigError

H100_READ_BANDWIDTH = 3.0e12  # B/s
DEEPSEEK_V3_LAYERS = 61
LATENT_BYTES_PER_LAYER = 576 * 2  # bf16


@dataclass(frozen=True)
class CostModel:
    read_bandwidth: float = H100_READ_BANDWIDTH
    num_layers: int = DEEPSEEK_V3_LAYERS
    bytes_per_token_per_layer: int = LATENT_BYTES_PER_LAYER
    per_step_s: float = 1.5e-3
    per_token_s: float = 2.5e-5

    def __post_init__(self) -> None:
        if self.read_bandwidth <= 0 or self.num_layers <= 0 or self.bytes_per_token_per_layer <= 0:
            raise ConfigError("read_bandwidth, num_layers and bytes_per_token_per_layer must be > 0")
        if self.per_step_s < 0 or self.per_token_s < 0:
            raise ConfigError(f"per_step_s={self.per_step_s} and per_token_s={self.per_token_s} "
                              f"must be >= 0")

    @property
    def bytes_per_token(self) -> int:
        """KV bytes one cached token holds across all layers."""
        return self.num_layers * self.bytes_per_token_per_layer

    def step_time(self, kv_tokens_read: int, new_tokens: int, model_calls: int = 1) -> float:
        """Seconds for one step of model_calls calls that together read kv_tokens_read cached
        tokens and compute new_tokens columns (padding included)."""
        return (self.per_step_s * model_calls + self.per_token_s * new_tokens
                + kv_tokens_read * self.bytes_per_token / self.read_bandwidth)
