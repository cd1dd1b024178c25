"""Tensor-parallel linear layers whose parameters know how to take their shard from a full checkpoint tensor."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sglang.srt.distributed import (
    get_tp_rank,
    get_tp_size,
    tensor_model_parallel_all_gather,
    tensor_model_parallel_all_reduce,
)
from sglang.srt.model_loader.weight_utils import WeightLoadingError, default_weight_loader


def divide(numerator: int, denominator: int) -> int:
    """Exact integer division, with an error naming both numbers when it is not exact."""
    if numerator % denominator:
        raise ValueError(f"{numerator} is not divisible by the tensor-parallel size {denominator}")
    return numerator // denominator


def _new_param(*shape: int) -> nn.Parameter:
    # Inference only: no gradients, and the loaders write through .data without autograd bookkeeping.
    return nn.Parameter(torch.empty(*shape), requires_grad=False)


def _narrow_checked(loaded: torch.Tensor, dim: int, start: int, size: int) -> torch.Tensor:
    if loaded.shape[dim] < start + size:
        raise WeightLoadingError(
            f"checkpoint tensor of shape {tuple(loaded.shape)} is too small along dim {dim} "
            f"for the shard [{start}, {start + size})"
        )
    return loaded.narrow(dim, start, size)


class ColumnParallelLinear(nn.Module):
    """y = xA^T + b with A split along its output rows; each rank holds output_size / tp rows."""

    def __init__(self, input_size: int, output_size: int, bias: bool = True, gather_output: bool = False) -> None:
        super().__init__()
        self.tp_rank, self.tp_size = get_tp_rank(), get_tp_size()
        self.input_size = input_size
        self.output_size_per_partition = divide(output_size, self.tp_size)
        self.gather_output = gather_output
        self.weight = _new_param(self.output_size_per_partition, input_size)
        self.weight.weight_loader = self.weight_loader
        self.bias = _new_param(self.output_size_per_partition) if bias else None
        if self.bias is not None:
            self.bias.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: Any = None) -> None:
        """Copy this rank's rows of a full [output_size, ...] checkpoint tensor."""
        size = param.shape[0]
        default_weight_loader(param, _narrow_checked(loaded_weight, 0, self.tp_rank * size, size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        return tensor_model_parallel_all_gather(out, dim=-1) if self.gather_output else out


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections of the same input fused into one matmul (e.g. gate and up)."""

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool = True) -> None:
        self.output_sizes = list(output_sizes)
        super().__init__(input_size, sum(output_sizes), bias=bias)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: Any = None) -> None:
        """Load projection number shard_id, or with shard_id None a tensor already fused in checkpoint order."""
        if shard_id is None:
            for index, part in enumerate(torch.split(loaded_weight, self.output_sizes, dim=0)):
                self.weight_loader(param, part, index)
            return
        offset, size = self.shard_rows(shard_id)
        shard = _narrow_checked(loaded_weight, 0, self.tp_rank * size, size)
        default_weight_loader(param.data.narrow(0, offset, size), shard)

    def shard_rows(self, shard_id: Any) -> tuple[int, int]:
        """(offset, rows) of projection number shard_id within this rank's fused weight."""
        if not isinstance(shard_id, int) or not 0 <= shard_id < len(self.output_sizes):
            raise WeightLoadingError(f"shard id {shard_id!r} is not one of 0..{len(self.output_sizes) - 1}")
        size = divide(self.output_sizes[shard_id], self.tp_size)
        return divide(sum(self.output_sizes[:shard_id]), self.tp_size), size


class QKVParallelLinear(ColumnParallelLinear):
    """Fused q/k/v projection split by heads; KV heads are replicated when there are fewer than TP ranks."""

    def __init__(
        self,
        hidden_size: int,
        head_size: int,
        total_num_heads: int,
        total_num_kv_heads: int,
        bias: bool = True,
    ) -> None:
        tp_size = get_tp_size()
        self.head_size = head_size
        self.num_heads = divide(total_num_heads, tp_size)
        if tp_size >= total_num_kv_heads:
            self.num_kv_heads = 1
            self.num_kv_head_replicas = divide(tp_size, total_num_kv_heads)
        else:
            self.num_kv_heads = divide(total_num_kv_heads, tp_size)
            self.num_kv_head_replicas = 1
        self.q_size = self.num_heads * head_size
        self.kv_size = self.num_kv_heads * head_size
        self.total_sizes = [
            total_num_heads * head_size,
            total_num_kv_heads * head_size,
            total_num_kv_heads * head_size,
        ]
        # The fused output holds this rank's q, k and v heads; replicated KV heads count once per rank.
        super().__init__(hidden_size, (self.q_size + 2 * self.kv_size) * tp_size, bias=bias)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: Any = None) -> None:
        """Load "q", "k" or "v", or with shard_id None a tensor already fused as [q; k; v]."""
        if shard_id is None:
            for name, part in zip("qkv", torch.split(loaded_weight, self.total_sizes, dim=0)):
                self.weight_loader(param, part, name)
            return
        offset, size = self.shard_rows(shard_id)
        shard_rank = self.tp_rank if shard_id == "q" else self.tp_rank // self.num_kv_head_replicas
        shard = _narrow_checked(loaded_weight, 0, shard_rank * size, size)
        default_weight_loader(param.data.narrow(0, offset, size), shard)

    def shard_rows(self, shard_id: Any) -> tuple[int, int]:
        """(offset, rows) of "q", "k" or "v" within this rank's fused weight."""
        if shard_id == "q":
            return 0, self.q_size
        if shard_id in ("k", "v"):
            return (self.q_size if shard_id == "k" else self.q_size + self.kv_size), self.kv_size
        raise WeightLoadingError(f"shard id {shard_id!r} is not one of 'q', 'k', 'v'")


class RowParallelLinear(nn.Module):
    """y = xA^T + b with A split along its input columns; partial outputs are summed over TP ranks."""

    def __init__(self, input_size: int, output_size: int, bias: bool = True) -> None:
        super().__init__()
        self.tp_rank, self.tp_size = get_tp_rank(), get_tp_size()
        self.input_size_per_partition = divide(input_size, self.tp_size)
        self.output_size = output_size
        self.weight = _new_param(output_size, self.input_size_per_partition)
        self.weight.weight_loader = self.weight_loader
        # The bias is replicated and added once, after the reduction.
        self.bias = _new_param(output_size) if bias else None
        if self.bias is not None:
            self.bias.weight_loader = default_weight_loader

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: Any = None) -> None:
        """Copy this rank's columns of a full [output_size, input_size] checkpoint tensor."""
        size = param.shape[1]
        default_weight_loader(param, _narrow_checked(loaded_weight, 1, self.tp_rank * size, size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = tensor_model_parallel_all_reduce(F.linear(x, self.weight))
        return out if self.bias is None else out + self.bias


class ReplicatedLinear(nn.Module):
    """y = xA^T + b with the whole weight on every rank (small projections such as an MoE router)."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False) -> None:
        super().__init__()
        self.weight = _new_param(output_size, input_size)
        self.bias = _new_param(output_size) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)
