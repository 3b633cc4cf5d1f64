"""Token selection from logits: greedy, or temperature / top-k / top-p with a per-request
torch.Generator (so a request's samples do not depend on which batch it ran in)."""
from __future__ import annotations

import logging

import torch

from kvpager.runtime.request import SamplingParams

logger = logging.getLogger("kvpager")


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
    logits: torch.Tensor, params: list[SamplingParams] | None,
    generators: list[torch.Generator | None] | None = None,
) -> tuple[list[list[int]], list[int]]:
    """Tokens for logits float [B, s_q, vocab]: one max over every row together (the greedy
    tokens), then one sampled row at a time (params=None: every row is greedy). Returns B lists
    of s_q token ids and the rows that have no token: NaN logits (a broken model; the row max
    is NaN exactly then), or a sampler that raised (e.g. +inf logits at a temperature). The
    caller ends those requests; the other rows are unaffected. Cost beyond an argmax: one
    isnan over [B, s_q]."""
    values, tokens = logits.max(dim=-1)
    broken = torch.isnan(values).any(dim=-1)
    bad = broken.nonzero().view(-1).tolist() if bool(broken.any()) else []
    out = tokens.tolist()  # [B][s_q]
    if params is None:
        return out, bad
    for b, p in enumerate(params):
        if p.greedy or b in bad:
            continue
        try:
            out[b] = [sample_row(logits[b, i], p, generators[b]) for i in range(logits.shape[1])]
        except Exception:  # one broken row must not take the batch down
            logger.exception("sampling row %d failed; its request ends with 'error'", b)
            bad.append(b)
    return out, bad
