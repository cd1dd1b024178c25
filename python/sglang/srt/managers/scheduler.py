"""The scheduler: one process per TP rank; rank 0 receives requests and every rank makes the same decisions."""

from __future__ import annotations

import logging
from collections import deque
from typing import Any

import torch
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
from sglang.srt.managers.output_processor import apply_sample, fail
from sglang.srt.managers.prefill_adder import admit_prefill
from sglang.srt.managers.profiler import RankProfiler
from sglang.srt.managers.schedule_batch import Req, alloc_kv_slots, build_forward_batch
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
            step = self.get_next_batch()
            if step is not None:
                self.run_batch(*step)
            elif self.tp_rank == 0:
                self.batch_stats.on_idle()

    def recv_requests(self) -> list[Any]:
        msgs: list[Any] = []
        if self.tp_rank == 0:
            busy = bool(self.waiting or self.running or self.chunked_req)
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
            if msg.grammar is not None and self.tp_rank == 0:
                req.grammar = self.grammar_backend.matcher(msg.grammar)
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
        if self.decode:  # retraction may have emptied it (the memory is held by a chunked prefill)
            return ForwardMode.DECODE, list(self.decode.reqs)
        return None

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
        """Apply a step still in flight (none without overlap scheduling)."""

    # ---- running a batch ----------------------------------------------------------------------------

    def run_batch(self, mode: ForwardMode, reqs: list[Req]) -> None:
        out_cache_loc = alloc_kv_slots(reqs, mode, self.runner)
        assert out_cache_loc is not None, "memory was reserved before scheduling"
        batch = build_forward_batch(reqs, mode, out_cache_loc, self.runner)
        output = self.runner.forward(batch)
        extend = mode.is_extend()
        # One pass over the batch with O(1) work per request: which rows are sampled, which are done.
        rows: list[int] = []
        sampled: list[Req] = []
        for i, req in enumerate(reqs):
            req.kv_len += req.extend_len if extend else 1
            if req.finished or req.kv_len < req.seqlen:  # a chunk of a longer prefill: nothing to sample yet
                continue
            limit = req.sampling_params.max_new_tokens
            if limit is not None and limit <= len(req.output_ids):
                req.finished_reason = {"type": "length", "matched": None}  # asked for no tokens
                continue
            rows.append(i)
            sampled.append(req)
        if rows:
            self.sample_into(sampled, output.next_token_logits, rows)
        if extend:
            self.decode.add([r for r in sampled if not r.finished])
        done = False
        for req in reqs:
            if req.finished:
                done = True
                if req is self.chunked_req:
                    self.chunked_req = None
                self.cache.release(req)
        if done and not extend:
            self.decode.drop_finished()
        self.send_outputs([r for r in reqs if self.output_due(r)])
        self.profiler.on_step()
        if self.tp_rank == 0:
            self.batch_stats.on_batch(mode, reqs)

    def sample_into(self, reqs: list[Req], logits: torch.Tensor, rows: list[int]) -> None:
        """Rank 0 samples one token per request and shares the choice, so every rank stays in step."""
        sample = None
        if self.tp_rank == 0:
            sample = self.sampler.sample_guarded(logits[torch.tensor(rows, device=logits.device)], reqs)
        sample = broadcast_pyobj(sample, src=0)
        apply_sample(reqs, sample, self.stop_checker, self.model_config.context_len)

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
