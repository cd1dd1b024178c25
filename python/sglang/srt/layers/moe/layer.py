"""FusedMoE: every expert of one layer held as two stacked tensors, sharded along the intermediate dimension."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from sglang.srt.distributed import get_tp_rank, get_tp_size, tensor_model_parallel_all_reduce
from sglang.srt.layers.linear import divide
from sglang.srt.layers.moe.topk import select_experts
from sglang.srt.layers.moe.torch_experts import torch_experts
from sglang.srt.model_loader.weight_utils import WeightLoadingError, default_weight_loader

ExpertsFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

# Checkpoint projection -> (stacked parameter, shard name); upstream's w1/w3/w2 names for gate/up/down.
EXPERT_PROJECTIONS: dict[str, tuple[str, str]] = {
    "gate_proj": ("w13_weight", "w1"),
    "up_proj": ("w13_weight", "w3"),
    "down_proj": ("w2_weight", "w2"),
}
# The Triton kernel is written for these; float32 on CUDA takes it too (exact fp32 dot products).
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def experts_fn_for(x: torch.Tensor) -> ExpertsFn:
    """The expert implementation for activations x: the fused Triton kernels on CUDA, torch elsewhere."""
    if x.is_cuda and x.dtype in _TRITON_DTYPES:
        from sglang.srt.layers.moe.fused_moe_triton import triton_experts

        return triton_experts
    return torch_experts


class FusedMoE(nn.Module):
    """Routed experts of one layer: w13_weight [E, 2 * I/tp, H] (gate rows then up rows), w2_weight [E, H, I/tp].

    Each TP rank holds every expert's slice of the intermediate dimension, so a token's partial outputs
    are summed across ranks by one all-reduce, as for a row-parallel linear.
    """

    def __init__(
        self, num_experts: int, top_k: int, hidden_size: int, intermediate_size: int, renormalize: bool
    ) -> None:
        super().__init__()
        if not 0 < top_k <= num_experts:
            raise ValueError(f"num_experts_per_tok {top_k} must be between 1 and num_experts {num_experts}")
        self.tp_rank, self.tp_size = get_tp_rank(), get_tp_size()
        self.num_experts, self.top_k, self.renormalize = num_experts, top_k, renormalize
        self.intermediate_size_per_partition = divide(intermediate_size, self.tp_size)
        shard = self.intermediate_size_per_partition
        self.w13_weight = nn.Parameter(torch.empty(num_experts, 2 * shard, hidden_size), requires_grad=False)
        self.w2_weight = nn.Parameter(torch.empty(num_experts, hidden_size, shard), requires_grad=False)
        self.w13_weight.weight_loader = self.weight_loader
        self.w2_weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: tuple[str, int]) -> None:
        """Copy this rank's slice of one expert's checkpoint projection; shard_id is (w1|w3|w2, expert id)."""
        name = shard_id[0]
        size = self.intermediate_size_per_partition
        # gate_proj and up_proj are [I, H] (split rows); down_proj is [H, I] (split columns).
        dim = 1 if name == "w2" else 0
        if loaded_weight.dim() != 2 or loaded_weight.shape[dim] != size * self.tp_size:
            raise WeightLoadingError(
                f"expert {name} tensor of shape {tuple(loaded_weight.shape)} does not have "
                f"{size * self.tp_size} intermediate channels along dim {dim}"
            )
        shard = loaded_weight.narrow(dim, self.tp_rank * size, size)
        default_weight_loader(self.expert_view(param, shard_id), shard)

    def expert_view(self, param: nn.Parameter, shard_id: tuple[str, int]) -> torch.Tensor:
        """This rank's part of one expert's projection inside param; shard_id is (w1|w3|w2, expert id)."""
        name, expert = shard_id
        if not 0 <= expert < self.num_experts:
            raise WeightLoadingError(f"expert {expert} is out of range: the model has {self.num_experts} experts")
        target = param.data[expert]
        size = self.intermediate_size_per_partition
        if name == "w1":
            return target.narrow(0, 0, size)
        if name == "w3":
            return target.narrow(0, size, size)
        return target

    def required_shards(self, param_name: str) -> set[tuple[str, int]]:
        """Every (shard, expert) that loading must fill for w13_weight or w2_weight."""
        names = ("w2",) if param_name.endswith("w2_weight") else ("w1", "w3")
        return {(name, expert) for name in names for expert in range(self.num_experts)}

    def forward(self, hidden_states: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        """Route each token of hidden_states [T, H] to its top-k experts and sum their weighted outputs."""
        topk_weights, topk_ids = select_experts(router_logits, self.top_k, self.renormalize)
        out = experts_fn_for(hidden_states)(hidden_states, self.w13_weight, self.w2_weight, topk_weights, topk_ids)
        return tensor_model_parallel_all_reduce(out)
