"""Checksums of byte blocks for forks into another TP size: cheap on a GPU, and no host sync until the end.

A block's bytes are taken as 64-bit words laid out as rows of ROW_WORDS; the digest combines the row sums
weighted by row number, the column sums weighted by column number, the leftover words weighted by position, the
last < 8 bytes and the length. Two plain reductions over the data (no temporaries the size of the block), so a
GPU checks blocks several times faster than the link delivers them. Integer sums wrap modulo 2**64, so a CPU seed
and a GPU client agree on equal bytes; any single changed word, swapped rows or swapped columns change it.
"""

from __future__ import annotations

import torch

from sglang.srt.remote_instance import block_checksum_gpu
from sglang.srt.remote_instance.manifest import host_values

ROW_WORDS = 1024
_MASK = (1 << 64) - 1


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


def digests(sums: list[torch.Tensor]) -> list[str]:
    """Hex digests of block_sums results, with one copy to the host per device."""
    out = []
    for rows, cols, rest, tail, size in host_values(sums):
        out.append(f"{(rows * 1_000_003 + cols * 999_983 + rest * 7_919 + tail * 31 + size) & _MASK:016x}")
    return out


@torch.inference_mode()
def range_sums(ranges: list[tuple[torch.Tensor, int, int]]) -> list[torch.Tensor]:
    """block_sums of bytes [lo, hi) of each flat uint8 tensor, in order. On a GPU with Triton every block of whole
    words goes through one fused launch per device (block_checksum_gpu); the rest through torch."""
    out: list[torch.Tensor | None] = [None] * len(ranges)
    by_device: dict[torch.device, list[int]] = {}
    fused: dict[int, torch.device | None] = {}  # per tensor: its device if the fused path takes it (asked once)
    for i, (raw, lo, hi) in enumerate(ranges):
        if id(raw) not in fused:
            device = raw.device
            fused[id(raw)] = device if block_checksum_gpu.available(device) and raw.data_ptr() % 8 == 0 else None
        device = fused[id(raw)]
        if device is not None and block_checksum_gpu.whole_words(lo, hi):
            by_device.setdefault(device, []).append(i)
    for picked in by_device.values():
        sums = block_checksum_gpu.many_block_sums([ranges[i] for i in picked], ROW_WORDS)
        for i, s in zip(picked, sums):
            out[i] = s
    rest = [i for i, s in enumerate(out) if s is None]
    for i, s in zip(rest, _torch_range_sums([ranges[i] for i in rest])):
        out[i] = s
    return out  # type: ignore[return-value]


def _torch_range_sums(ranges: list[tuple[torch.Tensor, int, int]]) -> list[torch.Tensor]:
    """range_sums with torch ops. Runs of back-to-back blocks of one size in one tensor (a part cut into equal
    blocks) are summed together, a few kernels for the run instead of per block."""
    out: list[torch.Tensor] = []
    i = 0
    while i < len(ranges):
        raw, lo, hi = ranges[i]
        size, j = hi - lo, i + 1
        while (
            j < len(ranges)
            and ranges[j][0] is raw
            and ranges[j][1] == ranges[j - 1][2]
            and ranges[j][2] - ranges[j][1] == size
        ):
            j += 1
        if j - i > 1 and size % (8 * ROW_WORDS) == 0 and (raw.storage_offset() + lo) % 8 == 0:
            out += _run_sums(raw[lo : lo + (j - i) * size], j - i)
        else:
            out += [block_sums(r[a:b]) for r, a, b in ranges[i:j]]
        i = j
    return out


def _run_sums(raw: torch.Tensor, count: int) -> list[torch.Tensor]:
    """block_sums of count equal blocks filling raw, each a whole number of rows (so no leftover words or tail)."""
    grid = raw.view(torch.int64).view(count, -1, ROW_WORDS)
    rows, cols = grid.sum(2), grid.sum(1)
    device = raw.device
    out = torch.zeros(count, 5, dtype=torch.int64, device=device)
    out[:, 0] = (rows * torch.arange(1, rows.shape[1] + 1, device=device)).sum(1)
    out[:, 1] = (cols * torch.arange(1, ROW_WORDS + 1, device=device)).sum(1)
    out[:, 4] = raw.numel() // count
    return list(out.unbind(0))


def range_digests(ranges: list[tuple[torch.Tensor, int, int]]) -> list[str]:
    """Digest of bytes [lo, hi) of each flat uint8 tensor."""
    return digests(range_sums(ranges))
