"""How each runtime tensor of a TP rank maps onto the full (unsharded) logical tensors of the checkpoint.

A layout is a pure function of (model config, dtype, tp_size, tp_rank): it is read off the layer objects of a
model skeleton through a registry keyed by layer class. A seed publishes its ranks' layouts so that a client
with a different --tp-size can work out which bytes of which seed rank it needs (see transfer_engine_reshard).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from sglang.srt.layers.linear import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)
from sglang.srt.layers.moe.layer import FusedMoE
from sglang.srt.layers.vocab_parallel_embedding import VocabParallelEmbedding
from sglang.srt.remote_instance.block_checksum import range_digests
from sglang.srt.remote_instance.manifest import weight_tensors

# A segment of at least BLOCKS * min_block_bytes() gets BLOCKS checksummed blocks, so that a client with up to
# BLOCKS times as many ranks can read its part in place and still check every byte against the seed's sums.
BLOCKS = 8
DEFAULT_MIN_BLOCK_BYTES = 64 << 10
# A strided shard is read whole through scratch: its blocks need only bound the scratch a client uses.
MAX_STRIDED_BLOCK_BYTES = 128 << 20


def min_block_bytes() -> int:
    """Smallest block worth its own checksum; SGLANG_RFORK_MIN_BLOCK_BYTES lowers it (tiny test models)."""
    return int(os.environ.get("SGLANG_RFORK_MIN_BLOCK_BYTES", DEFAULT_MIN_BLOCK_BYTES))


@dataclass(frozen=True)
class Segment:
    """Local positions [local, local + length) along the shard dim hold [start, start + length) of the
    logical tensor `name` (whose full length along that dim is `full`)."""

    name: str
    full: int
    start: int
    local: int
    length: int


@dataclass(frozen=True)
class ShardLayout:
    """One rank's tensor: its shape, the dim it is split along and the logical segments it holds there.

    Positions along `dim` that no segment covers are padding (the vocabulary rows past the real vocabulary):
    they hold zeros and exist on no other rank in a meaningful way.
    """

    shape: tuple[int, ...]
    dim: int
    segments: tuple[Segment, ...]
    replicated: bool = False

    @property
    def outer(self) -> int:
        """Number of independent slices before the shard dim (experts, output rows of a row-parallel weight)."""
        return math.prod(self.shape[: self.dim])

    @property
    def rows(self) -> int:
        """Length of this rank's tensor along the shard dim."""
        return self.shape[self.dim]

    @property
    def inner(self) -> int:
        """Elements after the shard dim per position along it."""
        return math.prod(self.shape[self.dim + 1 :])

    def logical_key(self) -> tuple:
        """What must be equal on two ranks for bytes of one to be placed in the other: split dim, the
        unsplit dims and every logical segment's full length."""
        rest = tuple(s for i, s in enumerate(self.shape) if i != self.dim)
        return (self.dim, rest, tuple(sorted({(s.name, s.full) for s in self.segments})))

    def to_json(self) -> dict[str, Any]:
        """The published form (segments as [name, full, start, local, length] lists)."""
        return {
            "shape": list(self.shape),
            "dim": self.dim,
            "replicated": self.replicated,
            "segments": [[s.name, s.full, s.start, s.local, s.length] for s in self.segments],
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ShardLayout:
        """Inverse of to_json; KeyError, TypeError or ValueError on a malformed entry."""
        segments = tuple(Segment(str(n), int(f), int(s), int(lo), int(ln)) for n, f, s, lo, ln in d["segments"])
        return cls(tuple(int(x) for x in d["shape"]), int(d["dim"]), segments, bool(d.get("replicated", False)))


LayoutFn = Callable[[nn.Module, str, torch.Tensor], ShardLayout]
LAYOUTS: dict[type, LayoutFn] = {}


def layout_for(cls: type) -> Callable[[LayoutFn], LayoutFn]:
    """Register the layout function of a layer class (subclasses inherit it unless they register their own)."""

    def wrap(fn: LayoutFn) -> LayoutFn:
        LAYOUTS[cls] = fn
        return fn

    return wrap


def replicated(t: torch.Tensor) -> ShardLayout:
    """Every rank holds the whole tensor (norms, routers, row-parallel biases)."""
    shape = tuple(t.shape) or (1,)
    return ShardLayout(shape, 0, (Segment("all", shape[0], 0, 0, shape[0]),), replicated=True)


def _split(t: torch.Tensor, dim: int, segments: list[Segment]) -> ShardLayout:
    return ShardLayout(tuple(t.shape), dim, tuple(segments))


@layout_for(ColumnParallelLinear)
def _column(layer: ColumnParallelLinear, param: str, t: torch.Tensor) -> ShardLayout:
    per = layer.output_size_per_partition
    return _split(t, 0, [Segment("out", per * layer.tp_size, layer.tp_rank * per, 0, per)])


@layout_for(MergedColumnParallelLinear)
def _merged(layer: MergedColumnParallelLinear, param: str, t: torch.Tensor) -> ShardLayout:
    segments = []
    for index, size in enumerate(layer.output_sizes):
        local, rows = layer.shard_rows(index)
        segments.append(Segment(str(index), size, layer.tp_rank * rows, local, rows))
    return _split(t, 0, segments)


@layout_for(QKVParallelLinear)
def _qkv(layer: QKVParallelLinear, param: str, t: torch.Tensor) -> ShardLayout:
    segments = []
    for name, full in zip("qkv", layer.total_sizes):
        local, rows = layer.shard_rows(name)
        # Replicated KV heads: ranks sharing a head group hold the same rows, as the weight loader gives them.
        shard_rank = layer.tp_rank if name == "q" else layer.tp_rank // layer.num_kv_head_replicas
        segments.append(Segment(name, full, shard_rank * rows, local, rows))
    return _split(t, 0, segments)


@layout_for(RowParallelLinear)
def _row(layer: RowParallelLinear, param: str, t: torch.Tensor) -> ShardLayout:
    if param == "bias":
        return replicated(t)
    per = layer.input_size_per_partition
    return _split(t, 1, [Segment("in", per * layer.tp_size, layer.tp_rank * per, 0, per)])


@layout_for(VocabParallelEmbedding)
def _vocab(layer: VocabParallelEmbedding, param: str, t: torch.Tensor) -> ShardLayout:
    real = max(0, min(layer.vocab_end_index, layer.org_vocab_size) - layer.vocab_start_index)
    segments = [Segment("vocab", layer.org_vocab_size, layer.vocab_start_index, 0, real)] if real else []
    return _split(t, 0, segments)


@layout_for(FusedMoE)
def _experts(layer: FusedMoE, param: str, t: torch.Tensor) -> ShardLayout:
    per = layer.intermediate_size_per_partition
    full, start = per * layer.tp_size, layer.tp_rank * per
    if param == "w13_weight":  # [E, gate rows then up rows, H]
        return _split(t, 1, [Segment("w1", full, start, 0, per), Segment("w3", full, start, per, per)])
    return _split(t, 2, [Segment("w2", full, start, 0, per)])  # w2_weight [E, H, I]


def model_layouts(model: nn.Module) -> dict[str, ShardLayout]:
    """Layout of every transferred tensor of this rank, keyed like weight_tensors (unregistered layers are
    replicated: their parameters do not depend on the TP size)."""
    modules = dict(model.named_modules())
    out: dict[str, ShardLayout] = {}
    for name, t in weight_tensors(model):
        owner, _, param = name.rpartition(".")
        module = modules[owner]
        fn = next((LAYOUTS[c] for c in type(module).__mro__ if c in LAYOUTS), None)
        out[name] = replicated(t) if fn is None else fn(module, param, t)
    return out


def block_bounds(layout: ShardLayout, element_size: int) -> list[int]:
    """Byte offsets cutting this rank's tensor into checksummed blocks (first 0, last the tensor's size).

    Blocks never straddle a segment edge, so a client reading a segment's rows in place can check them; a
    tensor split along an inner dim (its shard is strided) is cut between its outer slices, into as few blocks
    as keep each under MAX_STRIDED_BLOCK_BYTES.
    """
    row = layout.inner * element_size
    if layout.outer == 1:
        cuts = {0, layout.rows}
        for s in layout.segments:
            parts = _parts(s.length * row, s.length)
            cuts.update(s.local + s.length * k // parts for k in range(parts + 1))
        return sorted(c * row for c in cuts)
    slice_bytes = layout.rows * row
    parts = min(layout.outer, -(-layout.outer * slice_bytes // MAX_STRIDED_BLOCK_BYTES))
    return [layout.outer * k // parts * slice_bytes for k in range(parts + 1)]


def _parts(nbytes: int, units: int) -> int:
    return min(BLOCKS, units) if nbytes >= BLOCKS * min_block_bytes() else 1


def published_layout(model: nn.Module, tp_rank: int, tp_size: int) -> dict[str, Any]:
    """What a seed rank publishes beside upstream's keys: its TP facts and, per tensor, the layout and the
    block_checksum digest of each block [start_byte, end_byte, digest] (from this rank's own bytes)."""
    tensors = dict(weight_tensors(model))
    layouts = model_layouts(model)
    ranges: list[tuple[torch.Tensor, int, int]] = []
    spans: list[tuple[str, int, int]] = []
    for name, layout in layouts.items():
        t = tensors[name]
        if t.numel() == 0:
            continue
        raw = t.reshape(-1).view(torch.uint8)
        bounds = block_bounds(layout, t.element_size())
        for lo, hi in zip(bounds, bounds[1:]):
            if hi > lo:
                ranges.append((raw, lo, hi))
                spans.append((name, lo, hi))
    sums = range_digests(ranges)
    blocks: dict[str, list[list[Any]]] = {name: [] for name in layouts}
    for (name, lo, hi), digest in zip(spans, sums):
        blocks[name].append([lo, hi, digest])
    return {
        "tp_size": tp_size,
        "tp_rank": tp_rank,
        "tensors": {name: {**layout.to_json(), "blocks": blocks[name]} for name, layout in layouts.items()},
    }
