"""The decode batch: the running requests, their removal once finished, and retraction when KV memory runs out."""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sglang.srt.managers.schedule_batch import Req
    from sglang.srt.mem_cache.cache_manager import ReqCacheManager

logger = logging.getLogger(__name__)


class DecodeBatch:
    """Requests that have their whole prompt in the KV cache and decode one token per step, oldest first."""

    def __init__(self) -> None:
        self.reqs: list[Req] = []
        self.has_aborted = False  # an abort marked one of reqs since the last drop_aborted

    def __len__(self) -> int:
        return len(self.reqs)

    def __bool__(self) -> bool:
        return bool(self.reqs)

    def add(self, reqs: list[Req]) -> None:
        """Requests whose prefill finished join at the end (the newest are retracted first)."""
        self.reqs.extend(reqs)

    def drop_finished(self) -> None:
        """Forget finished requests: one rebuild per step, not a search and a removal per request."""
        self.reqs = [r for r in self.reqs if not r.finished]

    def drop_aborted(self) -> list[Req]:
        """The requests an abort finished since the last call, removed; nothing is scanned if there was none."""
        if not self.has_aborted:
            return []
        self.has_aborted = False
        aborted = [r for r in self.reqs if r.finished]
        if aborted:
            self.drop_finished()
        return aborted

    def reserve_memory(
        self, cache: ReqCacheManager, waiting: deque[Req], flush_pending: Callable[[], None]
    ) -> list[Req]:
        """Make room for one more token of every request, retracting the newest requests if needed.

        A retracted request goes back to the head of the queue and is prefilled again later. One that would not fit
        even alone in the whole pool (its tokens so far plus the next) is finished instead, since retracting it would
        only prefill and retract it again forever; those are returned (their outputs are due). `flush_pending` runs
        before the first retraction: a step in flight must have its tokens applied (and its finished requests
        released) first, so a retracted request is prefilled again with every token it was given.
        """
        stopped: list[Req] = []
        flushed = False
        while self.reqs and not cache.ensure_free(cache.decode_need(self.reqs)):
            if not flushed:
                flushed = True
                flush_pending()
                continue
            victim = self.reqs.pop()
            cache.release(victim)
            if cache.fits_alone(victim):
                victim.reset_for_retract()
                waiting.appendleft(victim)
                logger.warning("KV cache full: request %s retracted and will be prefilled again", victim.rid)
                continue
            tokens = victim.seqlen
            victim.finished_reason = {
                "type": "abort",
                "message": f"the KV cache holds {cache.max_total_num_tokens} tokens, too few for this request's "
                f"{tokens} tokens and the next one; raise --max-total-tokens (or --mem-fraction-static) or lower "
                "max_new_tokens",
            }
            logger.warning(
                "KV cache full: request %s stopped after %d tokens, too long for the pool", victim.rid, tokens
            )
            stopped.append(victim)
        return stopped
