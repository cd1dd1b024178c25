"""The mixture-of-experts part of a tiny Qwen3-MoE checkpoint: config keys, router and per-expert weights."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

# Router rows get a large gain so that top-k choices are well separated: a near-tie between two experts
# would let rounding differences between two implementations pick different experts.
ROUTER_GAIN = 4.0


@dataclass(frozen=True)
class MoeOptions:
    """Shape and routing of the experts, under the HF qwen3_moe config names."""

    num_experts: int = 8
    num_experts_per_tok: int = 2
    moe_intermediate_size: int = 32
    norm_topk_prob: bool = True
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()

    def validate(self) -> None:
        """Refuse options HF could not build a model from."""
        if not 0 < self.num_experts_per_tok <= self.num_experts:
            raise ValueError("num_experts_per_tok must be between 1 and num_experts")
        if self.decoder_sparse_step < 1:
            raise ValueError("decoder_sparse_step must be at least 1")

    def is_sparse(self, layer: int) -> bool:
        """Whether layer routes to experts (HF's rule)."""
        return layer not in self.mlp_only_layers and (layer + 1) % self.decoder_sparse_step == 0

    def config_entries(self) -> dict[str, Any]:
        """The config.json keys of a qwen3_moe model beyond the dense Qwen3 ones."""
        return {
            "num_experts": self.num_experts,
            "num_experts_per_tok": self.num_experts_per_tok,
            "moe_intermediate_size": self.moe_intermediate_size,
            "norm_topk_prob": self.norm_topk_prob,
            "decoder_sparse_step": self.decoder_sparse_step,
            "mlp_only_layers": list(self.mlp_only_layers),
            "output_router_logits": False,
            "router_aux_loss_coef": 0.001,
        }

    def weights(self, gen: torch.Generator, prefix: str, hidden_size: int, residual_gain: float) -> dict[str, Any]:
        """Router and per-expert gate/up/down tensors of one sparse layer, under HF checkpoint names."""

        def linear(out_features: int, in_features: int, gain: float = 1.0) -> torch.Tensor:
            return torch.randn(out_features, in_features, generator=gen) * (gain / math.sqrt(in_features))

        inter = self.moe_intermediate_size
        tensors = {prefix + "mlp.gate.weight": linear(self.num_experts, hidden_size, ROUTER_GAIN)}
        for expert in range(self.num_experts):
            p = f"{prefix}mlp.experts.{expert}."
            tensors[p + "gate_proj.weight"] = linear(inter, hidden_size)
            tensors[p + "up_proj.weight"] = linear(inter, hidden_size)
            tensors[p + "down_proj.weight"] = linear(hidden_size, inter, residual_gain)
        return tensors
