"""The scheduler: one process per TP rank; rank 0 receives requests and every rank makes the same decisions."""

from __future__ import annotations

import logging
from collections import deque
from typing import Any

import zmq

from sglang.srt import startup_timeline
from sglang.srt.configs.model_config import ModelConfig
from sglang.srt.constrained.grammar_backend import create_grammar_backend
from sglang.srt.distributed.parallel_state import broadcast_pyobj, gather_pyobj
from sglang.srt.layers.sampler import Sampler
from sglang.srt.managers import scheduler_rpc
from sglang.srt.managers.decode_batch import DecodeBatch
from sglang.srt.managers.io_struct import (
    AbortReq,
    BatchTokenIDOut,
    RpcReqInput,
    RpcReqOutput,
    TokenizedGenerateReqInput,
)
from sglang.srt.managers.output_processor import fail
from sglang.srt.managers.overlap import LaunchedStep, needs_sync
from sglang.srt.managers.prefill_adder import admit_prefill
from sglang.srt.managers.profiler import RankProfiler
from sglang.srt.managers.schedule_batch import Req
from sglang.srt.managers.step_runner import StepRunner
from sglang.srt.managers.stop_checker import StopChecker
from sglang.srt.mem_cache.cache_manager import ReqCacheManager
from sglang.srt.metrics.scheduler_stats import BatchStatsLogger
from sglang.srt.model_executor.forward_batch_info import ForwardMode
from sglang.srt.model_executor.model_runner import ModelRunner
from sglang.srt.server_args import PortArgs, ServerArgs

logger = logging.getLogger(__name__)

# How long an idle rank 0 waits for a request before it wakes the other ranks anyway (keeps their
# blocking broadcast far from the process-group timeout without spinning two CPU cores).
_IDLE_POLL_MS = 500
# The same while a control call runs in the background: its answer goes out at most this late.
_DEFERRED_POLL_MS = 5


