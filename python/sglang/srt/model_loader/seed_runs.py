"""Where a peer-assisted client's seed reader reads next, so that clients forking together ask the seed for
different tensors: each walks a run of consecutive tensors that no one else has or claims, and a reader whose run
meets another's starts again in the middle of the longest such gap (the reader walking towards that gap keeps its
first half).
"""

from __future__ import annotations

# A tensor a forking peer claimed from the seed is left to that peer for this long after this client first saw the
# claim; then (or once the peer is dropped) this client's seed reader may take it after all.
CLAIM_WAIT_S = 3.0
# The seed reader claims its in-flight batch and the rest of its run ahead: at least this many batches' worth, and
# at least what it reads in CLAIM_AHEAD_S at its rate so far. Others hear of a claim up to a registry exchange or two
# (0.15 s each) late, so a reader must claim further ahead than that or two readers walking the same stretch of
# tensors both ask the seed for it; a claim that ages much less than CLAIM_WAIT_S never expires while honoured.
CLAIM_AHEAD_BATCHES = 4
CLAIM_AHEAD_S = 0.5


def bits(mask: int) -> list[int]:
    """Positions of the set bits of mask (cost grows with the number of bits set, not the highest one)."""
    out = []
    while mask:
        low = mask & -mask
        out.append(low.bit_length() - 1)
        mask ^= low
    return out


def longest_gap(sizes: list[int], taken: int) -> tuple[list[int], int]:
    """The longest circular run (by bytes) of positions not set in taken, and its bytes; ([], 0) if none."""
    n = len(sizes)
    first = next((i for i in range(n) if taken >> i & 1), None)
    if first is None:
        return list(range(n)), sum(sizes)
    best: list[int] = []
    best_bytes = 0
    run: list[int] = []
    for k in range(1, n + 1):  # from just after a taken position, so no run wraps past the walk's start
        i = (first + k) % n
        if not taken >> i & 1:
            run.append(i)
            continue
        run_bytes = sum(sizes[j] for j in run)
        if run and run_bytes > best_bytes:
            best, best_bytes = run, run_bytes
        run = []
    return best, best_bytes


def middle(run: list[int], sizes: list[int], run_bytes: int) -> int:
    """The position where the second half (by bytes) of run begins."""
    half = 0
    for j in run:
        half += sizes[j]
        if 2 * half > run_bytes:
            return j
    return run[-1]
