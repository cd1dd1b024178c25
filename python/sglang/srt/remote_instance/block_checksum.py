"""Checksums of byte blocks for forks into another TP size: cheap on a GPU, and no host sync until the end.

A block's bytes are taken as 64-bit words laid out as rows of ROW_WORDS; the digest combines the row sums
weighted by row number, the column sums weighted by column number, the leftover words weighted by position, the
last < 8 bytes and the length. Two plain reductions over the data (no temporaries the size of the block), so a
GPU checks blocks several times faster than the link delivers them. Integer sums wrap modulo 2**64, so a CPU seed
and a GPU client agree on equal bytes; any single changed word, swapped rows or swapped columns change it.
"""

from __future__ import annotations

import numpy as np
import torch

from sglang.srt.remote_instance import block_checksum_gpu
from sglang.srt.remote_instance.manifest import host_values

ROW_WORDS = 1024
# How a digest weighs block_sums' five values (modulo 2**64).
_W_ROWS, _W_COLS, _W_REST, _W_TAIL = (np.uint64(w) for w in (1_000_003, 999_983, 7_919, 31))


@torch.inference_mode()
def block_sums(raw: torch.Tensor) -> torch.Tensor:
    """The five int64 partial values of a flat uint8 tensor's digest, on its device, without a host sync."""
    if raw.storage_offset() % 8:  # words must start on a word boundary to be viewed as int64
        raw = raw.clone()
    n = raw.numel()
    body = n - n % 8
    words = raw[:body].view(torch.int64)
    full = words.numel() // ROW_WORDS * ROW_WORDS
    grid = words[:full].view(-1, ROW_WORDS)
    device = raw.device
    out = torch.zeros(5, dtype=torch.int64, device=device)
    if full:
        rows, cols = grid.sum(1), grid.sum(0)
        out[0] = (rows * torch.arange(1, rows.numel() + 1, device=device)).sum()
        out[1] = (cols * torch.arange(1, ROW_WORDS + 1, device=device)).sum()
    if full < words.numel():
        rest = words[full:]
        out[2] = (rest * torch.arange(1, rest.numel() + 1, device=device)).sum()
    if body < n:
        tail = torch.zeros(8, dtype=torch.uint8, device=device)
        tail[: n - body] = raw[body:]
        out[3] = tail.view(torch.int64)[0]
    out[4] = n
    return out


def digest_values(sums: torch.Tensor) -> np.ndarray:
    """The 64-bit digests of block_sums rows ([n, 5] on any device), with one copy to the host."""
    rows, cols, rest, tail, size = sums.cpu().numpy().astype(np.uint64).T  # wraps modulo 2**64, as the sums do
    return rows * _W_ROWS + cols * _W_COLS + rest * _W_REST + tail * _W_TAIL + size


def digests(sums: list[torch.Tensor]) -> list[str]:
    """Hex digests of block_sums results, with one copy to the host per device."""
    return _hex(digest_values(torch.tensor(host_values(sums), dtype=torch.int64).view(-1, 5)))


def _hex(values: np.ndarray) -> list[str]:
    return [f"{int(v):016x}" for v in values]


class RangeSums:
    """block_sums of fixed byte ranges of flat uint8 tensors on one device, planned once and taken when wanted (a
    fork plans them before its first read). On a GPU whose fused kernel is ready every range of whole words goes
    through one launch (block_checksum_gpu.FusedSums); the rest, and everything elsewhere, through torch."""

    def __init__(self, ranges: list[tuple[torch.Tensor, int, int]]) -> None:
        self.ranges = ranges
        fused = [
            i
            for i, (raw, lo, hi) in enumerate(ranges)
            if block_checksum_gpu.available(raw.device)
            and raw.data_ptr() % 8 == 0
            and block_checksum_gpu.whole_words(lo, hi)
        ]
        self.fused = block_checksum_gpu.FusedSums([ranges[i] for i in fused], ROW_WORDS) if fused else None
        taken = set(fused)
        self.rest = [i for i in range(len(ranges)) if i not in taken]
        self.order = None  # where each part's rows go, when both parts are there
        if fused and self.rest:
            device = ranges[0][0].device
            self.order = (torch.tensor(fused, device=device), torch.tensor(self.rest, device=device))

    @torch.inference_mode()
    def __call__(self) -> torch.Tensor:
        """[len(ranges), 5] int64 rows, launched on the current stream; no host sync."""
        if self.fused is not None and not self.rest:
            return self.fused()
        rest = _torch_sums_table([self.ranges[i] for i in self.rest])
        if self.fused is None:
            return rest
        out = torch.empty(len(self.ranges), 5, dtype=torch.int64, device=rest.device)
        out[self.order[0]] = self.fused()
        out[self.order[1]] = rest
        return out


def range_sums(ranges: list[tuple[torch.Tensor, int, int]]) -> list[torch.Tensor]:
    """block_sums of bytes [lo, hi) of each flat uint8 tensor, in order (see RangeSums)."""
    return list(RangeSums(ranges)().unbind(0)) if ranges else []


