"""The example's config and checkpoint format: HF config.json round trips, our saved random
checkpoint loads back (and into transformers, when installed), bad checkpoints fail clearly."""
from __future__ import annotations

import json

import pytest
import torch

from kvpager.errors import ConfigError
from kvpager.examples.deepseek.config import ModelConfig, from_hf_dict, load_config, to_hf_dict
from kvpager.examples.deepseek.weights import demo_model_dir, load_model, random_model, save_model

SMALL = ModelConfig(vocab_size=300, hidden_size=128, intermediate_size=192, moe_intermediate_size=64,
                    num_hidden_layers=2, q_lora_rank=96, qk_nope_head_dim=32, v_head_dim=32)


def test_config_round_trips_through_the_hf_dict():
    assert from_hf_dict(to_hf_dict(SMALL)) == SMALL
    dense = ModelConfig(n_routed_experts=0)
    assert not from_hf_dict(to_hf_dict(dense)).is_moe_model


def test_original_checkpoint_rope_layout_is_read():
    """DeepSeek's released config.json: rope_theta + rope_scaling {"type": "yarn", ...}."""
    d = to_hf_dict(SMALL)
    d.pop("rope_parameters")
    d.update(rope_theta=5000.0, rope_scaling={"type": "yarn", "factor": 40, "beta_fast": 32, "beta_slow": 1,
                                              "mscale": 1.0, "mscale_all_dim": 1.0,
                                              "original_max_position_embeddings": 4096})
    cfg = from_hf_dict(d)
    assert cfg.rope_theta == 5000.0 and cfg.rope_scaling["rope_type"] == "yarn" and cfg.rope_scaling["factor"] == 40


@pytest.mark.parametrize("change, words", [
    (dict(kv_lora_rank=256), "kv_lora_rank=256"),
    (dict(n_routed_experts=6, n_group=4), "n_group=4"),
    (dict(n_group=8), "1 expert per group"),
    (dict(topk_group=5), "topk_group=5"),
])
def test_bad_configs_name_the_value(change, words):
    with pytest.raises(ConfigError, match=words):
        ModelConfig(**change)


def test_random_model_is_seeded():
    a, b, c = random_model(SMALL, seed=3), random_model(SMALL, seed=3), random_model(SMALL, seed=4)
    for (name, x), y, z in zip(a.state_dict().items(), b.state_dict().values(), c.state_dict().values()):
        assert torch.equal(x, y), name
    assert not torch.equal(a.lm_head.weight, c.lm_head.weight)


def test_save_then_load_restores_every_tensor(tmp_path):
    model = random_model(SMALL, seed=1)
    save_model(model, tmp_path)
    assert load_config(tmp_path) == SMALL
    back = load_model(tmp_path, dtype=torch.bfloat16)
    for name, t in model.state_dict().items():
        got = back.state_dict()[name]
        if name.endswith("e_score_correction_bias"):  # buffers stay float32
            assert got.dtype == torch.float32 and torch.equal(got, t)
        else:
            assert got.dtype == torch.bfloat16 and torch.equal(got, t.to(torch.bfloat16)), name
    assert back.rope.inv_freq.dtype == torch.float32


def test_missing_and_fp8_checkpoints_fail_with_the_fix(tmp_path):
    from safetensors.torch import save_file

    with pytest.raises(ConfigError, match="config.json"):
        load_model(tmp_path)
    save_model(random_model(SMALL), tmp_path)
    save_file({"model.layers.0.self_attn.o_proj.weight_scale_inv": torch.ones(1)}, str(tmp_path / "extra.safetensors"))
    with pytest.raises(ConfigError, match="fp8"):
        load_model(tmp_path)
    (tmp_path / "extra.safetensors").unlink()
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 3}))
    with pytest.raises(ConfigError, match="missing"):
        load_model(tmp_path)


def test_demo_model_is_created_once(tmp_path):
    path = demo_model_dir(seed=5, root=tmp_path)
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    assert demo_model_dir(seed=5, root=tmp_path) == path
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp
    assert load_config(path) == ModelConfig()


def test_transformers_loads_our_checkpoint(tmp_path):
    transformers = pytest.importorskip("transformers", reason="optional test dependency")
    save_model(random_model(SMALL, seed=2), tmp_path)
    hf, info = transformers.DeepseekV3ForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert hf.config.rope_parameters["rope_type"] == "yarn"
    assert hf.config.first_k_dense_replace == 1 and hf.config.n_routed_experts == SMALL.n_routed_experts
