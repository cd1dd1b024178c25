"""Reference expert computation in plain torch: one pair of matmuls per expert that has tokens.

It reads the per-expert token counts on the host, so it is the CPU path and the GPU reference, never
captured in a CUDA graph.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def torch_experts(
    hidden_states: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
) -> torch.Tensor:
    """sum_k weight_k * w2[e_k] @ (silu(gate) * up)(w13[e_k] @ x) for every token of hidden_states [T, H]."""
    top_k = topk_ids.shape[1]
    flat_ids = topk_ids.flatten().long()
    flat_weights = topk_weights.flatten().to(hidden_states.dtype)
    # Stable sort: routes of one expert stay in token order, so the per-expert gathers are contiguous slices.
    order = torch.argsort(flat_ids, stable=True)
    counts = torch.bincount(flat_ids, minlength=w13.shape[0]).tolist()
    out = torch.zeros_like(hidden_states)
    start = 0
    for expert, count in enumerate(counts):
        if count == 0:
            continue
        routes = order[start : start + count]
        start += count
        tokens = routes // top_k
        gate, up = F.linear(hidden_states[tokens], w13[expert]).chunk(2, dim=-1)
        expert_out = F.linear(F.silu(gate) * up, w2[expert]) * flat_weights[routes, None]
        # Experts are visited in ascending order, as the HF reference does, so sums round the same way.
        out.index_add_(0, tokens, expert_out)
    return out
