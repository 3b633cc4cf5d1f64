"""MTP without a draft model: prompt-lookup drafting and the acceptance rule that keeps the
output exactly what one-token decoding would produce (Engine, num_speculative_tokens > 0)."""
from __future__ import annotations


def propose_drafts(token_ids: list[int], k: int, max_ngram: int = 3) -> list[int]:
    """Prompt-lookup drafting: find the most recent earlier occurrence of the last n tokens
    (n = max_ngram .. 1) and propose the k tokens that followed it; pad by repeating the last
    token. The search runs backwards at C speed (list.index over the reversed history), with
    Python work only per occurrence of the last token (a token-by-token scan is O(history)
    Python when nothing matches)."""
    if k == 0:
        return []
    size, last = len(token_ids), token_ids[-1]
    rev = token_ids[::-1]  # an occurrence ending at i starts at rev[size - 1 - i]
    for n in range(min(max_ngram, size - 1), 0, -1):
        tail, j = rev[:n], 1  # j >= 1: the occurrence ends before the last token
        while True:
            try:
                j = rev.index(last, j, size - n + 1)
            except ValueError:
                if j == 1 and last not in rev[size - n + 1:]:
                    return [last] * k  # the last token never occurred before: no n-gram will
                break
            if rev[j:j + n] == tail:
                follow = token_ids[size - j:size - j + k]
                return follow + [last] * (k - len(follow))
            j += 1
    return [last] * k


def accept_drafts(drafts: list[int], targets: list[int]) -> list[int]:
    """targets[i] is the token sampled after input i (the last token, then the drafts).
    Returns the tokens to emit: targets[0], then targets[i] while drafts[i-1] matched."""
    accepted = [targets[0]]
    for draft, target in zip(drafts, targets[1:]):
        if draft != accepted[-1]:
            break
        accepted.append(target)
    return accepted
