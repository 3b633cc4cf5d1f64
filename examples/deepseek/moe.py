"""DeepSeek-V3 mixture of experts: sigmoid scores, the auxiliary-loss-free (noaux_tc) group-limited
top-k router, routed experts weighted by normalised scores x routed_scaling_factor, plus the
always-on shared experts."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .layers import MLP


class Router(nn.Module):
    """Scores each token against every expert; picks top-k among the top groups."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(cfg.n_routed_experts, cfg.hidden_size))
        # Selection-only bias (balances load); never scales an output. Kept in float32.
        self.register_buffer("e_score_correction_bias", torch.zeros(cfg.n_routed_experts))
        self.top_k, self.n_group, self.topk_group = cfg.num_experts_per_tok, cfg.n_group, cfg.topk_group
        self.norm_topk_prob, self.scale = cfg.norm_topk_prob, cfg.routed_scaling_factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [n, hidden] -> dense routing weights float32 [n, n_experts] (zero where unrouted)."""
        scores = F.linear(x.float(), self.weight.float()).sigmoid()
        choice = scores + self.e_score_correction_bias.float()
        n, n_experts = choice.shape
        grouped = choice.view(n, self.n_group, n_experts // self.n_group)
        group_scores = grouped.topk(2, dim=-1).values.sum(-1)                 # [n, n_group]
        top_groups = group_scores.topk(self.topk_group, dim=-1, sorted=False).indices
        keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, top_groups, True)
        choice = grouped.masked_fill(~keep[:, :, None], float("-inf")).view(n, n_experts)
        idx = choice.topk(self.top_k, dim=-1, sorted=False).indices
        w = scores.gather(1, idx)
        if self.norm_topk_prob:
            w = w / (w.sum(-1, keepdim=True) + 1e-20)
        return torch.zeros_like(scores).scatter_(1, idx, w * self.scale)


class MoE(nn.Module):
    """[n, hidden] -> [n, hidden]: sum over routed experts of weight x expert(x), + shared(x).

    Every expert runs on every token, multiplied by a weight that is zero unless routed: no
    data-dependent shapes, so the decode step can be captured in a CUDA graph. That costs
    n_routed_experts / num_experts_per_tok more expert FLOPs than a grouped GEMM would, which is
    fine for the small demo models this example targets (not for 256-expert V3)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate = Router(cfg)
        self.experts = nn.ModuleList(MLP(cfg.hidden_size, cfg.moe_intermediate_size)
                                     for _ in range(cfg.n_routed_experts))
        self.shared_experts = MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights = self.gate(x)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):  # expert order: the same sums as transformers
            out += expert(x) * weights[:, e:e + 1].to(x.dtype)
        return out + self.shared_experts(x)
