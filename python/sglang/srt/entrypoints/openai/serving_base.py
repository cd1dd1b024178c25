"""Plumbing shared by the HTTP endpoints: start a generation, stream it as SSE, abort when the client leaves."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

from fastapi import Request

from sglang.srt.entrypoints.openai.protocol import OPENAI_NAME_OF, APIError, SamplingRequest
from sglang.srt.entrypoints.openai.stop_prefix import StopAutomaton, StopPrefixTracker
from sglang.srt.managers.io_struct import GenerateReqInput, new_rid
from sglang.srt.sampling.sampling_params import SamplingParamsError

if TYPE_CHECKING:
    from sglang.srt.managers.tokenizer_manager import TokenizerManager

SSE_DONE = "data: [DONE]\n\n"


class ClientDisconnected(Exception):
    """The client closed the connection before its answer was ready; the request was aborted."""


def sse_event(data: Any) -> str:
    """One server-sent event carrying data as JSON."""
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


async def start_generation(
    request: Request,
    tm: TokenizerManager,
    obj: GenerateReqInput,
    prompt_param: str,
    rename: Callable[[str], str] = lambda field: f"sampling_params.{field}",
    cumulative: bool | None = True,
) -> tuple[Any, AsyncIterator[Any]]:
    """Run obj up to its first output (the whole answer unless streaming) and return it with the rest.

    Bad input therefore becomes a 400 before any byte of a stream is sent. If the client disconnects
    while we wait, the request is aborted and ClientDisconnected is raised.

    Streamed outputs are cumulative by default: the OpenAI routes make their own deltas, holding back what may be
    the beginning of a stop string; /generate passes None (the server's --incremental-streaming-output).
    """
    gen = tm.generate_request(obj, cumulative)
    step = asyncio.ensure_future(anext(gen))
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({step, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        gone = not step.done()
        if gone:
            step.cancel()  # the TokenizerManager aborts what obj started as the cancellation unwinds it
    if gone:
        raise ClientDisconnected()
    try:
        first = step.result()
    except SamplingParamsError as e:
        raise renamed(e, rename) from None
    except ValueError as e:
        field = getattr(e, "field", None)
        # The TokenizerManager names the prompt "text" or "input_ids"; each API calls it its own way.
        param = prompt_param if field in (None, "text", "input_ids") else field
        raise APIError(str(e), param=param) from None
    except StopAsyncIteration:
        raise APIError("The request produced no output.", status_code=500) from None
    if not obj.stream:
        await gen.aclose()  # the answer is complete; let the TokenizerManager drop its state now
    return first, gen


def renamed(e: SamplingParamsError, rename: Callable[[str], str]) -> APIError:
    """A sampling-parameter error as a 400 naming the field the way the route's API calls it."""
    param = rename(e.field)
    return APIError(str(e).replace(f"sampling_params.{e.field}", param), param=param)


def check_choices(tm: TokenizerManager, req: SamplingRequest) -> None:
    """Refuse an n above --max-n before the route copies each prompt n times."""
    try:
        tm.limits.check_n(req.n)
    except SamplingParamsError as e:
        raise renamed(e, openai_param) from None


async def _wait_for_disconnect(request: Request) -> None:
    # The body has been read already, so the next message the server hands us is the disconnect.
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def guard_stream(events: AsyncIterator[str], rest: AsyncIterator[Any]) -> AsyncIterator[str]:
    """Pass events through; if the stream stops early (client gone, server shutting down), close rest, the
    generation behind it, so the TokenizerManager aborts its requests. Never an abort by request id here: by the
    time it ran, a new request could have taken the id of a request that has ended."""
    try:
        async for event in events:
            yield event
    finally:
        await events.aclose()  # type: ignore[attr-defined]
        await rest.aclose()  # type: ignore[attr-defined]


def with_rids(obj: GenerateReqInput) -> GenerateReqInput:
    """Give each prompt of obj a fresh request id (unless the client chose them) so it can be aborted."""
    if obj.rid is None:
        prompts = obj.text if obj.text is not None else obj.input_ids
        obj.rid = [new_rid() for _ in prompts] if obj.is_batch() else new_rid()  # type: ignore[union-attr]
    return obj


class DeltaText:
    """Turns the cumulative text of one choice into deltas for streaming.

    A tail that could still grow into a stop string is held back: stop strings are cut from the final
    text, and a streamed character cannot be taken back.
    """

    def __init__(self, stops: StopAutomaton) -> None:
        self.stop_prefix = StopPrefixTracker(stops)
        self.sent = 0

    def next(self, text: str, final: bool) -> str:
        """The part of text not sent yet (all of it when final)."""
        end = len(text) if final else len(text) - self.stop_prefix.held_back(text)
        if end <= self.sent:
            return ""
        piece, self.sent = text[self.sent : end], end
        return piece


async def stream_deltas(
    first: dict[str, Any], rest: AsyncIterator[dict[str, Any]], count: int, stop: list[str]
) -> AsyncIterator[tuple[int, str, int, dict[str, Any]]]:
    """For each streamed output of a batch of count: (index, new text, first new logprob index, output)."""
    stops = StopAutomaton([s for s in stop if s])
    deltas = [DeltaText(stops) for _ in range(count)]
    sent_logprobs = [0] * count
    out: dict[str, Any] | None = first
    while out is not None:
        index = out.get("index", 0)
        meta = out["meta_info"]
        piece = deltas[index].next(out["text"], meta["finish_reason"] is not None)
        start, sent_logprobs[index] = sent_logprobs[index], len(meta.get("output_token_logprobs", ()))
        yield index, piece, start, out
        out = await anext(rest, None)


async def stream_choices(
    head: dict[str, Any],
    first: dict[str, Any],
    rest: AsyncIterator[dict[str, Any]],
    count: int,
    req: SamplingRequest,
    fields: Callable[[str, dict[str, Any], int], tuple[dict[str, Any], bool]],
) -> AsyncIterator[str]:
    """The SSE chunks both OpenAI routes stream: one per choice delta (empty ones skipped), each choice's last one
    with its finish reason and matched stop, the usage chunk when asked for, then [DONE]. fields(text, meta,
    start) gives the route's own part of a choice and whether that part carries logprobs."""
    finals: list[dict[str, Any]] = [{} for _ in range(count)]
    async for index, text, start, out in stream_deltas(first, rest, count, stop_list(req)):
        meta = out["meta_info"]
        reason = finish_reason(meta)
        own, has_logprobs = fields(text, meta, start)
        if reason is not None:
            finals[index] = out
        elif not text and not has_logprobs:
            continue
        choice = {"index": index, **own, "finish_reason": reason}
        if reason is not None:
            choice["matched_stop"] = matched_stop(meta)
        yield sse_event({**head, "choices": [choice]})
    if req.include_usage:
        yield sse_event({**head, "choices": [], "usage": usage(finals, req.n)})
    yield SSE_DONE


def finish_reason(meta: dict[str, Any]) -> str | None:
    """OpenAI's finish_reason of an output ("stop", "length", "abort"), None while running."""
    reason = meta.get("finish_reason")
    return None if reason is None else reason["type"]


def matched_stop(meta: dict[str, Any]) -> int | str | None:
    """The stop string or token id that ended the output, if any."""
    reason = meta.get("finish_reason")
    return reason.get("matched") if reason else None


def token_text(tm: TokenizerManager, token_id: int) -> str:
    """How one token reads on its own."""
    return tm.tokenizer.decode([token_id])


def usage(outputs: list[dict[str, Any]], n: int) -> dict[str, int]:
    """Token usage of the final outputs; a prompt sampled n times counts once."""
    prompt = sum(out["meta_info"]["prompt_tokens"] for out in outputs[::n])
    completion = sum(out["meta_info"]["completion_tokens"] for out in outputs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def openai_param(field: str) -> str:
    """The OpenAI request field behind a sampling parameter."""
    return OPENAI_NAME_OF.get(field, field)


def per_choice_params(req: SamplingRequest, prompts: int) -> list[dict[str, Any]]:
    """Sampling params of every (prompt, choice) pair; choice j of a seeded request uses seed + j."""
    base = req.sampling_params()
    choices = []
    for j in range(req.n):
        params = dict(base)
        if req.seed is not None:
            params["seed"] = req.seed + j
        choices.append(params)
    return [params for _ in range(prompts) for params in choices]


def stop_list(req: SamplingRequest) -> list[str]:
    """The request's stop strings as a list."""
    return [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
