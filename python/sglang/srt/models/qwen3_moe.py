"""Qwen3-MoE: Qwen3 attention with a routed mixture of experts in place of the dense MLP on sparse layers."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from sglang.srt.configs.hf_files import HFConfig
from sglang.srt.layers.linear import ReplicatedLinear
from sglang.srt.layers.moe import FusedMoE
from sglang.srt.layers.moe.layer import EXPERT_PROJECTIONS
from sglang.srt.models.llama import LlamaDecoderLayer
from sglang.srt.models.qwen3 import Qwen3DecoderLayer, Qwen3ForCausalLM


def is_sparse_layer(config: HFConfig, layer_id: int) -> bool:
    """Whether layer layer_id routes to experts: every decoder_sparse_step-th layer not in mlp_only_layers."""
    step = getattr(config, "decoder_sparse_step", 1) or 1
    return (
        layer_id not in (getattr(config, "mlp_only_layers", None) or [])
        and config.num_experts > 0
        and (layer_id + 1) % step == 0
    )


class Qwen3MoeSparseMoeBlock(nn.Module):
    """Router (`gate`, replicated) then the routed experts (`experts`), as upstream names them."""

    def __init__(self, config: HFConfig) -> None:
        super().__init__()
        if config.hidden_act != "silu":
            raise ValueError(f"hidden_act {config.hidden_act!r} is not supported; only 'silu' is implemented")
        self.gate = ReplicatedLinear(config.hidden_size, config.num_experts, bias=False)
        self.experts = FusedMoE(
            num_experts=config.num_experts,
            top_k=config.num_experts_per_tok,
            hidden_size=config.hidden_size,
            intermediate_size=config.moe_intermediate_size,
            renormalize=bool(getattr(config, "norm_topk_prob", True)),
        )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.experts(hidden_states, self.gate(hidden_states))


class Qwen3MoeDecoderLayer(Qwen3DecoderLayer):
    """Qwen3 decoder layer whose MLP is a sparse MoE block on sparse layers and dense elsewhere."""

    @staticmethod
    def make_mlp(config: HFConfig, layer_id: int) -> nn.Module:
        if is_sparse_layer(config, layer_id):
            return Qwen3MoeSparseMoeBlock(config)
        return LlamaDecoderLayer.make_mlp(config, layer_id)


class Qwen3MoeForCausalLM(Qwen3ForCausalLM):
    """Qwen3-MoE causal LM; per-expert checkpoint tensors load into each layer's stacked w13/w2."""

    layer_cls = Qwen3MoeDecoderLayer

    def checkpoint_destination(self, ckpt_name: str) -> tuple[str, Any]:
        # model.layers.L.mlp.experts.E.gate_proj.weight -> model.layers.L.mlp.experts.w13_weight, ("w1", E)
        parts = ckpt_name.split(".")
        if len(parts) >= 4 and parts[-4] == "experts" and parts[-3].isdigit() and parts[-2] in EXPERT_PROJECTIONS:
            param, shard = EXPERT_PROJECTIONS[parts[-2]]
            return ".".join([*parts[:-3], param]), (shard, int(parts[-3]))
        return super().checkpoint_destination(ckpt_name)

    def required_shards(self, param_name: str) -> set[Any]:
        if param_name.endswith((".experts.w13_weight", ".experts.w2_weight")):
            experts = self.get_submodule(param_name.rsplit(".", 1)[0])
            return experts.required_shards(param_name)
        return super().required_shards(param_name)
