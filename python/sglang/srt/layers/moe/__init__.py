"""Mixture-of-experts layers: top-k routing, stacked expert weights, a torch path and a fused Triton path."""

from sglang.srt.layers.moe.layer import FusedMoE
from sglang.srt.layers.moe.topk import select_experts

__all__ = ["FusedMoE", "select_experts"]
