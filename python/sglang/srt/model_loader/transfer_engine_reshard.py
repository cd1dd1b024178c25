"""Read planning for a TransferEngine fork into another --tp-size: which bytes of which seed rank land where.

A client rank compares its own shard layout with every seed rank's published one and, per tensor, covers each
logical segment it holds with pieces of seed ranks' segments. A piece along the first dim whose seed bytes are
whole checksummed blocks is read straight into place; anything else (pieces of a strided shard, such as a
row-parallel weight split along its columns, or a piece cutting a block) goes through a bounded scratch buffer,
is checked there block by block against the seed's checksums and is then copied into place with torch.
Running a plan is transfer_engine_reshard_read's job.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from sglang.srt.remote_instance.block_checksum import digest_values
from sglang.srt.remote_instance.shard_layout import ShardLayout

# Staged reads are placed in scratch at multiples of this, so that scatter can copy in wide words.
ALIGN = 256


class ReshardError(ValueError):
    """The seed's layout cannot produce this rank's tensors (message says which tensor and why)."""


@dataclass(frozen=True)
class Block:
    """Bytes [lo, hi) of a seed rank's tensor and the seed's checksum of them."""

    lo: int
    hi: int
    digest: str


@dataclass(frozen=True)
class Piece:
    """Positions [seed_at, seed_at + count) along the shard dim of a seed rank's tensor go to [local_at, ...) here."""

    seed_rank: int
    seed_at: int
    local_at: int
    count: int


@dataclass(frozen=True)
class DirectRead:
    """Seed bytes [lo, hi) of `name` read straight into this rank's tensor at byte `local`."""

    name: str
    lo: int
    hi: int
    local: int
    blocks: tuple[Block, ...]


@dataclass
class StagedRead:
    """Seed bytes [lo, hi) of `name` read into scratch, checked, then scattered by `pieces`."""

    name: str
    lo: int
    hi: int
    blocks: tuple[Block, ...]
    pieces: list[Piece] = field(default_factory=list)


@dataclass
class RankPlan:
    """Everything this client rank reads from one seed rank."""

    direct: list[DirectRead] = field(default_factory=list)
    staged: list[StagedRead] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        """Bytes this plan moves over the link."""
        return sum(r.hi - r.lo for r in self.direct) + sum(r.hi - r.lo for r in self.staged)


@dataclass(frozen=True)
class SeedShard:
    """One seed rank's tensor as the client sees it: layout, element size and checksummed blocks."""

    layout: ShardLayout
    element_size: int
    blocks: tuple[Block, ...]


def check_compatible(name: str, mine: ShardLayout, theirs: dict[int, SeedShard]) -> None:
    """ReshardError unless every seed rank's tensor splits the same logical tensors along the same dim."""
    for rank, shard in theirs.items():
        if shard.layout.logical_key() != mine.logical_key():
            raise ReshardError(
                f"{name}: seed rank {rank} holds {_describe(shard.layout)}, this rank {_describe(mine)}; the seed "
                "runs a different model or config: start the client with the seed's model"
            )


def _describe(layout: ShardLayout) -> str:
    segments = ", ".join(f"{s.name}[{s.start}:{s.start + s.length}] of {s.full}" for s in layout.segments)
    return f"shape {list(layout.shape)} split along dim {layout.dim} ({segments or 'padding only'})"


def cover(name: str, mine: ShardLayout, theirs: dict[int, SeedShard], prefer: list[int]) -> list[Piece]:
    """Pieces of seed ranks that together hold every logical position of this rank's segments, preferring
    ranks earlier in `prefer` when several hold the same positions (replicated tensors and KV heads)."""
    pieces: list[Piece] = []
    for seg in mine.segments:
        x, end = seg.start, seg.start + seg.length
        while x < end:
            best: tuple[int, int, int] | None = None  # (reach, seed rank, seed local position of x)
            for rank in prefer:
                for s in theirs[rank].layout.segments:
                    if s.name == seg.name and s.start <= x < s.start + s.length:
                        reach = min(end, s.start + s.length)
                        if best is None or reach > best[0]:
                            best = (reach, rank, s.local + x - s.start)
            if best is None:
                raise ReshardError(f"{name}: no seed rank holds position {x} of its segment {seg.name!r}")
            reach, rank, seed_at = best
            pieces.append(Piece(rank, seed_at, seg.local + x - seg.start, reach - x))
            x = reach
    return pieces


def padding(layout: ShardLayout) -> list[tuple[int, int]]:
    """Position ranges along the shard dim that no segment covers (zeros, never read from the seed)."""
    out, x = [], 0
    for s in sorted(layout.segments, key=lambda s: s.local):
        if s.local > x:
            out.append((x, s.local))
        x = max(x, s.local + s.length)
    if x < layout.rows:
        out.append((x, layout.rows))
    return out


