"""Request admission: which queued requests (and which chunk of a long prompt) the next prefill step takes."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sglang.srt.managers.schedule_batch import Req
    from sglang.srt.mem_cache.cache_manager import ReqCacheManager


@dataclass
class Admission:
    """The requests a prefill step computes (each with its extend_len set) and the one left mid-prompt, if any."""

    reqs: list[Req] = field(default_factory=list)
    chunked_req: Req | None = None


def admit_prefill(
    cache: ReqCacheManager,
    waiting: deque[Req],
    running: list[Req],
    chunked_req: Req | None,
    token_budget: int | None,
    max_running_requests: int,
) -> Admission:
    """Pick requests to prefill this step within the token budget, the request limit and free KV memory.

    The candidates are the chunked request (it keeps its place), then the queue from its head; an admitted queued
    request is always the head, so it leaves with popleft (no copy of the queue, no search in it).
    """
    budget = token_budget if token_budget and token_budget > 0 else 1 << 62
    out = Admission()
    # KV slots (whole pages) the admitted prefills take, plus one decode step of every request after them: the
    # admitted requests allocate together, so each one's check must count the others.
    need = cache.decode_need(running)
    first = chunked_req
    while first is not None or waiting:
        req, first = (first, None) if first is not None else (waiting[0], None)
        if budget <= 0 or len(running) + len(out.reqs) >= max_running_requests:
            if req is chunked_req:
                out.chunked_req = req
            break
        newly_placed = req.req_pool_idx is None
        if newly_placed and not cache.place(req):
            break
        n = min(req.remaining_prefill(), budget)
        req_need = cache.new_slots(req.kv_len, n) + cache.new_slots(req.kv_len + n, 1)
        if not cache.ensure_free(need + req_need):
            if newly_placed:
                cache.release(req)
                req.reset_for_retract()
            else:
                out.chunked_req = req  # keeps its KV and its place; tried again next step
            break
        need += req_need
        req.extend_len = n
        budget -= n
        out.reqs.append(req)
        if req is not chunked_req:
            waiting.popleft()
        if n < req.remaining_prefill():
            out.chunked_req = req
            break
    return out
