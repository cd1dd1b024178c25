"""Rank 0's batch log lines ("Prefill batch", "Decode batch") and the gauge snapshot it sends to the HTTP process."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sglang.srt.model_executor.forward_batch_info import ForwardMode

if TYPE_CHECKING:
    from sglang.srt.managers.schedule_batch import Req
    from sglang.srt.managers.scheduler import Scheduler

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SchedulerStats:
    """What rank 0 reports with each log line; the TokenizerManager turns it into Prometheus gauges."""

    num_running_reqs: int
    num_queue_reqs: int
    num_used_tokens: int
    token_usage: float
    max_total_num_tokens: int
    gen_throughput: float
    cache_hit_rate: float


class BatchStatsLogger:
    """Logs every prefill batch and every --decode-log-interval decode steps; publishes a SchedulerStats with each.

    Only rank 0 has one: the other ranks run the same batches, and their lines would only repeat its own.
    """

    def __init__(self, scheduler: Scheduler, publish: Callable[[SchedulerStats], None] | None) -> None:
        self.scheduler = scheduler
        self.interval = scheduler.server_args.decode_log_interval
        self.publish = publish
        self.decode_steps = 0
        self.generated = 0  # decode tokens since the last decode line
        self.since = time.perf_counter()
        self.busy = False
        self.last_throughput = 0.0  # of the last decode line
        self.last_hit_rate = 0.0  # of the last prefill batch

    def on_batch(self, mode: ForwardMode, reqs: list[Req]) -> None:
        """Account for one batch that just ran (its requests' kv_len already counts it)."""
        if not self.busy:
            # Throughput is measured over busy time only: an idle gap before this batch is not generation time.
            self.busy = True
            self.since = time.perf_counter()
        if mode.is_extend():
            self._prefill_line(reqs)
        else:
            self.decode_steps += 1
            self.generated += len(reqs)
            if self.decode_steps % self.interval == 0:
                self._decode_line(reqs)
        sched = self.scheduler
        if not (sched.running or sched.waiting or sched.chunked_req):
            self.on_idle()  # now, not after the idle loop's next poll: a scrape right after a reply sees it drained

    def on_idle(self) -> None:
        """The scheduler has nothing to run: publish the drained state once, so gauges do not keep the last load."""
        if not self.busy:
            return
        self.busy = False
        self.generated = 0
        self.last_throughput = 0.0
        self._publish(*self._token_usage())

    def _prefill_line(self, reqs: list[Req]) -> None:
        new_tokens = sum(r.extend_len for r in reqs)
        # A request's cached prefix counts in the batch that computes its first chunk (where kv_len started from it).
        cached = sum(r.cached_len for r in reqs if r.kv_len - r.extend_len == r.cached_len)
        used, usage = self._token_usage(reqs)
        sched = self.scheduler
        logger.info(
            "Prefill batch. #new-seq: %d, #new-token: %d, #cached-token: %d, token usage: %.2f, #running-req: %d, "
            "#queue-req: %d",
            len(reqs),
            new_tokens,
            cached,
            usage,
            len(sched.running),
            len(sched.waiting),
        )
        total = new_tokens + cached
        self.last_hit_rate = cached / total if total else 0.0
        self._publish(used, usage)

    def _decode_line(self, reqs: list[Req]) -> None:
        batch_size = len(reqs)
        now = time.perf_counter()
        throughput = self.generated / max(now - self.since, 1e-9)
        self.since, self.generated = now, 0
        self.last_throughput = throughput
        used, usage = self._token_usage(reqs)
        sched = self.scheduler
        graphs = getattr(sched.runner, "cuda_graph_runner", None)
        graph = f"cuda graph: {graphs.takes(batch_size, False)}, " if graphs is not None else ""
        logger.info(
            "Decode batch. #running-req: %d, #token: %d, token usage: %.2f, %sgen throughput (token/s): %.2f, "
            "#queue-req: %d",
            batch_size,
            used,
            usage,
            graph,
            throughput,
            len(sched.waiting),
        )
        self._publish(used, usage)

    def _token_usage(self, batch: Sequence[Req] = ()) -> tuple[int, float]:
        """KV slots held by requests (cached but evictable prefixes count as free), and their share of the pool.

        The batch's requests that finished in it were released before this is called; their slots count, so the
        line describes the batch that ran rather than the pool after it.
        """
        sched = self.scheduler
        total = sched.max_total_num_tokens
        used = total - sched.allocator.available_size() - sched.tree_cache.evictable_size()
        used += sum(r.kv_len for r in batch if r.finished)
        return used, used / total if total else 0.0

    def _publish(self, used: int, usage: float) -> None:
        if self.publish is None:
            return
        sched = self.scheduler
        self.publish(
            SchedulerStats(
                num_running_reqs=len(sched.running),
                num_queue_reqs=len(sched.waiting),
                num_used_tokens=used,
                token_usage=usage,
                max_total_num_tokens=sched.max_total_num_tokens,
                gen_throughput=self.last_throughput,
                cache_hit_rate=self.last_hit_rate,
            )
        )