def zero_padding(tensors: dict[str, torch.Tensor], layouts: dict[str, ShardLayout]) -> int:
    """Zero every tensor's padding (rows no seed holds, as a disk load leaves them); returns the bytes zeroed."""
    zeroed = 0
    with torch.no_grad():
        for name, t in tensors.items():
            layout = layouts[name]
            for a, b in padding(layout):
                t.view(layout.outer, layout.rows, -1)[:, a:b].zero_()
                zeroed += (b - a) * layout.outer * layout.inner * t.element_size()
    return zeroed


def plan_tensor(name: str, mine: ShardLayout, theirs: dict[int, SeedShard], prefer: list[int]) -> dict[int, RankPlan]:
    """Reads of one tensor, per seed rank."""
    check_compatible(name, mine, theirs)
    plans: dict[int, RankPlan] = {}
    by_rank: dict[int, list[Piece]] = {}
    for piece in cover(name, mine, theirs, prefer):
        by_rank.setdefault(piece.seed_rank, []).append(piece)
    for rank, pieces in by_rank.items():
        shard = theirs[rank]
        plan = plans.setdefault(rank, RankPlan())
        layout = shard.layout
        row = layout.inner * shard.element_size
        if layout.outer > 1:  # a strided shard: whole seed tensor through scratch
            plan.staged.append(StagedRead(name, 0, shard.blocks[-1].hi, shard.blocks, pieces))
            continue
        staged: list[tuple[tuple[Block, ...], Piece]] = []
        for p in pieces:
            lo, hi = p.seed_at * row, (p.seed_at + p.count) * row
            blocks = tuple(b for b in shard.blocks if b.lo < hi and b.hi > lo)
            if blocks[0].lo == lo and blocks[-1].hi == hi:
                plan.direct.append(DirectRead(name, lo, hi, p.local_at * row, blocks))
            else:
                staged.append((blocks, p))
        plan.staged.extend(_merge_staged(name, staged))
    return plans


def _merge_staged(name: str, staged: list[tuple[tuple[Block, ...], Piece]]) -> list[StagedRead]:
    """One staged read per run of overlapping block ranges, so a block two pieces need is read once."""
    out: list[StagedRead] = []
    for blocks, p in sorted(staged, key=lambda item: item[0][0].lo):
        if out and blocks[0].lo < out[-1].hi:
            prev = out[-1]
            prev.blocks += tuple(b for b in blocks if b.lo >= prev.hi)
            prev.hi = max(prev.hi, blocks[-1].hi)
            prev.pieces.append(p)
        else:
            out.append(StagedRead(name, blocks[0].lo, blocks[-1].hi, blocks, [p]))
    return out


