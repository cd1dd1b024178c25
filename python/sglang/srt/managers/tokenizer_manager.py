"""TokenizerManager: the main process's side of serving — tokenize, hand to rank 0, detokenize, stream."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import zmq
import zmq.asyncio

from sglang.srt.configs.model_config import ModelConfig
from sglang.srt.constrained.grammar_backend import compile_request_grammar, create_grammar_backend
from sglang.srt.entrypoints.openai.chat_templates import resolve_chat_template
from sglang.srt.managers.detokenizer import IncrementalDetokenizer
from sglang.srt.managers.io_struct import (
    AbortReq,
    BatchTokenIDOut,
    GenerateReqInput,
    InvalidRequestError,
    RpcReqInput,
    RpcReqOutput,
    TokenizedGenerateReqInput,
    new_rid,
)
from sglang.srt.managers.request_limits import RequestLimits
from sglang.srt.managers.request_state import ReqState
from sglang.srt.managers.stop_checker import eos_token_ids
from sglang.srt.metrics.scheduler_stats import SchedulerStats
from sglang.srt.metrics.telemetry import RequestTelemetry
from sglang.srt.sampling.sampling_defaults import load_sampling_defaults
from sglang.srt.sampling.sampling_params import SamplingParams
from sglang.srt.server_args import PortArgs, ServerArgs

logger = logging.getLogger(__name__)

# Texts up to this many characters are tokenized on the event loop (well under a millisecond); longer ones on
# a worker thread. Two workers: one huge prompt cannot hold up every other long one.
INLINE_TOKENIZE_CHARS = 16384
TOKENIZE_WORKERS = 2


class TokenizerManager:
    """Routes generate and control requests to the schedulers and their answers back to callers."""

    def __init__(
        self,
        server_args: ServerArgs,
        port_args: PortArgs,
        scheduler_info: dict[str, Any] | None = None,
        model_config: ModelConfig | None = None,
    ) -> None:
        """model_config: the server's, when the caller has read it already."""
        from sglang.srt.configs.hf_files import load_tokenizer

        self.server_args = server_args
        self.model_config = model_config or ModelConfig.from_path(
            server_args.model_path, server_args.dtype, server_args.context_length, server_args.device
        )
        self.tokenizer = load_tokenizer(server_args.tokenizer_path)
        if server_args.chat_template is not None:
            self.tokenizer.chat_template = resolve_chat_template(server_args.chat_template)
        self.sampling_defaults = load_sampling_defaults(server_args.sampling_defaults, server_args.model_path)
        self.grammar_backend = create_grammar_backend(
            server_args.grammar_backend,
            lambda: self.tokenizer,
            self.model_config.vocab_size,
            eos_token_ids(self.model_config),
        )
        self.telemetry = RequestTelemetry.from_args(server_args, self.tokenizer)
        self.scheduler_info: dict[str, Any] = {}
        # Complete once the schedulers report how many prompt tokens they take (attach_schedulers).
        self.limits = RequestLimits.build(server_args, self.model_config.vocab_size, 0, self.tokenizer)
        self.tokenize_pool = ThreadPoolExecutor(TOKENIZE_WORKERS, thread_name_prefix="tokenize")
        self.startup_timeline: dict[str, Any] | None = None
        if scheduler_info is not None:
            self.attach_schedulers(scheduler_info)
        ctx = zmq.asyncio.Context(2)
        # Never block closing (or garbage-collecting) a socket on messages no scheduler will read: this manager is
        # built while the ranks start, so a start that fails leaves it with peers that never came up.
        ctx.setsockopt(zmq.LINGER, 0)
        self.send_sock = ctx.socket(zmq.PUSH)
        self.send_sock.connect(port_args.scheduler_input_ipc_name)
        self.recv_sock = ctx.socket(zmq.PULL)
        self.recv_sock.bind(port_args.tokenizer_ipc_name)
        self.rid_to_state: dict[str, ReqState] = {}
        self.wire_to_state: dict[str, ReqState] = {}
        self.rpc_waiters: dict[str, asyncio.Future] = {}
        self.dead_reason: str | None = None
        self._loop_task: asyncio.Task | None = None

    # ---- generation ---------------------------------------------------------------------------

    async def generate_request(
        self, obj: GenerateReqInput, cumulative: bool | None = None
    ) -> AsyncIterator[dict[str, Any] | list[dict[str, Any]]]:
        """Yield outputs for obj: one final dict (or list for a batch), or, when streaming, dicts holding everything
        so far (cumulative; by default unless --incremental-streaming-output) or only what is new."""
        self._ensure_loop()
        if cumulative is None:
            cumulative = not self.server_args.incremental_streaming_output
        parts = obj.split(self.limits.check_n)
        # Validate the whole batch before sending any of it.
        reqs = [await self._tokenize(p) for p in parts]
        states = self._admit(reqs)
        try:
            async for out in self._outputs(obj, states, cumulative):
                yield out
        finally:
            for state in states:
                self._forget(state)

    async def _outputs(
        self, obj: GenerateReqInput, states: list[ReqState], cumulative: bool
    ) -> AsyncIterator[dict[str, Any] | list[dict[str, Any]]]:
        if not obj.is_batch() and len(states) == 1:
            async for out in self._run_one(states[0], obj.stream, cumulative):
                yield out
            return
        if not obj.stream:
            yield list(await asyncio.gather(*(last_output(self._run_one(s, False, cumulative)) for s in states)))
            return
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(index: int, gen: AsyncIterator[dict[str, Any]]) -> None:
            try:
                async for out in gen:
                    await queue.put({**out, "index": index})
            finally:
                await queue.put(None)

        tasks = [asyncio.create_task(pump(i, self._run_one(s, True, cumulative))) for i, s in enumerate(states)]
        try:
            remaining = len(tasks)
            while remaining:
                item = await queue.get()
                if item is None:
                    remaining -= 1
                else:
                    yield item
        finally:
            for t in tasks:
                t.cancel()

    async def encode(
        self, text: Any, field_name: str, add_special_tokens: bool = True, check_length: bool = True
    ) -> list[int]:
        """Token ids of a prompt text. Long texts are tokenized on a worker thread (the tokenizer lets go of the
        GIL), so that a megabyte prompt does not stop the event loop, and every other client, for seconds. With
        check_length, a text too long for any prompt this server takes is refused without tokenizing it."""
        if not isinstance(text, str):
            raise InvalidRequestError(field_name, f"expected a string, got {type(text).__name__}.")
        if check_length:
            self.limits.check_prompt_text(text, field_name)
        work = functools.partial(self.tokenizer.encode, text, add_special_tokens=add_special_tokens)
        try:
            if len(text) <= INLINE_TOKENIZE_CHARS:
                return work()
            return await asyncio.get_running_loop().run_in_executor(self.tokenize_pool, work)
        except (TypeError, ValueError) as e:  # e.g. a lone surrogate (\ud800), which is not text the tokenizer takes
            raise InvalidRequestError(field_name, f"the prompt cannot be tokenized: {e}") from None

    async def _tokenize(self, obj: GenerateReqInput) -> TokenizedGenerateReqInput:
        params = SamplingParams.from_dict(obj.sampling_params, self.sampling_defaults)
        self.limits.check_sampling(params)
        if obj.return_logprob:
            self.limits.check_top_logprobs_num(obj.top_logprobs_num)
        # Compiled here, so a bad schema is a 400 before anything is queued and the scheduler never compiles.
        grammar = compile_request_grammar(self.grammar_backend, params)
        if obj.input_ids is not None:
            ids = list(obj.input_ids)
            self._check_length(ids, "input_ids")  # first: the vocabulary check below reads every id
            vocab = self.model_config.vocab_size
            bad = [t for t in ids if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab]
            if bad:
                raise InvalidRequestError("input_ids", f"token id {bad[0]!r} is not in the vocabulary [0, {vocab}).")
        else:
            ids = await self.encode(obj.text, "text")
            self._check_length(ids, "text")
        rid = obj.rid if isinstance(obj.rid, str) else new_rid()
        return TokenizedGenerateReqInput(rid, ids, params, obj.return_logprob, obj.top_logprobs_num, grammar)

    def _check_length(self, ids: list[int], field_name: str) -> None:
        if not ids:
            raise InvalidRequestError(field_name, "the prompt is empty; send at least one token.")
        if len(ids) > self.limits.max_prompt_tokens:
            raise InvalidRequestError(
                field_name,
                f"the prompt has {len(ids)} tokens, more than this server accepts ({self.limits.max_prompt_tokens}; "
                f"context length {self.model_config.context_len}). Shorten the prompt.",
            )

    def _admit(self, reqs: list[TokenizedGenerateReqInput]) -> list[ReqState]:
        """Register reqs and send them to the scheduler, all or none. No await in here: a request id is checked and
        taken in one step, so two requests can never share one (the second would wait forever for its answers)."""
        if self.dead_reason:
            raise RuntimeError(self.dead_reason)
        seen: set[str] = set()
        for req in reqs:
            if req.rid in self.rid_to_state or req.rid in seen:
                raise InvalidRequestError(
                    "rid",
                    f"request id {req.rid!r} is already in use (by a running request, or twice in this batch; "
                    "with n > 1, choice j of rid r is r-j). Give every request its own rid, or none.",
                )
            seen.add(req.rid)
        states = []
        for req in reqs:
            detokenizer = IncrementalDetokenizer(self.tokenizer, req.sampling_params.skip_special_tokens)
            state = ReqState(req.rid, new_rid(), len(req.input_ids), detokenizer)
            self.rid_to_state[state.rid] = self.wire_to_state[state.wire_id] = state
            states.append(state)
        for req, state in zip(reqs, states):
            self.send_sock.send_pyobj(dataclasses.replace(req, rid=state.wire_id))
            self.telemetry.on_submit(req)
        return states

    def _forget(self, state: ReqState) -> None:
        """Drop state (aborting it in the scheduler if it still runs); its rid is free for a new request then.
        Only the first call acts: by a later one, a new request may hold the rid."""
        if self.wire_to_state.pop(state.wire_id, None) is None:
            return
        if self.rid_to_state.get(state.rid) is state:
            del self.rid_to_state[state.rid]
        if not state.finished:
            self.send_sock.send_pyobj(AbortReq(state.wire_id))
        self.telemetry.on_close(state)

    async def _run_one(self, state: ReqState, stream: bool, cumulative: bool) -> AsyncIterator[dict[str, Any]]:
        while True:
            await state.event.wait()
            state.event.clear()
            done = state.finished
            if done:
                # Forget the request before handing out the last answer: a caller that stops iterating
                # here must not leave its state behind.
                self._forget(state)
            if stream or done:
                # Built now, from everything received so far (nothing can arrive while this runs).
                out = self._output(state, incremental=stream)
                yield out if cumulative or not stream else state.sent.cut(out)
            if done:
                return

    def abort_request(self, rid: str) -> None:
        """Ask the scheduler to stop the running request with this rid and free its memory (none: nothing to do)."""
        state = self.rid_to_state.get(rid)
        if state is not None and not state.finished:
            self.send_sock.send_pyobj(AbortReq(state.wire_id))

    def abort_all(self) -> None:
        """Abort every request in flight (used at shutdown)."""
        for rid in list(self.rid_to_state):
            self.abort_request(rid)

    # ---- control ------------------------------------------------------------------------------

    async def rpc(self, method: str, timeout: float | None = 300.0, **params: Any) -> list[Any]:
        """Run a control method on every TP rank; returns per-rank values or raises RuntimeError."""
        self._ensure_loop()
        if self.dead_reason:
            raise RuntimeError(self.dead_reason)
        msg = RpcReqInput(method=method, params=params)
        fut = asyncio.get_running_loop().create_future()
        self.rpc_waiters[msg.rid] = fut
        self.send_sock.send_pyobj(msg)
        try:
            results = await asyncio.wait_for(fut, timeout)
        finally:
            self.rpc_waiters.pop(msg.rid, None)
        for rank, res in enumerate(results):
            if not res["ok"]:
                raise RuntimeError(f"TP{rank}: {res['error']}")
        return [res["value"] for res in results]

    def mark_dead(self, reason: str) -> None:
        """A scheduler died: fail everything in flight and every later call with reason."""
        self.dead_reason = reason
        for state in self.rid_to_state.values():
            if not state.finished:
                state.finish_reason = {"type": "abort", "message": reason}
            state.event.set()
        for fut in self.rpc_waiters.values():
            if not fut.done():
                fut.set_exception(RuntimeError(reason))

    async def close(self) -> None:
        """Stop receiving (used when the owner of the event loop shuts down)."""
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
        self.close_sockets()

    def close_sockets(self) -> None:
        """Close the IPC sockets now (idempotent; for a start that failed before any loop ran)."""
        self.recv_sock.close(linger=0)
        self.send_sock.close(linger=0)
        self.tokenize_pool.shutdown(wait=False, cancel_futures=True)

    # ---- receiving ----------------------------------------------------------------------------

    def _ensure_loop(self) -> None:
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = asyncio.get_running_loop().create_task(self._handle_loop())

    async def _handle_loop(self) -> None:
        while True:
            msg = await self.recv_sock.recv_pyobj()
            if isinstance(msg, BatchTokenIDOut):
                self._handle_tokens(msg)
            elif isinstance(msg, RpcReqOutput):
                fut = self.rpc_waiters.get(msg.rid)
                if fut is not None and not fut.done():
                    fut.set_result(msg.results)
            elif isinstance(msg, SchedulerStats):
                self.telemetry.on_scheduler_stats(msg)

    def _handle_tokens(self, msg: BatchTokenIDOut) -> None:
        for i, wire_id in enumerate(msg.rids):
            state = self.wire_to_state.get(wire_id)
            if state is None:
                continue
            state.output_ids.extend(msg.new_token_ids[i])
            if msg.new_token_logprobs and msg.new_token_logprobs[i]:
                new_ids = msg.new_token_ids[i]
                state.logprobs.extend(zip(msg.new_token_logprobs[i], new_ids))
                state.top_logprobs.extend(msg.new_top_logprobs[i])
            state.cached_tokens = msg.cached_tokens[i]
            state.finish_reason = msg.finished_reasons[i]
            state.event.set()
            self.telemetry.on_tokens(state, len(msg.new_token_ids[i]))

    def _output(self, state: ReqState, incremental: bool) -> dict[str, Any]:
        reason, cached = state.finish_reason, state.cached_tokens
        if incremental:
            # A stream: only the newest ids are decoded (a character whose bytes are not all here is held back).
            text = state.detokenizer.text(state.output_ids, final=reason is not None)
        else:
            text = state.detokenizer.decode(state.output_ids)  # once per request
        if reason is not None and reason.get("type") == "stop" and isinstance(reason.get("matched"), str):
            text = text[: text.find(reason["matched"])] if reason["matched"] in text else text
        if reason is not None and reason.get("type") == "length":
            reason = {**reason, "length": len(state.output_ids)}
        meta: dict[str, Any] = {
            "id": state.rid,
            "prompt_tokens": state.prompt_tokens,
            "completion_tokens": len(state.output_ids),
            "cached_tokens": cached,
            "finish_reason": reason,
        }
        if state.logprobs:
            meta["output_token_logprobs"] = list(state.logprobs)
            meta["output_top_logprobs"] = list(state.top_logprobs)
        return {"text": text, "output_ids": list(state.output_ids), "meta_info": meta}

    def model_info(self) -> dict[str, Any]:
        """What /get_model_info reports."""
        return {
            "model_path": self.server_args.model_path,
            "tokenizer_path": self.server_args.tokenizer_path,
            "is_generation": True,
            "architecture": self.model_config.architecture,
            "dtype": str(self.model_config.dtype).replace("torch.", ""),
            "context_length": self.model_config.context_len,
        }

    def attach_schedulers(self, scheduler_info: dict[str, Any]) -> None:
        """Take what rank 0 reported once it has started (this manager is built while the ranks load)."""
        self.scheduler_info = scheduler_info
        self.limits = dataclasses.replace(self.limits, max_prompt_tokens=scheduler_info["max_req_input_len"])

    def server_info(self) -> dict[str, Any]:
        """Static part of /get_server_info: the arguments, what the schedulers reported and the start-up timeline."""
        return {
            **dataclasses.asdict(self.server_args),
            **self.scheduler_info,
            "startup_timeline": self.startup_timeline,
        }


async def last_output(gen: AsyncIterator[Any]) -> Any:
    """Run an output generator to its end and return the last thing it yielded."""
    last = None
    async for out in gen:
        last = out
    return last
