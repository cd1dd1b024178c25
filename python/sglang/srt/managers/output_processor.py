"""Applies one step's sampled tokens to its requests: outputs, logprobs, stop checks, grammar ends."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sglang.srt.layers.sampler import SampleOutput
    from sglang.srt.managers.schedule_batch import Req
    from sglang.srt.managers.stop_checker import StopChecker

logger = logging.getLogger(__name__)


def apply_sample(reqs: list[Req], sample: SampleOutput, stop_checker: StopChecker, context_len: int) -> None:
    """Give request j token sample.token_ids[j] and decide whether it is finished (every rank decides alike).

    A request that finished before this step's result arrived (an abort, or under overlap scheduling a stop
    found one step earlier) takes nothing: its token was computed for a sequence that had already ended.
    """
    for j, req in enumerate(reqs):
        if req.finished:
            continue
        if j in sample.errors:
            fail(req, sample.errors[j])
            continue
        req.output_ids.append(sample.token_ids[j])
        if req.return_logprob:
            req.new_logprobs.append(sample.logprobs[j])
            req.new_top_logprobs.append(sample.top_logprobs[j] or [])
        try:
            stop_checker.check(req, context_len)
        except Exception as e:  # every rank fails alike: they check the same tokens
            logger.exception("Stop check of request %s failed", req.rid)
            fail(req, f"stop check failed: {type(e).__name__}: {e}")
        if sample.grammar_finish and sample.grammar_finish[j] is not None and not req.finished:
            req.finished_reason = sample.grammar_finish[j]  # e.g. a complete grammar under ignore_eos


def fail(req: Req, message: str) -> None:
    """End req alone with an abort carrying message (what the client reads)."""
    logger.warning("Request %s aborted: %s", req.rid, message)
    req.finished_reason = {"type": "abort", "message": message}
