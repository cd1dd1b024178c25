"""The Triton kernel behind block_checksum_gpu, in a module of its own: importing Triton costs startup time, so
only block_checksum_gpu imports this, when a GPU first sums blocks."""

import triton
import triton.language as tl


# No specialising on argument values or alignment: one compiled variant serves every call (a new variant would
# compile in the middle of a fork).
@triton.jit(do_not_specialize=["words", "table", "out", "chunks"])
def chunk_sums(words, table, out, chunks, CHUNK: tl.constexpr, ROW: tl.constexpr):
    """Three partial sums of one chunk of one block (see block_checksum_gpu) into out[3 * program]."""
    # Chunks start on a grid row of their block (CHUNK is a multiple of ROW) and are walked a row at a time, so
    # a word's column weight is its lane + 1 and its row weight is one number per tile. Leftover words past the
    # block's last whole row are weighted by their position among them: lane + 1 plus a per-tile offset. Sums
    # stay per lane until the end (a reduction per tile costs more than the loads).
    p = tl.program_id(0)
    at = tl.load(table + p)  # first word of the chunk, from `words`
    k0 = tl.load(table + chunks + p)  # its index within its block
    n = tl.load(table + 2 * chunks + p)  # words in the chunk
    full = tl.load(table + 3 * chunks + p)  # words of the block's whole grid rows
    lane = tl.arange(0, ROW)
    weight = (lane + 1).to(tl.int64)
    rows = tl.zeros([ROW], dtype=tl.int64)
    cols = tl.zeros([ROW], dtype=tl.int64)
    rest = tl.zeros([ROW], dtype=tl.int64)
    for start in range(0, CHUNK, ROW):
        k = k0 + start  # block index of this tile's first word
        x = tl.load(words + at + start + lane, mask=start + lane < n, other=0)
        grid = tl.where(k + lane < full, x, 0)
        cols += grid * weight
        rows += grid * (k // ROW + 1)
        if k + ROW > full:  # the tile holds leftover words (masked loads are 0)
            rest += (x - grid) * (weight + (k - full))
    tl.store(out + 3 * p, tl.sum(rows, axis=0))
    tl.store(out + 3 * p + 1, tl.sum(cols, axis=0))
    tl.store(out + 3 * p + 2, tl.sum(rest, axis=0))
