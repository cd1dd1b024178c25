"""KV placement of requests: a request-table row and the longest cached prefix in, computed tokens back out."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from sglang.srt.mem_cache.radix_cache import RadixCache

if TYPE_CHECKING:
    from sglang.srt.managers.schedule_batch import Req
    from sglang.srt.model_executor.model_runner import ModelRunner


class ReqCacheManager:
    """One rank's KV memory as the scheduler sees it: rows of req_to_token, free slots, and the radix cache."""

    def __init__(self, runner: ModelRunner, disable_radix_cache: bool) -> None:
        self.runner = runner
        self.req_to_token_pool = runner.req_to_token_pool
        self.allocator = runner.token_to_kv_pool_allocator
        self.page_size = self.allocator.page_size
        # The slots that can be handed out: whole pages, without the scratch page 0.
        self.max_total_num_tokens = self.allocator.size
        self.tree_cache = RadixCache(self.allocator, disable=disable_radix_cache)
        self.cached_tokens_total = 0  # prompt tokens served from the cache, over the server's life
        # req_to_token's contents, kept on the host as they are written (build_forward_batch writes each step's): a
        # request's release reads its slots from here, since reading the device table would wait for every step in
        # flight (a stall per finished request).
        # Only what was written is ever read (a request reads back its own slots), so nothing needs zeroing.
        self.host_slots = torch.empty(self.req_to_token_pool.req_to_token.shape, dtype=torch.int32)

    def place(self, req: Req) -> bool:
        """Give req a KV row and reuse its longest cached prefix; False (nothing taken) if no row is free."""
        row = self.req_to_token_pool.alloc()
        if row is None:
            return False
        req.req_pool_idx = row
        # Always leave one token to compute: its logits give the first output token.
        slots, node = self.tree_cache.match_prefix(req.fill_ids[:-1])
        n = int(slots.numel())
        if n:
            self.req_to_token_pool.req_to_token[row, :n] = slots.to(self.runner.device, non_blocking=True)
            self.host_slots[row, :n] = slots
        req.kv_len = req.cached_len = n
        if not req.output_ids:
            req.cached_tokens = n
            self.cached_tokens_total += n
        req.last_node = node
        self.tree_cache.inc_lock_ref(node)
        return True

    def release(self, req: Req) -> None:
        """Return req's KV row; its computed tokens go into the radix cache (or back to the allocator).

        Only tokens whose KV is in the pool are kept (req.kv_len of them, the first ones of req.fill_ids): under
        overlap scheduling that may include the newest output token, whose KV the step in flight is writing.
        """
        row = req.req_pool_idx
        slots = self.host_slots[row, : req.kv_len].to(torch.int64)
        if self.tree_cache.disable:
            self.allocator.free(slots[req.cached_len :])
        else:
            # Whole pages go into the cache; a partly written last page belongs to this request alone and is freed.
            whole = self.tree_cache.page_aligned(req.kv_len)
            done = self.tree_cache.insert(req.fill_ids[:whole], slots[:whole])
            self.allocator.free(slots[req.cached_len : done])
            self.allocator.free(slots[whole:])
            self.tree_cache.dec_lock_ref(req.last_node)
        self.req_to_token_pool.free(row)
        req.req_pool_idx = None

    def new_slots(self, held: int, n: int) -> int:
        """Free slots that n more tokens of a request holding `held` take: the fresh pages they start, whole."""
        if self.page_size == 1:
            return n
        return (_pages(held + n, self.page_size) - _pages(held, self.page_size)) * self.page_size

    def decode_need(self, reqs: list[Req]) -> int:
        """Free slots one decode step of reqs takes: a fresh page for each request whose last page is full."""
        if self.page_size == 1:
            return len(reqs)
        return sum(self.new_slots(r.kv_len, 1) for r in reqs)

    def ensure_free(self, n: int) -> bool:
        """Whether n slots are free, evicting unused cached prefixes to make them so."""
        short = n - self.allocator.available_size()
        if short > 0:
            self.tree_cache.evict(short)
        return self.allocator.available_size() >= n

    def fits_alone(self, req: Req) -> bool:
        """Whether req's tokens so far and one more fit in the pool when nothing else holds any of it."""
        held = req.seqlen
        return self.new_slots(0, held) + self.new_slots(held, 1) <= self.max_total_num_tokens


def _pages(tokens: int, page_size: int) -> int:
    """Pages that hold `tokens` tokens of one request (the last one possibly partly written)."""
    return -(-tokens // page_size)
