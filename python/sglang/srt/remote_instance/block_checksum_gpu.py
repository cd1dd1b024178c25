"""block_sums of many blocks in one pass on a GPU: one Triton launch reads every block's bytes once.

The torch code in block_checksum takes two reductions and about a dozen small kernels per block; a fork into
another TP size checks thousands of blocks (a TP2 -> TP1 fork of an 8B model: ~2,800), and launching those
kernels from Python cost more than moving the bytes. Here every block is cut into chunks of CHUNK_WORDS 64-bit
words; one program per chunk weighs each word exactly as block_sums does (by its row and its column in the
block's ROW_WORDS-wide grid, or by its position among the leftover words) and writes three partial sums; a
sum over each block's chunks then gives its values. Integer sums wrap modulo 2**64 in both, so the
results are bit-equal to block_sums (the GPU test checks that on random blocks of awkward sizes).

Only blocks that start on a word boundary and hold whole words qualify (every block of a real model does);
the caller sums the others with torch. Without Triton (CPU builds of torch) `available()` is False. The kernel
itself is in block_checksum_kernel.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import threading
import time

import numpy as np
import torch

logger = logging.getLogger(__name__)

CHUNK_WORDS = 32768  # 256 KB of words per program; a multiple of the grid's row

# Triton is imported (block_checksum_kernel) only when a kernel is first wanted: importing it costs startup time.
HAVE_TRITON = importlib.util.find_spec("triton") is not None


# Devices whose kernel is compiled and loaded (warm_up); compiling takes ~1 s on a node without a Triton cache,
# which must not land inside a fork's transfer: until then, and without warm_up, callers sum with torch.
_ready: set[int] = set()
_warming: dict[int, threading.Thread] = {}
_lock = threading.Lock()
# Seconds each device's warm-up took (import, compile or cache load, first launch), for logs.
load_seconds: dict[int, float] = {}


def available(device: torch.device) -> bool:
    """Whether blocks on this device can be summed here now: only once warm_up has compiled the kernel (nothing
    compiles on demand: a compile in the middle of a fork would stall it)."""
    return HAVE_TRITON and device.type == "cuda" and bool(_ready) and _index(device) in _ready


def warm_up(device: torch.device) -> threading.Thread | None:
    """Compile and load the kernel for this GPU on a background thread (once); the thread, to wait on."""
    if not HAVE_TRITON or device.type != "cuda":
        return None
    index = _index(device)
    with _lock:
        if index not in _warming:
            _warming[index] = threading.Thread(target=_compile, args=(index,), name="block-sums-compile", daemon=True)
            _warming[index].start()
        return _warming[index]


def _index(device: torch.device) -> int:
    return torch.cuda.current_device() if device.index is None else device.index


def _compile(index: int) -> None:
    start = time.perf_counter()
    from sglang.srt.remote_instance.block_checksum import ROW_WORDS  # (that module imports this one)

    try:
        with torch.cuda.device(index):
            probe = torch.zeros(2 * CHUNK_WORDS * 8, dtype=torch.uint8, device=f"cuda:{index}")
            many_block_sums([(probe, 0, probe.numel())], ROW_WORDS)[0].cpu()
        load_seconds[index] = time.perf_counter() - start
        _ready.add(index)
    except Exception as e:  # torch stays in use
        logger.warning("GPU block checksums unavailable on cuda:%d (%r); summing with torch", index, e)


def whole_words(lo: int, hi: int) -> bool:
    """Whether bytes [lo, hi) of a flat uint8 tensor that starts on a word boundary are whole words (no tail
    bytes), so the fused kernel can take them."""
    return lo % 8 == 0 and (hi - lo) % 8 == 0 and hi > lo


class FusedSums:
    """The block sums of fixed byte ranges, taken as often as wanted with one launch each: the chunk table is built
    and uploaded here, once, so that a call costs the host a launch and two small torch ops (a fork builds its
    tables before its first read). Ranges: bytes [lo, hi) of flat uint8 tensors on one CUDA device, each tensor
    starting on a word boundary, every range whole_words. Offsets are taken from the lowest tensor's address, so
    one launch covers blocks of many tensors; the tensors must stay where they are while this object is used."""

    def __init__(self, ranges: list[tuple[torch.Tensor, int, int]], row_words: int) -> None:
        assert CHUNK_WORDS % row_words == 0, "chunks must start on a grid row"
        self.device = ranges[0][0].device
        self.row_words = row_words
        base = min(ranges, key=lambda r: r[0].data_ptr())[0]
        origin = base.data_ptr()
        starts = np.array([(raw.data_ptr() + lo - origin) // 8 for raw, lo, _ in ranges], dtype=np.int64)
        words = np.array([(hi - lo) // 8 for _, lo, hi in ranges], dtype=np.int64)
        counts = -(-words // CHUNK_WORDS)
        owner = np.repeat(np.arange(len(ranges)), counts)
        first = np.concatenate(([0], np.cumsum(counts)))
        k0 = (np.arange(first[-1]) - first[owner]) * CHUNK_WORDS
        table = np.concatenate(
            (starts[owner] + k0, k0, np.minimum(CHUNK_WORDS, words[owner] - k0), words[owner] // row_words * row_words)
        )
        self.blocks, self.chunks = len(ranges), int(first[-1])
        host = torch.from_numpy(np.concatenate((table, owner, words * 8)))
        self.uploaded = None
        if self.device.type == "cuda":
            # A plain upload: built before a fork's reads (little queued on the stream), and pinning a fresh
            # buffer (cudaHostAlloc) cost 10-20 ms there. Calls on other streams wait for it.
            tables = host.to(self.device)
            self.uploaded = torch.cuda.Event()
            self.uploaded.record()
        else:  # only under TRITON_INTERPRET=1, in tests
            tables = host
        chunks = self.chunks
        self.table, self.chunk_block, self.nbytes = (
            tables[: 4 * chunks],
            tables[4 * chunks : 5 * chunks],
            tables[5 * chunks :],
        )
        self.origin_words = base[: base.numel() // 8 * 8].view(torch.int64)

    def __call__(self) -> torch.Tensor:
        """[blocks, 5] int64 block_sums rows, launched on the current stream; no host sync."""
        from sglang.srt.remote_instance.block_checksum_kernel import chunk_sums

        cuda = self.device.type == "cuda"
        if self.uploaded is not None:
            torch.cuda.current_stream(self.device).wait_event(self.uploaded)
        partial = torch.empty(self.chunks, 3, dtype=torch.int64, device=self.device)
        with torch.cuda.device(self.device) if cuda else contextlib.nullcontext():
            chunk_sums[(self.chunks,)](
                self.origin_words, self.table, partial, self.chunks, CHUNK=CHUNK_WORDS, ROW=self.row_words, num_warps=8
            )
        out = torch.zeros(self.blocks, 5, dtype=torch.int64, device=self.device)
        # Each block's chunks added up (integer sums wrap modulo 2**64 in any order, as block_sums' do). Not a
        # cumulative sum over chunks: torch scans a [chunks, 3] tensor down its columns one thread per column.
        out[:, :3].index_add_(0, self.chunk_block, partial)
        out[:, 4] = self.nbytes
        return out


def many_block_sums(ranges: list[tuple[torch.Tensor, int, int]], row_words: int) -> torch.Tensor:
    """block_sums of bytes [lo, hi) of each range (see FusedSums), as [len(ranges), 5] rows, in one launch."""
    return FusedSums(ranges, row_words)()
