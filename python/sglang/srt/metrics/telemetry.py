"""Per-request hooks of the TokenizerManager: latency histograms and token counters, and the request log."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sglang.srt.metrics.request_log import RequestLogger

if TYPE_CHECKING:
    from sglang.srt.managers.io_struct import TokenizedGenerateReqInput
    from sglang.srt.managers.request_state import ReqState
    from sglang.srt.metrics.collector import ServerMetrics
    from sglang.srt.metrics.scheduler_stats import SchedulerStats
    from sglang.srt.server_args import ServerArgs


@dataclass
class _Clock:
    """When a request arrived, got its first token and its newest one (perf_counter seconds)."""

    start: float
    first: float | None = None
    last: float | None = None


class RequestTelemetry:
    """What the TokenizerManager reports per request; does nothing without --enable-metrics or --log-requests."""

    def __init__(self, metrics: ServerMetrics | None, request_log: RequestLogger | None) -> None:
        self.metrics = metrics
        self.request_log = request_log
        self.enabled = metrics is not None or request_log is not None
        self.clocks: dict[str, _Clock] = {}

    @classmethod
    def from_args(cls, server_args: ServerArgs, tokenizer: Any) -> RequestTelemetry:
        """The telemetry the flags ask for."""
        metrics = None
        if server_args.enable_metrics:
            from sglang.srt.metrics.collector import ServerMetrics

            metrics = ServerMetrics(server_args.served_model_name)
        request_log = RequestLogger(server_args.log_requests_level, tokenizer) if server_args.log_requests else None
        return cls(metrics, request_log)

    def on_submit(self, req: TokenizedGenerateReqInput) -> None:
        """req was sent to the scheduler."""
        if not self.enabled:
            return
        self.clocks[req.rid] = _Clock(time.perf_counter())
        if self.request_log is not None:
            self.request_log.received(req.rid, req.input_ids, req.sampling_params)

    def on_tokens(self, state: ReqState, new_tokens: int) -> None:
        """new_tokens output tokens (possibly none, with a finish) arrived for state."""
        clock = self.clocks.get(state.rid) if self.enabled else None
        if clock is None:
            return
        now = time.perf_counter()
        if new_tokens and self.metrics is not None:
            if clock.first is None:
                self.metrics.ttft.observe(now - clock.start)
            else:
                # A chunk of several tokens (--stream-interval) spreads its wait evenly over them.
                gap = (now - clock.last) / new_tokens
                for _ in range(new_tokens):
                    self.metrics.itl.observe(gap)
        if new_tokens:
            clock.first = clock.first or now
            clock.last = now
        if state.finished:
            self._end(state, now, state.finish_reason)

    def on_close(self, state: ReqState) -> None:
        """The caller stopped reading state: account for it if it did not finish (client gone, server dead)."""
        if self.enabled and state.rid in self.clocks:
            reason = state.finish_reason or {"type": "abort", "message": "the client went away"}
            self._end(state, time.perf_counter(), reason)

    def on_scheduler_stats(self, stats: SchedulerStats) -> None:
        """Rank 0 sent a snapshot of its load."""
        if self.metrics is not None:
            self.metrics.set_scheduler_stats(stats)

    def _end(self, state: ReqState, now: float, reason: dict[str, Any]) -> None:
        clock = self.clocks.pop(state.rid)
        latency = now - clock.start
        ttft = clock.first - clock.start if clock.first is not None else None
        if self.metrics is not None:
            m = self.metrics
            m.num_requests.inc()
            m.prompt_tokens.inc(state.prompt_tokens)
            m.generation_tokens.inc(len(state.output_ids))
            m.cached_tokens.inc(state.cached_tokens)
            m.e2e.observe(latency)
            if reason.get("type") == "abort":
                m.num_aborted.inc()
        if self.request_log is not None:
            self.request_log.finished(
                state.rid, state.prompt_tokens, state.output_ids, state.cached_tokens, reason, latency, ttft
            )