class Scheduler:
    """Continuous batching with chunked prefill and a radix prefix cache over one rank's ModelRunner."""

    def __init__(self, server_args: ServerArgs, port_args: PortArgs, tp_rank: int, gpu_id: int) -> None:
        self.server_args = server_args
        self.tp_rank = tp_rank
        with startup_timeline.phase("model config"):
            self.model_config = ModelConfig.from_path(
                server_args.model_path, server_args.dtype, server_args.context_length, server_args.device
            )
            self.model_config.check_tp(server_args.tp_size)
        self.runner = ModelRunner(self.model_config, server_args, tp_rank, gpu_id, port_args.dist_init_method)
        self.cache = ReqCacheManager(self.runner, server_args.disable_radix_cache)
        self.allocator = self.cache.allocator
        self.page_size = self.cache.page_size
        self.max_total_num_tokens = self.cache.max_total_num_tokens
        self.max_req_input_len = min(self.model_config.context_len - 1, self.max_total_num_tokens - 1)
        self.tree_cache = self.cache.tree_cache
        with startup_timeline.phase("stop checker (tokenizer)"):
            self.stop_checker = StopChecker(server_args.tokenizer_path, self.model_config)
        self.grammar_backend = create_grammar_backend(
            server_args.grammar_backend,
            lambda: self.stop_checker.tokenizer,
            self.model_config.vocab_size,
            self.stop_checker.eos_ids,
        )
        self.sampler = Sampler(server_args.random_seed, self.stop_checker.stop_ids_for, self.grammar_backend)
        self.waiting: deque[Req] = deque()
        self.decode = DecodeBatch()
        self.chunked_req: Req | None = None
        # Overlap scheduling: the step launched last, whose tokens are applied once the next one is launched.
        self.overlap = not server_args.disable_overlap_schedule
        self.pending: LaunchedStep | None = None
        self.steps = StepRunner(self.runner, self.cache, self.sampler, self.stop_checker, tp_rank, self.overlap)
        self.shutting_down = False
        self.pending_rpcs = scheduler_rpc.PendingRpcs()
        self.profiler = RankProfiler(tp_rank, self.runner.device)
        if tp_rank == 0:
            ctx = zmq.Context(2)
            self.recv_sock = ctx.socket(zmq.PULL)
            self.recv_sock.bind(port_args.scheduler_input_ipc_name)
            self.send_sock = ctx.socket(zmq.PUSH)
            self.send_sock.connect(port_args.tokenizer_ipc_name)
            self.batch_stats = BatchStatsLogger(self, self.send_sock.send_pyobj if server_args.enable_metrics else None)

    @property
    def running(self) -> list[Req]:
        """The decoding requests (the decode batch's list; read-only use outside the scheduler)."""
        return self.decode.reqs

    # ---- main loop -------------------------------------------------------------------------------

    def event_loop(self) -> None:
        """Receive, schedule, run, repeat."""
        while not self.shutting_down:
            for msg in self.recv_requests():
                self.process_input(msg)
            if self.pending_rpcs:
                for rid, answer in self.pending_rpcs.collect(self):
                    self.reply_rpc(rid, answer)
            if not self.step_once() and self.tp_rank == 0:
                self.batch_stats.on_idle()

    def recv_requests(self) -> list[Any]:
        msgs: list[Any] = []
        if self.tp_rank == 0:
            busy = bool(self.waiting or self.running or self.chunked_req or self.pending)
            if busy or self.recv_sock.poll(_DEFERRED_POLL_MS if self.pending_rpcs else _IDLE_POLL_MS):
                while True:
                    try:
                        msgs.append(self.recv_sock.recv_pyobj(zmq.NOBLOCK))
                    except zmq.Again:
                        break
        return broadcast_pyobj(msgs, src=0)

    def process_input(self, msg: Any) -> None:
        if isinstance(msg, TokenizedGenerateReqInput):
            req = Req.from_input(msg)
            req.context_limit = self.model_config.context_len
            if msg.grammar is not None and self.tp_rank == 0:
                req.grammar = self.grammar_backend.matcher(msg.grammar)
            # Decided from the message, not req.grammar (rank 0's alone): every rank must take the same path.
            req.needs_sync = msg.grammar is not None or needs_sync(req)
            if len(req.origin_input_ids) > self.max_req_input_len:
                fail(req, f"prompt of {len(req.origin_input_ids)} tokens exceeds {self.max_req_input_len}")
                self.send_outputs([req])
                return
            self.waiting.append(req)
        elif isinstance(msg, AbortReq):
            self.abort(msg.rid)
        elif isinstance(msg, RpcReqInput):
            self.handle_rpc(msg)

    def handle_rpc(self, msg: RpcReqInput) -> None:
        self.flush_pending()  # a control call sees no step in flight
        answer = scheduler_rpc.run(self, msg.method, msg.params)
        if isinstance(answer, scheduler_rpc.Deferred):
            # Its work (an R-Fork send, say) runs on another thread; the loop answers once it is done everywhere.
            self.pending_rpcs.add(msg.rid, answer)
        else:
            self.reply_rpc(msg.rid, answer)

    def reply_rpc(self, rid: str, answer: dict[str, Any]) -> None:
        results = gather_pyobj(answer, dst=0)
        if self.tp_rank == 0:
            self.send_sock.send_pyobj(RpcReqOutput(rid=rid, results=results))

    def abort(self, rid: str) -> None:
        for req in list(self.waiting):
            if req.rid == rid:
                self.waiting.remove(req)
                if req.req_pool_idx is not None:
                    self.cache.release(req)
                req.finished_reason = {"type": "abort", "message": "aborted"}
                self.send_outputs([req])
        for req in self.running + ([self.chunked_req] if self.chunked_req else []):
            if req.rid == rid and not req.finished:
                req.finished_reason = {"type": "abort", "message": "aborted"}
                self.decode.has_aborted = True

    # ---- batching ---------------------------------------------------------------------------------

    def get_next_batch(self) -> tuple[ForwardMode, list[Req]] | None:
        """The next step: a prefill if any request is admitted, else a decode of every running request."""
        self.drop_aborted_running()
        if self.chunked_req or self.waiting:
            reqs = self.admit_prefill()
            if reqs:
                return ForwardMode.EXTEND, reqs
        if self.decode:
            self.reserve_decode_memory()
        # Retraction may have emptied it (the memory is held by a chunked prefill). Under overlap, a request whose
        # token in flight is its last by length is not decoded again (that step's token would be discarded).
        reqs = [r for r in self.decode.reqs if not r.last_token_in_flight()]
        return (ForwardMode.DECODE, reqs) if reqs else None

    def drop_aborted_running(self) -> None:
        """Release and answer the requests an abort ended since the last step."""
        for req in self.decode.drop_aborted():
            self.cache.release(req)
            self.send_outputs([req])
        if self.chunked_req is not None and self.chunked_req.finished:
            req, self.chunked_req = self.chunked_req, None
            self.cache.release(req)
            self.send_outputs([req])

    def admit_prefill(self) -> list[Req]:
        """Pick requests to prefill this step within the token budget and free KV memory."""
        args = self.server_args
        admission = admit_prefill(
            self.cache,
            self.waiting,
            self.running,
            self.chunked_req,
            args.chunked_prefill_size,
            args.max_running_requests,
        )
        self.chunked_req = admission.chunked_req
        return admission.reqs

    def reserve_decode_memory(self) -> None:
        """Make room for one token per running request (retracting or stopping the newest if needed)."""
        stopped = self.decode.reserve_memory(self.cache, self.waiting, self.flush_pending)
        self.send_outputs(stopped)

    def flush_pending(self) -> None:
        """Apply the step still in flight, if any (there is none without overlap scheduling)."""
        if self.pending is not None:
            step, self.pending = self.pending, None
            self.process_step(step)

    # ---- running a batch ----------------------------------------------------------------------------

    def step_once(self) -> bool:
        """Schedule and run one step; under overlap, launch it and then apply the one before. False when idle."""
        step = self.get_next_batch()
        if not self.overlap:
            if step is not None:
                self.run_batch(*step)
            return step is not None
        launched = None
        if step is not None:
            mode, reqs = step
            if any(r.needs_sync for r in reqs):
                self.run_batch(mode, reqs)  # its sampling needs every earlier token on the host
            else:
                launched = self.launch_batch(mode, reqs, overlap=True)
        previous, self.pending = self.pending, launched
        if previous is not None:
            self.process_step(previous)
        return step is not None or previous is not None

    def run_batch(self, mode: ForwardMode, reqs: list[Req]) -> None:
        """Run one step to its end: forward, sampling, and its tokens applied."""
        if self.pending is not None:
            self.flush_pending()
            reqs = [r for r in reqs if not r.finished]  # chosen before the step in flight ended some
            if not reqs:
                return
        self.process_step(self.launch_batch(mode, reqs, overlap=False))

    def launch_batch(self, mode: ForwardMode, reqs: list[Req], overlap: bool) -> LaunchedStep:
        """Enqueue a step; its prefilled requests join the decode batch now (under overlap the next step decodes
        them before their first token is read)."""
        step = self.steps.launch(mode, reqs, overlap)
        if mode.is_extend():
            self.decode.add(step.sampled)
        if self.tp_rank == 0:
            self.batch_stats.on_batch(mode, reqs)
        return step

    def process_step(self, step: LaunchedStep) -> None:
        """Apply a launched step's tokens: outputs, stop checks, and the release of every request that ended."""
        live, ended = self.steps.apply(step)
        if ended:
            if any(r is self.chunked_req for r in ended):
                self.chunked_req = None
            self.decode.drop_finished()
        self.send_outputs([r for r in live if self.output_due(r)])
        self.profiler.on_step()
        if self.tp_rank == 0 and not (self.waiting or self.running or self.chunked_req):
            self.batch_stats.on_idle()  # now: a scrape right after the last reply sees the server drained

    def output_due(self, req: Req) -> bool:
        """Whether req's new tokens go out now: at its end, its first token, or every --stream-interval tokens."""
        new = len(req.output_ids) - req.sent_len
        return req.finished or (new > 0 and (req.sent_len == 0 or new >= self.server_args.stream_interval))

    def send_outputs(self, reqs: list[Req]) -> None:
        if self.tp_rank != 0 or not reqs:
            return
        out = BatchTokenIDOut()
        for req in reqs:
            out.rids.append(req.rid)
            out.new_token_ids.append(req.output_ids[req.sent_len :])
            out.finished_reasons.append(req.finished_reason)
            out.prompt_tokens.append(len(req.origin_input_ids))
            out.completion_tokens.append(len(req.output_ids))
            out.cached_tokens.append(req.cached_tokens)
            out.new_token_logprobs.append(req.new_logprobs)
            out.new_top_logprobs.append(req.new_top_logprobs)
            req.sent_len = len(req.output_ids)
            req.new_logprobs, req.new_top_logprobs = [], []
        self.send_sock.send_pyobj(out)

    def get_load(self) -> dict[str, int]:
        """Counters for /get_server_info and tests."""
        return {
            "num_running_reqs": len(self.running),
            "num_waiting_reqs": len(self.waiting),
            "available_kv_tokens": self.allocator.available_size(),
            "evictable_kv_tokens": self.tree_cache.evictable_size(),
            "max_total_num_tokens": self.max_total_num_tokens,
            "cached_tokens_total": self.cache.cached_tokens_total,
        }
