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


def token_logprobs(logits: torch.Tensor, tokens: list[list[int]], top_n: list[int]
                   ) -> list[list[tuple[float, dict[int, float] | None]]]:
    """Log-probabilities of sampled tokens under the model's own distribution: log-softmax of
    the raw logits, before temperature / top-k / top-p (what OpenAI's `logprobs` and vLLM's
    default report, so a request's logprobs do not depend on how it samples).

    logits float [R, s_q, vocab]; tokens [R][s_q]; top_n[r]: how many most likely tokens to
    list for row r (0: none). Returns, per row and position, (logprob of the token, {token id:
    logprob} of the top_n[r] most likely, or None when top_n[r] is 0). One log-softmax and one
    topk over the R rows; only requests that asked for logprobs reach here."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    chosen = logp.gather(-1, torch.tensor(tokens, device=logits.device)[..., None])[..., 0].tolist()
    most = min(max(top_n), logp.shape[-1])
    top_values, top_ids = (logp.topk(most, dim=-1) if most else (None, None))
    if most:
        top_values, top_ids = top_values.tolist(), top_ids.tolist()
    out = []
    for r, n in enumerate(top_n):
        row = []
        for i, lp in enumerate(chosen[r]):
            top = dict(zip(top_ids[r][i][:n], top_values[r][i][:n])) if n else None
            row.append((lp, top))
        out.append(row)
    return out