def _torch_range_sums(ranges: list[tuple[torch.Tensor, int, int]]) -> list[torch.Tensor]:
    """range_sums with torch ops, one row per range."""
    return list(_torch_sums_table(ranges).unbind(0)) if ranges else []


# Runs of one block size in different tensors are copied side by side, up to this many bytes at a time (and a
# quarter of the device's free memory), and summed as one: the copy is one kernel, each run summed on its own
# about ten (launches, not bytes, bound it).
GATHER_BYTES = 512 << 20


def _torch_sums_table(ranges: list[tuple[torch.Tensor, int, int]]) -> torch.Tensor:
    """[len(ranges), 5] block_sums rows with torch ops, for ranges on one device. Back-to-back blocks of one size
    in one tensor (a part cut into equal blocks; views of one tensor count as one) form a run; runs of one block
    size, from any tensors, are summed together (_run_sums); other blocks one by one."""
    runs: dict[int, list[tuple[int, torch.Tensor]]] = {}  # block size: [(index of the run's first block, bytes)]
    singles: list[tuple[int, torch.Tensor]] = []
    i = 0
    while i < len(ranges):
        raw, lo, hi = ranges[i]
        size, j = hi - lo, i + 1
        while (
            j < len(ranges)
            and _same_bytes(ranges[j][0], raw)
            and ranges[j][1] == ranges[j - 1][2]
            and ranges[j][2] - ranges[j][1] == size
        ):
            j += 1
        if size % (8 * ROW_WORDS) == 0 and (raw.storage_offset() + lo) % 8 == 0:
            runs.setdefault(size, []).append((i, raw[lo : lo + (j - i) * size]))
        else:
            singles += [(k, block_sums(r[a:b]).view(1, 5)) for k, (r, a, b) in enumerate(ranges[i:j], i)]
        i = j
    parts: list[torch.Tensor] = []
    order: list[int] = []
    limit = GATHER_BYTES
    if runs and ranges[0][0].is_cuda:
        limit = min(limit, torch.cuda.mem_get_info(ranges[0][0].device)[0] // 4)  # a copy must not run it short
    for size, group in runs.items():
        for batch in _batches(group, limit):
            data = batch[0][1] if len(batch) == 1 else torch.cat([run for _, run in batch])
            parts.append(_run_sums(data, data.numel() // size))
            order += [first + k for first, run in batch for k in range(run.numel() // size)]
    for k, sums in singles:
        parts.append(sums)
        order.append(k)
    if not parts:
        return torch.zeros(0, 5, dtype=torch.int64)
    table = torch.cat(parts)
    if order == list(range(len(ranges))):
        return table
    out = torch.empty_like(table)
    out[torch.tensor(order, device=table.device)] = table  # rows back into the order of `ranges`
    return out


def _batches(group: list[tuple[int, torch.Tensor]], limit: int) -> list[list[tuple[int, torch.Tensor]]]:
    out: list[list[tuple[int, torch.Tensor]]] = [[]]
    held = 0
    for item in group:
        if out[-1] and held + item[1].numel() > limit:
            out.append([])
            held = 0
        out[-1].append(item)
        held += item[1].numel()
    return out


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a is b or (a.data_ptr() == b.data_ptr() and a.numel() == b.numel() and a.device == b.device)


# Position weights 1..n per (device, n), made once (two fewer kernels per run of blocks), with the event after
# which they are there: sums run on several threads' streams.
_weights: dict[tuple[torch.device, int], tuple[torch.Tensor, torch.cuda.Event | None]] = {}


def _positions(n: int, device: torch.device) -> torch.Tensor:
    key = (device, n)
    if key not in _weights:
        made = torch.arange(1, n + 1, device=device)
        event = None
        if device.type == "cuda":
            event = torch.cuda.Event()
            event.record()
        _weights[key] = (made, event)
    made, event = _weights[key]
    if event is not None:
        torch.cuda.current_stream(device).wait_event(event)
    return made


def _run_sums(raw: torch.Tensor, count: int) -> torch.Tensor:
    """[count, 5] block_sums rows of count equal blocks filling raw, each a whole number of rows (so no leftover
    words or tail)."""
    grid = raw.view(torch.int64).view(count, -1, ROW_WORDS)
    out = torch.zeros(count, 5, dtype=torch.int64, device=raw.device)
    out[:, 0] = (grid.sum(2) * _positions(grid.shape[1], raw.device)).sum(1)
    out[:, 1] = (grid.sum(1) * _positions(ROW_WORDS, raw.device)).sum(1)
    out[:, 4] = raw.numel() // count
    return out


def range_digests(ranges: list[tuple[torch.Tensor, int, int]]) -> list[str]:
    """Digest of bytes [lo, hi) of each flat uint8 tensor (all on one device), from one table of sums."""
    return _hex(digest_values(RangeSums(ranges)())) if ranges else []
