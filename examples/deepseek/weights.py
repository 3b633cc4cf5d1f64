"""Checkpoints in the Hugging Face format: config.json + *.safetensors with transformers'
DeepseekV3ForCausalLM parameter names (routed experts one by one:
`model.layers.{i}.mlp.experts.{e}.gate_proj.weight`, as the released checkpoints and
transformers' save_pretrained write them). Nothing is fetched from the network.

Dtypes: parameters take the model dtype; buffers (rope frequencies, the router's
e_score_correction_bias) stay float32, as in transformers.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

from kvpager.errors import ConfigError

from .config import ModelConfig, load_config, save_config
from .model import DeepseekV3

WEIGHTS_FILE = "model.safetensors"
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


def random_model(cfg: ModelConfig, seed: int = 0, std: float = 0.1) -> DeepseekV3:
    """A float32 CPU model with N(0, std) matrices, unit norms and a small router bias, drawn
    from one seeded generator in parameter-name order (the same weights on every machine).

    std 0.1 rather than transformers' 0.02: the logits spread out (top-1 / top-2 gap ~0.3 at the
    median instead of ~0.1), so greedy decoding has clear winners and a bf16-vs-fp32 comparison
    measures the arithmetic rather than coin-flip ties."""
    model = DeepseekV3(cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in sorted(model.state_dict(keep_vars=True).items()):
            if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
                t.fill_(1.0)
            elif name.endswith("e_score_correction_bias"):
                t.copy_(torch.randn(t.shape, generator=gen) * 0.01)
            else:
                t.copy_(torch.randn(t.shape, generator=gen) * std)
    return model


def save_model(model: DeepseekV3, model_dir: str | Path) -> Path:
    """Write config.json and model.safetensors into model_dir (created)."""
    from safetensors.torch import save_file

    model_dir = Path(model_dir)
    save_config(model.config, model_dir)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight")
    save_file(state, str(model_dir / WEIGHTS_FILE), metadata={"format": "pt"})
    return model_dir


def read_state_dict(model_dir: str | Path, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Every tensor of the directory's *.safetensors shards, minus layers the config does not
    have (V3's multi-token-prediction layer 61)."""
    from safetensors.torch import load_file

    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise ConfigError(f"no *.safetensors in {model_dir}: expected a DeepseekV3 checkpoint")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    if any(k.endswith("weight_scale_inv") for k in state):
        raise ConfigError(f"{model_dir} holds an fp8 block-quantized checkpoint; dequantize it to "
                          f"bf16 first (DeepSeek's fp8_cast_bf16.py)")
    return {k: v for k, v in state.items()
            if not ((m := _LAYER.match(k)) and int(m.group(1)) >= cfg.num_hidden_layers)}


def load_model(model_dir: str | Path, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32) -> DeepseekV3:
    """Build the model of model_dir/config.json on `device` and load its weights in `dtype`."""
    cfg = load_config(model_dir)
    state = read_state_dict(model_dir, cfg)
    with torch.device(device):
        model = DeepseekV3(cfg)
    cast_parameters(model, dtype)
    if cfg.tie_word_embeddings:
        state.setdefault("lm_head.weight", state["model.embed_tokens.weight"])
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ConfigError(f"{model_dir} does not match its config.json: missing {sorted(missing)[:4]}, "
                          f"unexpected {sorted(unexpected)[:4]} ({len(missing)} / {len(unexpected)} in all)")
    return model.eval()


def cast_parameters(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Parameters to `dtype`; buffers stay float32 (module.to(dtype) would round them too)."""
    for p in model.parameters():
        p.data = p.data.to(dtype)


def demo_model_dir(seed: int = 0, root: str | Path | None = None) -> Path:
    """The small random demo checkpoint (ModelConfig's defaults, weights from `seed`), created on
    first use under root (default: $XDG_CACHE_HOME or ~/.cache, /kvpager/) or a temp dir when that
    is not writable. Written to a sibling directory and renamed, so a crash leaves no half model."""
    import os
    import tempfile

    base = Path(root) if root is not None else \
        Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "kvpager"
    try:
        base.mkdir(parents=True, exist_ok=True)
    except OSError:
        base = Path(tempfile.gettempdir()) / "kvpager"
        base.mkdir(parents=True, exist_ok=True)
    target = base / f"deepseek-v3-demo-v1-seed{seed}"  # bump v1 when random_model changes
    if not (target / WEIGHTS_FILE).is_file():
        staging = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=base))
        save_model(random_model(ModelConfig(), seed), staging)
        try:
            staging.rename(target)
        except OSError:  # another process made it first
            import shutil
            shutil.rmtree(staging, ignore_errors=True)
    return target
