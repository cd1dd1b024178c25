"""Reading one weight for /get_weights_by_name the way upstream SGLang answers it.

Upstream takes a Hugging Face checkpoint name as well as a runtime one (`...q_proj.weight` is the q rows of this
rank's fused `qkv_proj`), truncates by rows, and returns weights that TP splits along their input dimension
(`o_proj`, `down_proj`) whole, joined over the ranks; without truncate_size, its first 100 rows. `raw` keeps this
fork's older reading: a runtime parameter exactly as TP rank 0 holds it, whole or truncated by elements of the
flattened tensor.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from sglang.srt.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from sglang.srt.layers.moe.layer import FusedMoE

# Largest answer, in elements over all TP ranks' parts (as JSON, about 20 bytes per element).
MAX_WEIGHT_ELEMENTS = 1 << 24
# Rows returned when the caller gives no truncate_size: upstream's default, which its own tests and tools rely on
# (they read an 8B model's 58M-element up_proj without one and slice what comes back).
UPSTREAM_TRUNCATE_ROWS = 100

# How a fused layer exposes one checkpoint projection (its shard id) inside its parameter on this rank.
ShardView = Callable[[Any, nn.Parameter, Any], torch.Tensor]
SHARD_VIEWS: dict[type[nn.Module], ShardView] = {
    QKVParallelLinear: lambda layer, param, shard: param.data.narrow(0, *layer.shard_rows(shard)),
    MergedColumnParallelLinear: lambda layer, param, shard: param.data.narrow(0, *layer.shard_rows(shard)),
    FusedMoE: lambda layer, param, shard: layer.expert_view(param, shard),
}

# (layer type, parameter) that TP splits along its last (input) dimension; upstream joins these over the ranks.
INPUT_SPLIT: tuple[tuple[type[nn.Module], str], ...] = ((RowParallelLinear, "weight"), (FusedMoE, "w2_weight"))


@dataclass(frozen=True)
class WeightPart:
    """One TP rank's part of a requested weight."""

    tensor: torch.Tensor
    # Dimension along which the ranks' parts join into the answer; None: rank 0's part is the answer.
    join_dim: int | None


def _view_for(layer: nn.Module) -> ShardView | None:
    return next((view for kind, view in SHARD_VIEWS.items() if isinstance(layer, kind)), None)


def _unknown(name: str) -> KeyError:
    return KeyError(
        f"no parameter named {name!r}: give a runtime name (see /remote_instance_weight_manifest) or a Hugging Face "
        "checkpoint name such as model.layers.0.self_attn.q_proj.weight"
    )


def find_weight(model: nn.Module, name: str, raw: bool = False) -> WeightPart:
    """This rank's part of weight `name` (runtime name, or unless raw a checkpoint name mapped onto its fused slice)."""
    shard_id = None
    try:
        # get_parameter follows a tied lm_head to the embedding, which named_parameters() lists only once.
        param = model.get_parameter(name)
        param_name = name
    except AttributeError:
        destination = getattr(model, "checkpoint_destination", None)
        if raw or destination is None:
            raise _unknown(name) from None
        param_name, shard_id = destination(name)
        if shard_id is None:
            raise _unknown(name) from None
        try:
            param = model.get_parameter(param_name)
        except AttributeError:
            raise _unknown(name) from None
    layer_name, _, leaf = param_name.rpartition(".")
    layer = model.get_submodule(layer_name)
    tensor = param.data
    if shard_id is not None:
        view = _view_for(layer)
        if view is None:
            raise _unknown(name)
        tensor = view(layer, param, shard_id)
    split = any(isinstance(layer, kind) and leaf == p for kind, p in INPUT_SPLIT)
    return WeightPart(tensor, tensor.dim() - 1 if split and not raw else None)


def read_weight(model: nn.Module, name: str, truncate_size: int | None, raw: bool, tp_size: int) -> dict[str, Any]:
    """This rank's answer: {"values": nested lists, "join_dim": int | None}; join_rank_answers makes the reply."""
    part = find_weight(model, name, raw)
    tensor = part.tensor
    if truncate_size is None and not raw:
        truncate_size = UPSTREAM_TRUNCATE_ROWS
    if truncate_size is not None:
        tensor = tensor.flatten()[:truncate_size] if raw else tensor[:truncate_size]
    ranks = tp_size if part.join_dim is not None else 1
    if tensor.numel() * ranks > MAX_WEIGHT_ELEMENTS:
        # A whole 128k-vocab embedding as JSON would take the server's memory with it (a truncate_size beyond
        # the tensor's size asks for all of it, so it counts the same).
        row = max(1, tensor[0].numel() * ranks) if tensor.dim() > 1 and not raw else ranks
        raise ValueError(
            f"{name} would return {tensor.numel() * ranks} elements, more than {MAX_WEIGHT_ELEMENTS} at once; "
            f"pass truncate_size <= {MAX_WEIGHT_ELEMENTS // row} ({'elements' if raw else 'rows'})"
        )
    return {"values": tensor.float().cpu().tolist(), "join_dim": part.join_dim}


def join_rank_answers(answers: list[dict[str, Any]]) -> list:
    """The reply from every TP rank's read_weight answer: rank 0's, or all ranks' parts joined."""
    join_dim = answers[0]["join_dim"]
    if join_dim is None:
        return answers[0]["values"]
    return torch.cat([torch.tensor(a["values"], dtype=torch.float32) for a in answers], dim=join_dim).tolist()
