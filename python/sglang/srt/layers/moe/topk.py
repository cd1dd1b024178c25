"""Top-k expert selection from router logits."""

from __future__ import annotations

import torch


def select_experts(router_logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights float32 [T, top_k], expert ids int32 [T, top_k]) from softmax over [T, num_experts] logits.

    The softmax runs in float32 whatever the model dtype, as the reference implementation does, so that
    near-ties between experts resolve the same way; renormalize rescales the chosen weights to sum to 1
    (the model's norm_topk_prob).
    """
    probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids.to(torch.int32)
