"""The model's shape: a flat dataclass read from (and written to) a Hugging Face DeepseekV3
config.json. Both rope layouts are read: transformers 5's `rope_parameters` and the original
checkpoints' `rope_theta` + `rope_scaling`."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from kvpager.errors import ConfigError

# The latent cache kvpager pages: kv_lora_rank (512) + decoupled rope key (64) = 576 per token.
KV_LORA_RANK = 512
ROPE_HEAD_DIM = 64


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 4096
    hidden_size: int = 256
    intermediate_size: int = 512          # dense MLP layers
    moe_intermediate_size: int = 128      # each routed / shared expert
    num_hidden_layers: int = 3
    num_attention_heads: int = 16
    q_lora_rank: int | None = 192         # None: a plain q_proj
    kv_lora_rank: int = KV_LORA_RANK
    qk_nope_head_dim: int = 64
    qk_rope_head_dim: int = ROPE_HEAD_DIM
    v_head_dim: int = 64
    n_routed_experts: int = 8             # 0: every layer dense
    n_shared_experts: int = 1
    num_experts_per_tok: int = 2
    n_group: int = 4
    topk_group: int = 2
    first_k_dense_replace: int = 1
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 2.5
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 16384
    rope_theta: float = 10000.0
    # {"rope_type": "yarn", "factor", "original_max_position_embeddings", "beta_fast",
    #  "beta_slow", "mscale", "mscale_all_dim"} or None for plain RoPE.
    rope_scaling: dict[str, Any] | None = dataclasses.field(default_factory=lambda: {
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096,
        "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0})
    rope_interleave: bool = True
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 0
    eos_token_id: int | None = 1

    def __post_init__(self) -> None:
        if self.kv_lora_rank != KV_LORA_RANK or self.qk_rope_head_dim != ROPE_HEAD_DIM:
            raise ConfigError(
                f"kv_lora_rank={self.kv_lora_rank}, qk_rope_head_dim={self.qk_rope_head_dim}: "
                f"kvpager's MLA cache is {KV_LORA_RANK} + {ROPE_HEAD_DIM} wide (DeepSeek-V2/V3)")
        if self.is_moe_model:
            if self.n_routed_experts % self.n_group:
                raise ConfigError(f"n_routed_experts={self.n_routed_experts} is not a multiple of "
                                  f"n_group={self.n_group}")
            if not 0 < self.topk_group <= self.n_group:
                raise ConfigError(f"topk_group={self.topk_group} must be in 1..n_group={self.n_group}")
            per_group = self.n_routed_experts // self.n_group
            if per_group < 2:
                raise ConfigError(f"{per_group} expert per group: the V3 router scores a group by "
                                  f"its top-2 experts; use fewer groups")
            if self.num_experts_per_tok > self.topk_group * per_group:
                raise ConfigError(f"num_experts_per_tok={self.num_experts_per_tok} exceeds the "
                                  f"{self.topk_group * per_group} experts of the chosen groups")

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def is_moe_model(self) -> bool:
        return self.n_routed_experts > 0 and self.first_k_dense_replace < self.num_hidden_layers

    def is_moe_layer(self, layer: int) -> bool:
        return self.is_moe_model and layer >= self.first_k_dense_replace


_FIELDS = {f.name for f in dataclasses.fields(ModelConfig)}


def from_hf_dict(d: dict[str, Any]) -> ModelConfig:
    """A ModelConfig from a transformers DeepseekV3 config dict (unknown keys ignored)."""
    kw = {k: v for k, v in d.items() if k in _FIELDS and k not in ("rope_scaling", "rope_theta")}
    rope = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
    kw["rope_theta"] = float(rope.pop("rope_theta", d.get("rope_theta", 10000.0)))
    rope_type = rope.pop("rope_type", rope.pop("type", "default"))
    kw["rope_scaling"] = None if rope_type == "default" else {"rope_type": rope_type, **rope}
    if kw["rope_scaling"] is not None and rope_type != "yarn":
        raise ConfigError(f"rope type {rope_type!r} is not supported; DeepSeek-V3 uses 'yarn'")
    for key in ("n_routed_experts", "n_shared_experts", "n_group", "topk_group"):
        if key in d and d[key] is None:  # a dense-only model
            kw[key] = 0 if key.startswith("n_r") else 1
    if isinstance(kw.get("eos_token_id"), list):
        kw["eos_token_id"] = kw["eos_token_id"][0]
    return ModelConfig(**kw)


def to_hf_dict(cfg: ModelConfig) -> dict[str, Any]:
    """The config.json transformers' DeepseekV3ForCausalLM loads (transformers 5 layout)."""
    d = dataclasses.asdict(cfg)
    d.pop("rope_scaling")
    d.pop("rope_theta")
    d["rope_parameters"] = {"rope_type": "default", "rope_theta": cfg.rope_theta,
                            **(cfg.rope_scaling or {})}
    d.update(architectures=["DeepseekV3ForCausalLM"], model_type="deepseek_v3",
             num_key_value_heads=cfg.num_attention_heads, hidden_act="silu",
             attention_bias=False, torch_dtype="float32")
    if not cfg.is_moe_model:
        d["first_k_dense_replace"] = cfg.num_hidden_layers
    return d


def load_config(model_dir: str | Path) -> ModelConfig:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise ConfigError(f"{path} not found: --model-dir must hold a DeepseekV3 config.json")
    try:
        config = json.loads(path.read_text())
    except ValueError as exc:  # not JSON, or not UTF-8
        raise ConfigError(f"{path} is not a JSON config: {exc}") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{path} must hold a JSON object (a DeepseekV3 config)")
    try:
        return from_hf_dict(config)
    except TypeError as exc:  # a field of the wrong type reached ModelConfig's checks
        raise ConfigError(f"{path} is not a DeepseekV3 config: {exc}") from None


def save_config(cfg: ModelConfig, model_dir: str | Path) -> None:
    Path(model_dir).mkdir(parents=True, exist_ok=True)
    (Path(model_dir) / "config.json").write_text(json.dumps(to_hf_dict(cfg), indent=2) + "\n")
