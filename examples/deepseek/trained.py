"""A tiny DeepSeek-V3 trained on a copy task, so that greedy decoding has confident answers.

Random weights give nearly flat logits: the top-1 / top-2 gap is often below bf16 rounding, so
a bf16-vs-reference token comparison of a random model measures coin flips, not the kernel. A
trained model is sure of its next token, which is what a ">= 99% greedy agreement" criterion
presumes.

The task needs attention over the cache. A sequence is

    [BOS, p_1 .. p_P, p_1, p_2, .., p_P, p_1, ..]

P distinct random tokens, then the same P tokens again and again (period P, fixed per model).
Every token after the first period is determined, and only by looking back: it is the token P
positions earlier, so the answer sits pages away from the query. (A variable period makes this
an induction task; small models learn that far more slowly — minutes on this CPU rather than
seconds — so the period is fixed and the prompts are ragged in how much of the repetition they
hold.)

The model is transformers' own `DeepseekV3ForCausalLM` (its forward and loss), trained in
float32 with AdamW until the accuracy on determined positions reaches the target, then saved
with save_pretrained, which `weights.load_model` reads.

    python -m kvpager.examples.deepseek.trained OUT_DIR [--small] [--device cpu]
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import time
from pathlib import Path

import torch

from kvpager.hub_kernels import import_transformers

log = logging.getLogger("kvpager")

BOS = 0  # ids 0 / 1 are bos / eos (ModelConfig's defaults); task tokens are 2 .. vocab - 1


@dataclasses.dataclass(frozen=True)
class CopyTask:
    vocab_size: int = 128   # 512 sat at chance for 100+ steps (CPU proxy, batch 4); 128 learns by ~100
    period: int = 50
    seq_len: int = 416      # training sequences, BOS included; prompts + new tokens fit in it

    def __post_init__(self) -> None:
        if not 2 <= self.period <= self.vocab_size - 2:
            raise ValueError(f"period={self.period} must be in 2 .. vocab_size - 2 = "
                             f"{self.vocab_size - 2} (a period has no repeated token)")
        if self.seq_len < self.period + 3:
            raise ValueError(f"seq_len={self.seq_len} leaves no determined token after a "
                             f"{self.period}-token period; use >= {self.period + 3}")


@dataclasses.dataclass(frozen=True)
class TrainSetting:
    """Model shape and optimisation. kv_lora_rank 512 and qk_rope_head_dim 64 are fixed (the
    576-wide latent kvpager pages); 16 heads is what the CUDA kernel takes."""
    task: CopyTask = CopyTask()
    hidden_size: int = 128
    intermediate_size: int = 256
    num_heads: int = 16
    qk_nope_head_dim: int = 16
    v_head_dim: int = 16
    moe: bool = True                # layer 1 MoE (4 routed experts, top-2, + a shared expert)
    batch_size: int = 32
    lr: float = 3e-3
    warmup_steps: int = 50
    max_steps: int = 1500
    eval_every: int = 50
    target_accuracy: float = 0.98


GPU = TrainSetting()
# The CPU test's setting: short sequences, a small vocab, few heads (the reference MLA takes any).
SMALL = TrainSetting(task=CopyTask(vocab_size=64, period=12, seq_len=40),
                     hidden_size=64, intermediate_size=128, num_heads=4, batch_size=32,
                     max_steps=1500, eval_every=25, target_accuracy=0.95)


def hf_config(s: TrainSetting):
    """The transformers DeepseekV3Config: 2 layers (dense, then MoE when s.moe), plain q_proj,
    YaRN rope (so the softmax scale carries an mscale factor)."""
    transformers = import_transformers()

    moe = dict(n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2, n_group=2, topk_group=2,
               first_k_dense_replace=1, moe_intermediate_size=s.intermediate_size // 2,
               routed_scaling_factor=1.0) if s.moe else dict(first_k_dense_replace=2)
    return transformers.DeepseekV3Config(
        vocab_size=s.task.vocab_size, hidden_size=s.hidden_size, intermediate_size=s.intermediate_size,
        num_hidden_layers=2, num_attention_heads=s.num_heads, num_key_value_heads=s.num_heads,
        q_lora_rank=None, kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=s.qk_nope_head_dim,
        v_head_dim=s.v_head_dim, max_position_embeddings=4 * s.task.seq_len, tie_word_embeddings=False,
        bos_token_id=BOS, eos_token_id=1, pad_token_id=None,
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                         "original_max_position_embeddings": s.task.seq_len, "beta_fast": 32,
                         "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
        **moe)


def copy_sequences(n: int, task: CopyTask, gen: torch.Generator) -> torch.Tensor:
    """n task sequences, int64 [n, seq_len]."""
    ids = torch.empty(n, task.seq_len, dtype=torch.long)
    ids[:, 0] = BOS
    pos = torch.arange(task.seq_len - 1) % task.period
    for i in range(n):
        ids[i, 1:] = (torch.randperm(task.vocab_size - 2, generator=gen)[:task.period] + 2)[pos]
    return ids


def copy_prompts(n: int, task: CopyTask, new_tokens: int, seed: int) -> list[list[int]]:
    """n prompts of ragged length: BOS, a period, then its first r tokens again (r random in
    1 .. seq_len - new_tokens - 1 - period, wrapping past the period's end), so every generated
    token is determined and len(prompt) + new_tokens <= task.seq_len."""
    gen = torch.Generator().manual_seed(seed)
    longest = task.seq_len - new_tokens - 1 - task.period
    if longest < 1:
        raise ValueError(f"seq_len={task.seq_len} has no room for a prompt and {new_tokens} new tokens")
    prompts = []
    for r in torch.randint(1, longest + 1, (n,), generator=gen).tolist():
        period = (torch.randperm(task.vocab_size - 2, generator=gen)[:task.period] + 2).tolist()
        prompts.append([BOS] + [period[i % task.period] for i in range(task.period + r)])
    return prompts


def determined(ids: torch.Tensor, task: CopyTask) -> torch.Tensor:
    """bool [n, seq_len]: the tokens fixed by the ones before them (after the first period)."""
    return (torch.arange(ids.shape[1], device=ids.device) > task.period)[None].expand_as(ids)


@torch.no_grad()
def accuracy(hf, task: CopyTask, n: int = 64, seed: int = 1) -> float:
    """Greedy next-token accuracy of `hf` on the determined tokens of n fresh sequences."""
    ids = copy_sequences(n, task, torch.Generator().manual_seed(seed)).to(hf.device)
    pred = hf(input_ids=ids).logits[:, :-1].argmax(-1)
    mask = determined(ids, task)[:, 1:]
    return (pred == ids[:, 1:])[mask].float().mean().item()


@dataclasses.dataclass
class TrainReport:
    steps: int
    accuracy: float     # on held-out sequences, determined tokens only
    loss: float
    seconds: float


def train(s: TrainSetting = GPU, device: str | torch.device = "cpu", seed: int = 0):
    """Train a fresh DeepseekV3ForCausalLM (float32, on device) until held-out accuracy reaches
    s.target_accuracy twice in a row (or s.max_steps). Returns (model in eval mode, TrainReport)."""
    transformers = import_transformers()

    torch.manual_seed(seed)
    with torch.device(device):
        hf = transformers.DeepseekV3ForCausalLM(hf_config(s))
    hf.train()
    opt = torch.optim.AdamW(hf.parameters(), lr=s.lr, betas=(0.9, 0.98), weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: min(1.0, (k + 1) / s.warmup_steps))
    gen = torch.Generator().manual_seed(seed + 1)
    start, acc, hits, loss = time.perf_counter(), 0.0, 0, math.nan
    for step in range(1, s.max_steps + 1):
        ids = copy_sequences(s.batch_size, s.task, gen).to(device)
        labels = ids.masked_fill(~determined(ids, s.task), -100)   # the first period is noise
        out = hf(input_ids=ids, labels=labels)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % s.eval_every == 0:
            hf.eval()
            acc, loss = accuracy(hf, s.task, seed=seed + 2), out.loss.item()
            hf.train()
            log.info("step %d: loss %.4f, held-out accuracy %.4f", step, loss, acc)
            hits = hits + 1 if acc >= s.target_accuracy else 0
            if hits == 2:
                break
    return hf.eval(), TrainReport(step, acc, loss, time.perf_counter() - start)


def train_and_save(model_dir: str | Path, s: TrainSetting = GPU, device: str | torch.device = "cpu",
                   seed: int = 0) -> TrainReport:
    """train(), then save_pretrained into model_dir (config.json + float32 model.safetensors)."""
    hf, report = train(s, device, seed)
    hf.save_pretrained(model_dir)
    return report


@torch.no_grad()
def hf_greedy(hf, prompts: list[list[int]], steps: int) -> tuple[list[list[int]], torch.Tensor]:
    """transformers' greedy decoding with its own KV cache, one prompt at a time: the tokens and
    the logits float32 CPU [len(prompts), steps, vocab]."""
    transformers = import_transformers()

    tokens, logits = [], []
    for prompt in prompts:
        cache = transformers.DynamicCache(config=hf.config)
        ids, out, rows = torch.tensor([prompt], device=hf.device), [], []
        for _ in range(steps):
            row = hf(input_ids=ids, past_key_values=cache, use_cache=True).logits[0, -1].float()
            rows.append(row.cpu())
            out.append(int(row.argmax()))
            ids = torch.tensor([[out[-1]]], device=hf.device)
        tokens.append(out)
        logits.append(torch.stack(rows))
    return tokens, torch.stack(logits)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out_dir")
    p.add_argument("--small", action="store_true", help="the CPU test's setting")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    r = train_and_save(args.out_dir, SMALL if args.small else GPU, args.device, args.seed)
    print(f"{r.steps} steps in {r.seconds:.1f} s: accuracy {r.accuracy:.4f} on determined tokens, "
          f"loss {r.loss:.4f}; saved to {args.out_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
