"""Token selection from logits: greedy, or temperature / top-k / top-p with a per-request
torch.Generator (so a request's samples do not depend on which batch it ran in)."""
from __future__ import annotations

import torch

from kvpager.runtime.request import SamplingParams


def make_generator(params: SamplingParams, device: torch.device | str = "cpu") -> torch.Generator | None:
    """A seeded generator for sampled requests; None for greedy ones (they need none)."""
    if params.greedy:
        return None
    gen = torch.Generator(device=device)
    if params.seed is None:
        gen.seed()
    else:
        gen.manual_seed(params.seed)
    return gen


def sample_row(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """One token from logits float [vocab]."""
    if params.greedy:
        return int(torch.argmax(logits))
    logits = logits.float() / params.temperature
    if 0 < params.top_k < logits.numel():
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        # keep the smallest prefix whose mass reaches top_p (always at least one token)
        drop = torch.cumsum(sorted_probs, 0) - sorted_probs >= params.top_p
        sorted_probs[drop] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))


def sample_batch(
    logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]
) -> list[list[int]]:
    """Tokens for logits float [B, s_q, vocab]: one argmax for every greedy row together,
    then one sampled row at a time. Returns B lists of s_q token ids."""
    greedy = torch.argmax(logits, dim=-1).tolist()  # [B][s_q]
    for b, p in enumerate(params):
        if not p.greedy:
            greedy[b] = [sample_row(logits[b, i], p, generators[b]) for i in range(logits.shape[1])]
    return greedy