def rounds(staged: list[StagedRead], scratch_bytes: int) -> list[list[tuple[StagedRead, int]]]:
    """Staged reads grouped into rounds that each fit the scratch buffer: (read, offset in scratch) pairs, offsets
    aligned to ALIGN bytes (so scatter can copy in wide words). A read larger than the scratch is split at block
    edges into reads of its own."""
    out: list[list[tuple[StagedRead, int]]] = [[]]
    used = 0
    # Reads cut into the same blocks side by side (every layer's o_proj, then every down_proj...): their blocks
    # then lie back to back in scratch, and block sums through torch take each such run in a few kernels.
    parts = sorted((part for r in staged for part in _split(r, scratch_bytes)), key=_blocking)
    for read in parts:
        size = read.hi - read.lo
        if used + size > scratch_bytes and out[-1]:
            out.append([])
            used = 0
        out[-1].append((read, used))
        used = -(-(used + size) // ALIGN) * ALIGN
    return [r for r in out if r]


def _blocking(read: StagedRead) -> tuple[int, ...]:
    return (read.hi - read.lo, *(b.hi - b.lo for b in read.blocks))


def _split(read: StagedRead, limit: int) -> list[StagedRead]:
    if read.hi - read.lo <= limit:
        return [read]
    parts: list[StagedRead] = []
    for b in read.blocks:
        if parts and b.hi - parts[-1].lo <= limit:
            parts[-1].hi, parts[-1].blocks = b.hi, parts[-1].blocks + (b,)
        else:
            parts.append(StagedRead(read.name, b.lo, b.hi, (b,), read.pieces))
    return parts


def scatter_pairs(
    read: StagedRead, buf: torch.Tensor, seed: ShardLayout, element_size: int, dest: torch.Tensor, wide: bool = False
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(destination view, scratch view) pairs that copy the pieces held by buf (seed bytes [read.lo, read.hi)) into
    dest, a flat uint8 view of this rank's tensor laid out as `mine`. Views only: a fork builds them before its
    first read and copies when the bytes have landed. wide: view a strided shard's pieces in the widest word their
    edges allow (a byte-wise strided copy keeps one GPU thread per byte)."""
    row = seed.inner * element_size
    pairs = []
    if seed.outer > 1:
        # Each outer slice is one row of a 2-D byte array; a piece is a column range of it.
        slice_bytes = seed.rows * row
        first, last = read.lo // slice_bytes, read.hi // slice_bytes
        local_slice = dest.numel() // seed.outer
        for p in read.pieces:
            a, n, at = p.seed_at * row, p.count * row, p.local_at * row
            word = _word(buf.data_ptr(), dest.data_ptr(), slice_bytes, local_slice, a, n, at) if wide else torch.uint8
            w = word.itemsize
            src = buf.view(word).view(last - first, slice_bytes // w)
            out = dest.view(word).view(seed.outer, local_slice // w)[first:last]
            pairs.append((out[:, at // w : (at + n) // w], src[:, a // w : (a + n) // w]))
        return pairs
    for p in read.pieces:
        a = max(p.seed_at * row, read.lo)
        b = min((p.seed_at + p.count) * row, read.hi)
        if b > a:
            at = p.local_at * row + a - p.seed_at * row
            pairs.append((dest[at : at + b - a], buf[a - read.lo : b - read.lo]))
    return pairs


def _word(*values: int) -> torch.dtype:
    """The widest integer dtype whose size divides every value (addresses, strides, offsets in bytes)."""
    for dtype in (torch.int64, torch.int32, torch.int16):
        if all(v % dtype.itemsize == 0 for v in values):
            return dtype
    return torch.uint8


@dataclass
class Checks:
    """Block sums launched on a device ([n, 5] block_sums rows) and the blocks (with the seed's digests) and tensor
    names they check, row by row."""

    sums: torch.Tensor
    blocks: tuple[Block, ...]
    names: tuple[str, ...]


def bad_blocks(checks: list[Checks]) -> list[str]:
    """Names of the tensors whose blocks' sums (of the bytes that arrived) differ from the seed's digests; one copy
    to the host per device."""
    by_device: dict[torch.device, list[Checks]] = {}
    for c in checks:
        if c.blocks:
            by_device.setdefault(c.sums.device, []).append(c)
    bad = set()
    for group in by_device.values():
        got = digest_values(torch.cat([c.sums for c in group]))
        # (parse_shards let only 16-hex-digit digests in)
        want = np.array([int(b.digest, 16) for c in group for b in c.blocks], dtype=np.uint64)
        names = [n for c in group for n in c.names]
        bad.update(names[i] for i in np.flatnonzero(got != want))
    return sorted(bad)


_DIGEST = re.compile(r"[0-9a-f]{16}")


def parse_shards(published: dict[str, Any], weights: dict[str, list[Any]]) -> dict[str, SeedShard]:
    """A seed rank's published shard layouts checked against its [ptr, numel, element_size] info."""
    shards: dict[str, SeedShard] = {}
    for name, d in published.items():
        entry = weights.get(name)
        try:
            layout = ShardLayout.from_json(d)
            blocks = tuple(Block(int(lo), int(hi), str(digest)) for lo, hi, digest in d["blocks"])
            if not all(_DIGEST.fullmatch(b.digest) for b in blocks):
                raise ValueError("a block digest is not 16 lowercase hex digits")
        except (KeyError, TypeError, ValueError) as e:
            raise ReshardError(f"malformed shard layout of {name}: {e!r}") from None
        nbytes = None if entry is None else int(entry[1]) * int(entry[2])
        if nbytes is None or (blocks[-1].hi if blocks else 0) != nbytes or math.prod(layout.shape) != int(entry[1]):
            raise ReshardError(f"the shard layout of {name} disagrees with its entry {entry}")
        shards[name] = SeedShard(layout, int(entry[2]), blocks)
    return shards


def plan_all(
    tensors: dict[str, torch.Tensor],
    layouts: dict[str, ShardLayout],
    seeds: dict[int, dict[str, SeedShard]],
    dtypes: dict[int, dict[str, str]],
    prefer: list[int],
) -> dict[int, RankPlan]:
    """Reads of every tensor of this rank, per seed rank; ReshardError names the first tensor that cannot be
    built from the seed's (missing, extra, other dtype or other logical shape)."""
    plans: dict[int, RankPlan] = {}
    for name, t in tensors.items():
        theirs = {r: shards[name] for r, shards in seeds.items() if name in shards}
        if len(theirs) < len(seeds):
            raise ReshardError(f"{name} is missing on the seed: start the client with the seed's model")
        dtype = str(t.dtype).removeprefix("torch.")
        for r in seeds:
            if dtypes[r].get(name) != dtype:
                raise ReshardError(f"{name}: dtype {dtypes[r].get(name)} on seed rank {r}, {dtype} here")
        if t.numel() == 0:
            continue
        for r, plan in plan_tensor(name, layouts[name], theirs, prefer).items():
            merged = plans.setdefault(r, RankPlan())
            merged.direct += plan.direct
            merged.staged += plan.staged
    extra = sorted(set().union(*(set(s) for s in seeds.values())) - set(tensors))
    if extra:
        raise ReshardError(f"{len(extra)} tensor(s) only on the seed, e.g. {extra[:3]}")
    return plans
