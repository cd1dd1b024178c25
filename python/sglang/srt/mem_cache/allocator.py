"""KV slot allocation: which slots of the KV pool are free, handed out in pages of page_size consecutive slots."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

logger = logging.getLogger(__name__)


class TokenToKVPoolAllocator:
    """Hands out KV slots in whole pages; keeps its free list on the CPU so allocation never syncs the device.

    Page p holds slots p * page_size .. p * page_size + page_size - 1. Page 0 is never handed out: it holds slot 0,
    the scratch slot that padded rows (CUDA-graph batches) write to. With page_size 1 a page is a slot and this is
    a plain slot allocator.

    A request that is given its slots through alloc_extend / alloc_decode keeps the invariant paged attention
    kernels rely on: the slot s of its token at position j has s // page_size == the page holding token j and
    s % page_size == j % page_size. Its tokens fill a page before the next one is taken, and a page is never handed
    to two requests (the radix cache may later share a full page, never a partly written one).
    """

    def __init__(self, size: int, device: torch.device, page_size: int = 1) -> None:
        """size: slots of the KV buffers after slot 0 (the size given to MHATokenToKVPool, whose buffers hold
        size + 1 slots). Every whole page that fits in slots page_size..size is handed out."""
        if page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {page_size}")
        num_pages = (size + 1) // page_size - 1
        if num_pages < 1:
            raise ValueError(
                f"a KV pool of {size} slots holds no page of {page_size} slots besides the scratch page 0; "
                "raise --max-total-tokens (or the memory fraction) or lower --page-size"
            )
        self.page_size = page_size
        self.num_pages = num_pages
        self.size = num_pages * page_size  # slots that can be handed out
        self.device = device
        self.free_pages = torch.arange(1, num_pages + 1, dtype=torch.int64)
        # Which pages are handed out: a page freed twice would be handed to two requests, which would then read
        # each other's keys and values without any error, so free() checks against this.
        self.handed_out = torch.zeros(num_pages + 1, dtype=torch.bool)

    def available_size(self) -> int:
        """Free slots (always whole pages)."""
        return int(self.free_pages.numel()) * self.page_size

    def alloc(self, n: int) -> torch.Tensor | None:
        """n slots (CPU int64) for one sequence that starts at a page boundary, or None if too few pages are free."""
        if self.page_size == 1:
            if n > self.free_pages.numel():
                return None
            out, self.free_pages = self.free_pages[:n], self.free_pages[n:]
            self.handed_out[out] = True
            return out
        got = self.alloc_extend([0], [n], [0])
        return None if got is None else got[0]

    def alloc_extend(
        self, prefix_lens: Sequence[int], extend_lens: Sequence[int], last_slots: Sequence[int]
    ) -> tuple[torch.Tensor, list[int]] | None:
        """Slots for extend_lens[i] new tokens of request i, which holds prefix_lens[i] tokens already.

        last_slots[i] is the slot of request i's token at position prefix_lens[i] - 1; it is only read when that
        token's page is partly filled (its next tokens go there). Returns the slots of all requests concatenated in
        order (CPU int64) and each request's newest slot afterwards (the last_slots of its next call), or None,
        taking nothing, if too few pages are free."""
        size = self.page_size
        # Each request first fills what is left of its last page, then takes fresh pages.
        fills = [min(n, -held % size) for held, n in zip(prefix_lens, extend_lens)]
        page_counts = [-(-(n - fill) // size) for n, fill in zip(extend_lens, fills)]
        num_new = sum(page_counts)
        if num_new > self.free_pages.numel():
            return None
        pages, self.free_pages = self.free_pages[:num_new], self.free_pages[num_new:]
        self.handed_out[pages] = True
        page_ids = pages.tolist()
        # Tensor work per page, Python work per request, nothing per token: a prefill batch has thousands of tokens.
        # Every fresh page is used whole except a request's last one, which holds what is left of its tokens.
        rests = [n - fill for n, fill in zip(extend_lens, fills)]
        used: list[int] = []
        newest: list[int] = []
        first = 0  # the request's first fresh page
        for rest, fill, count, last in zip(rests, fills, page_counts, last_slots):
            if count:
                used += [size] * (count - 1) + [(rest - 1) % size + 1]
                last = page_ids[first + count - 1] * size + (rest - 1) % size
            else:
                last += fill
            first += count
            newest.append(last)
        offsets = torch.arange(size)
        fresh = (pages[:, None] * size + offsets)[offsets < torch.tensor(used, dtype=torch.int64)[:, None]]
        if not any(fills):  # every request starts at a page boundary: the common case
            return fresh, newest
        return _with_fills(fresh, rests, fills, last_slots), newest

    def alloc_decode(
        self, prefix_lens: Sequence[int], last_slots: Sequence[int]
    ) -> tuple[torch.Tensor, list[int]] | None:
        """alloc_extend with one new token per request (a decode step), with list work only: it runs every step
        for the whole batch, and needs no tensor op but the result's."""
        size = self.page_size
        starts_page = [i for i, held in enumerate(prefix_lens) if held % size == 0]
        if len(starts_page) > self.free_pages.numel():
            return None
        taken, self.free_pages = self.free_pages[: len(starts_page)], self.free_pages[len(starts_page) :]
        self.handed_out[taken] = True
        pages = taken.tolist()
        newest = [slot + 1 for slot in last_slots]
        for i, page in zip(starts_page, pages):
            newest[i] = page * size
        return torch.tensor(newest, dtype=torch.int64), newest

    def free(self, slots: torch.Tensor) -> None:
        """Return the pages holding slots. The caller owns those pages whole: freeing one slot frees its page."""
        if slots.numel():
            pages = slots.to("cpu", torch.int64)
            if self.page_size > 1:
                pages = torch.unique(pages // self.page_size)
            held = self.handed_out[pages]
            if not bool(held.all()):
                # A bookkeeping bug upstream of here; keep the free list right rather than hand a page out twice.
                logger.error("KV pages %s freed but not handed out (double free?); ignored", pages[~held].tolist()[:8])
                pages = pages[held].unique()
            self.handed_out[pages] = False
            self.free_pages = torch.cat([self.free_pages, pages])


def _with_fills(fresh: torch.Tensor, rests: list[int], fills: list[int], last_slots: Sequence[int]) -> torch.Tensor:
    """Each request's slots in its partly filled last page (right after its last slot) before its fresh ones."""
    pieces: list[torch.Tensor] = []
    for own, fill, last in zip(fresh.split(rests), fills, last_slots):
        if fill:
            pieces.append(torch.arange(last + 1, last + 1 + fill))
        pieces.append(own)
    return torch.cat(pieces)
