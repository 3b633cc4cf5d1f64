"""Oracle: our DeepSeek-V3 through kvpager's engine (paged latent cache, reference MLA, chunked
prefill, continuous batching) against transformers' DeepseekV3ForCausalLM, float32 on CPU.

The HF model has YaRN rope scaling (with mscale in the softmax scale), interleaved rope dims,
a q LoRA, one dense layer then MoE layers with a grouped noaux_tc router (random correction
bias) and a shared expert. Requests join and leave the running batch midway."""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip(
    "transformers", reason="the oracle needs transformers (an optional test dependency: pip install transformers)")

from kvpager.config import CacheConfig  # noqa: E402
from kvpager.examples.deepseek.weights import load_model  # noqa: E402
from kvpager.runtime.engine import Engine  # noqa: E402
from kvpager.runtime.request import SamplingParams  # noqa: E402
from kvpager.runtime.scheduler import SchedulerConfig  # noqa: E402

VOCAB = 1024
TOL = 1e-4


def hf_config():
    return transformers.DeepseekV3Config(
        vocab_size=VOCAB, hidden_size=256, intermediate_size=384, moe_intermediate_size=96,
        num_hidden_layers=3, num_attention_heads=16, num_key_value_heads=16, q_lora_rank=128,
        kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=32, v_head_dim=48,
        n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=4, topk_group=2,
        first_k_dense_replace=1, routed_scaling_factor=2.5, max_position_embeddings=8192,
        initializer_range=0.1, tie_word_embeddings=False,
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 8.0,
                         "original_max_position_embeddings": 1024, "beta_fast": 32, "beta_slow": 1,
                         "mscale": 1.0, "mscale_all_dim": 0.707},
    )


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    torch.manual_seed(0)
    hf = transformers.DeepseekV3ForCausalLM(hf_config()).eval()
    with torch.no_grad():  # HF initialises the selection bias to zero; exercise it
        for layer in hf.model.layers[1:]:
            layer.mlp.gate.e_score_correction_bias.normal_(0.0, 0.05)
    path = tmp_path_factory.mktemp("deepseek_v3_tiny")
    hf.save_pretrained(path)
    return hf, load_model(path)


def hf_greedy(hf, prompt: list[int], steps: int) -> tuple[list[int], torch.Tensor]:
    """transformers' own KV cache, one request at a time: tokens and logits float32 [steps, vocab]."""
    cache = transformers.DynamicCache(config=hf.config)
    ids, tokens, logits = torch.tensor([prompt]), [], []
    with torch.no_grad():
        for _ in range(steps):
            row = hf(input_ids=ids, past_key_values=cache, use_cache=True).logits[0, -1].float()
            logits.append(row)
            tokens.append(int(row.argmax()))
            ids = torch.tensor([[tokens[-1]]])
    return tokens, torch.stack(logits)


class Recorder:
    """The model Protocol around ours, recording every logits row handed to the engine."""

    def __init__(self, model):
        self.model = model
        self.num_layers, self.num_heads = model.num_layers, model.num_heads
        self.vocab_size, self.device = model.vocab_size, model.device
        self.logits: dict[str, list[torch.Tensor]] = {}
        self.batches: list[tuple[str, ...]] = []
        self.prefill_chunks: list[tuple[str, int]] = []
        self.prefill_batches: list[tuple[int, ...]] = []  # query_lens of each prefill call

    def prefill(self, batch, pool):
        self.prefill_chunks += zip(batch.request_ids, batch.query_lens)
        self.prefill_batches.append(tuple(batch.query_lens))
        out = self.model.prefill(batch, pool)
        for b, row in zip(batch.logits_rows.tolist(), out):
            self.logits.setdefault(batch.request_ids[b], []).append(row.clone())
        return out

    def decode(self, batch, pool):
        out = self.model.decode(batch, pool)
        self.batches.append(tuple(batch.request_ids))
        for b, rid in enumerate(batch.request_ids):
            self.logits.setdefault(rid, []).append(out[b, 0].clone())
        return out


