"""One scheduler step on the device and its tokens on the host: launch (forward + sampling), then apply them."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from sglang.srt.distributed.parallel_state import broadcast_pyobj
from sglang.srt.layers.sampler import SampleOutput
from sglang.srt.managers.output_processor import apply_sample
from sglang.srt.managers.overlap import LaunchedStep, TokenRelay, copy_to_host, sample_on_device, share_token_ids
from sglang.srt.managers.schedule_batch import alloc_kv_slots, build_forward_batch

if TYPE_CHECKING:
    from sglang.srt.layers.sampler import Sampler
    from sglang.srt.managers.schedule_batch import Req
    from sglang.srt.managers.stop_checker import StopChecker
    from sglang.srt.mem_cache.cache_manager import ReqCacheManager
    from sglang.srt.model_executor.forward_batch_info import ForwardMode
    from sglang.srt.model_executor.model_runner import ModelRunner


class StepRunner:
    """Runs a batch the scheduler chose: KV slots, forward, sampling (rank 0, shared with the other ranks), and
    later the tokens applied to the requests with their stop checks and the release of those that ended."""

    def __init__(
        self,
        runner: ModelRunner,
        cache: ReqCacheManager,
        sampler: Sampler,
        stop_checker: StopChecker,
        tp_rank: int,
        overlap: bool,
    ) -> None:
        self.runner = runner
        self.cache = cache
        self.sampler = sampler
        self.stop_checker = stop_checker
        self.context_len = runner.model_config.context_len
        self.tp_rank = tp_rank
        rows = runner.req_to_token_pool.req_to_token.shape[0]
        # Overlap scheduling: every step's tokens also go to the device relay, the next decode step's input.
        self.relay = TokenRelay(rows, runner.device) if overlap else None

    def launch(self, mode: ForwardMode, reqs: list[Req], overlap: bool) -> LaunchedStep:
        """Enqueue a step's forward and sampling; without overlap its tokens are on the host when this returns."""
        out_cache_loc = alloc_kv_slots(reqs, mode, self.runner)
        assert out_cache_loc is not None, "memory was reserved before scheduling"
        source = self.relay.ids if overlap else None
        batch = build_forward_batch(
            reqs, mode, out_cache_loc, self.runner, token_source=source, host_slots=self.cache.host_slots
        )
        self.sampler.prefetch_masks(reqs)  # grammar masks are filled on a worker thread while the forward runs
        output = self.runner.forward(batch)
        extend = mode.is_extend()
        # One pass over the batch with O(1) work per request: which rows are sampled, which are done.
        live: list[Req] = []
        rows: list[int] = []
        sampled: list[Req] = []
        for i, req in enumerate(reqs):
            req.kv_len += req.extend_len if extend else 1
            if req.finished:
                continue
            live.append(req)
            if req.kv_len < req.seqlen:  # a chunk of a longer prefill: nothing to sample yet
                continue
            limit = req.sampling_params.max_new_tokens
            if extend and limit is not None and limit <= len(req.output_ids):
                req.finished_reason = {"type": "length", "matched": None}  # asked for no tokens
                continue
            rows.append(i)
            sampled.append(req)
        step = LaunchedStep(live, sampled)
        if not sampled:
            step.sample = SampleOutput([], [], [], [])
            return step
        logits = output.next_token_logits
        if len(rows) < logits.shape[0]:
            logits = logits[torch.tensor(rows).to(logits.device, non_blocking=True)]
        if overlap:
            ids, step.errors = sample_on_device(self.sampler, logits, sampled) if self.tp_rank == 0 else (None, {})
            ids = share_token_ids(ids, len(sampled), self.runner.device)
            self.relay.write(sampled, ids)
            step.ids_host, step.ready = copy_to_host(ids)
            for req in sampled:
                req.tokens_in_flight += 1
        else:
            step.sample = self.sample_now(sampled, logits)
        return step

    def sample_now(self, reqs: list[Req], logits: torch.Tensor) -> SampleOutput:
        """Rank 0 samples one token per request and shares the choice, so every rank stays in step."""
        sample = self.sampler.sample_guarded(logits, reqs) if self.tp_rank == 0 else None
        sample = broadcast_pyobj(sample, src=0)
        if self.relay is not None:  # a later overlapped step reads these tokens from the device
            ids = [-1 if t is None else t for t in sample.token_ids]
            self.relay.write(reqs, torch.tensor(ids, dtype=torch.int64))
        return sample

    def apply(self, step: LaunchedStep) -> tuple[list[Req], list[Req]]:
        """Apply a launched step's tokens and release every request that ended; returns the step's requests that
        were still unanswered (their outputs may be due) and those of them that ended."""
        # A request released since the launch (an abort, or a stop found one step earlier) was answered then.
        live = [r for r in step.live if r.req_pool_idx is not None]
        if step.sampled:
            overlapped = step.sample is None
            apply_sample(step.sampled, step.resolve(), self.stop_checker, self.context_len)
            if overlapped:
                for req in step.sampled:
                    req.tokens_in_flight -= 1
        ended = [r for r in live if r.finished]
        for req in ended:
            self.cache.release(req)
        return live, ended