# (request id, prompt length, new tokens, step at which it is submitted)
REQUESTS = [("a", 5, 40, 0), ("b", 70, 12, 0), ("c", 17, 36, 0), ("d", 64, 34, 6), ("e", 1, 32, 20)]


def test_greedy_tokens_and_logits_match_transformers(models):
    hf, ours = models
    gen = torch.Generator().manual_seed(1)
    prompts = {rid: torch.randint(2, VOCAB, (n,), generator=gen).tolist() for rid, n, _, _ in REQUESTS}
    model = Recorder(ours)
    # A 48-token step budget splits the 64/70-token prompts into chunks (causal prefill at an offset);
    # padding up to half a prefill call lets chunks of very different lengths share one (the
    # shorter rows' padding columns see no key at all).
    engine = Engine(model, CacheConfig(num_layers=ours.num_layers, num_pages=32, dtype="float32"),
                    SchedulerConfig(max_batch_size=4, max_num_batched_tokens=48, max_model_len=256,
                                    max_prefill_padding=0.5))
    handles, step = {}, 0
    while len(handles) < len(REQUESTS) or not all(h.finished for h in handles.values()):
        for rid, _, new, at in REQUESTS:
            if at == step:
                handles[rid] = engine.submit(prompts[rid], SamplingParams(max_new_tokens=new), request_id=rid)
        engine.step()
        step += 1

    worst = 0.0
    for rid, _, new, _ in REQUESTS:
        want_tokens, want_logits = hf_greedy(hf, prompts[rid], new)
        assert handles[rid].output_token_ids == want_tokens, f"request {rid} diverged from transformers"
        got = torch.stack(model.logits[rid])
        assert got.shape == want_logits.shape
        diff = (got - want_logits).abs().max().item()
        worst = max(worst, diff)
        assert diff < TOL, f"request {rid}: max |logit diff| {diff:.2e} >= {TOL}"
    print(f"max |logit diff| vs transformers: {worst:.2e} over {sum(r[2] for r in REQUESTS)} tokens")

    # The batch really changed under the requests: d joined a, c running; b left before; e later.
    assert any({"a", "c", "d"} <= set(b) for b in model.batches)
    assert any("b" in b for b in model.batches) and not any("b" in b and "e" in b for b in model.batches)
    assert any("e" in b and "a" in b for b in model.batches)
    assert any(n < len(prompts[rid]) for rid, n in model.prefill_chunks), "no chunked prefill happened"
    # Batched prefill with left padding: one call carried chunks of different lengths.
    assert any(len(set(lens)) > 1 for lens in model.prefill_batches), model.prefill_batches


def test_prefix_caching_gives_the_same_tokens(models):
    """Caching on vs off, greedy, token for token, with the DeepSeek model: prompts that share a
    100-token prefix (its second page matched mid-page and copied), a prompt cached whole, and
    one extending a finished request (a chat turn); the second wave also against transformers."""
    hf, ours = models
    gen = torch.Generator().manual_seed(2)
    shared = torch.randint(2, VOCAB, (100,), generator=gen).tolist()
    first = [shared + torch.randint(2, VOCAB, (40,), generator=gen).tolist()]
    second = [shared + [7, 8, 9], first[0][:128], first[0]]
    params = SamplingParams(max_new_tokens=6)

    def run(caching):
        engine = Engine(ours, CacheConfig(num_layers=ours.num_layers, num_pages=32, dtype="float32"),
                        SchedulerConfig(max_batch_size=4, max_num_batched_tokens=64, max_model_len=256,
                                        enable_prefix_caching=caching), full_metrics=True)
        out = [list(o.token_ids) for o in engine.generate(first, params)]
        out += [list(o.token_ids) for o in engine.generate(second + [first[0] + out[0] + [5]], params)]
        return out, engine.metrics.summary()["prefix_hit_tokens"]

    (off, no_hits), (on, hits) = run(False), run(True)
    assert on == off
    assert no_hits == 0 and hits >= 100 + 127 + 128 + 128
    for prompt, got in zip(second[:2], on[1:3]):
        assert got == hf_greedy(hf, prompt, len(got))[0]
