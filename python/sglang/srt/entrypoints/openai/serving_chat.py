"""POST /v1/chat/completions: OpenAI chat completions, prompts rendered by the tokenizer's chat template."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from sglang.srt.entrypoints.openai.protocol import APIError, ChatCompletionRequest
from sglang.srt.entrypoints.openai.request_checks import check_extra_fields
from sglang.srt.entrypoints.openai.serving_base import (
    check_choices,
    finish_reason,
    guard_stream,
    matched_stop,
    openai_param,
    per_choice_params,
    sse_event,
    start_generation,
    stream_choices,
    token_text,
    usage,
    with_rids,
)
from sglang.srt.managers.io_struct import GenerateReqInput

if TYPE_CHECKING:
    from sglang.srt.managers.tokenizer_manager import TokenizerManager

# apply_chat_template arguments the server chooses; chat_template_kwargs cannot override them.
RESERVED_TEMPLATE_ARGS = frozenset(
    {"conversation", "tokenize", "add_generation_prompt", "return_dict", "tokenizer_kwargs", "chat_template"}
)


async def serve_chat(request: Request, tm: TokenizerManager, req: ChatCompletionRequest) -> Any:
    """Answer a chat completions request, streamed or not."""
    check_extra_fields(req)
    check_choices(tm, req)
    prompt_ids = await chat_prompt_ids(tm, req)
    top_n = req.top_logprobs or 0
    obj = GenerateReqInput(
        input_ids=[prompt_ids] * req.n,
        sampling_params=per_choice_params(req, 1),
        return_logprob=req.logprobs,
        top_logprobs_num=top_n if req.logprobs else 0,
        stream=req.stream,
    )
    with_rids(obj)
    first, rest = await start_generation(request, tm, obj, "messages", openai_param)
    model = req.model or tm.server_args.served_model_name
    head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": model}
    if req.stream:
        events = _stream(tm, req, head, first, rest)
        return StreamingResponse(guard_stream(events, rest), media_type="text/event-stream")
    choices = [
        {
            "index": i,
            "message": {"role": "assistant", "content": out["text"]},
            "logprobs": _logprobs(tm, out["meta_info"], 0, top_n) if req.logprobs else None,
            "finish_reason": finish_reason(out["meta_info"]),
            "matched_stop": matched_stop(out["meta_info"]),
        }
        for i, out in enumerate(first)
    ]
    body = {**head, "object": "chat.completion", "choices": choices, "usage": usage(first, req.n)}
    return JSONResponse(body)


async def chat_prompt_ids(tm: TokenizerManager, req: ChatCompletionRequest) -> list[int]:
    """Render the messages with the model's chat template and tokenize the result."""
    tokenizer = tm.tokenizer
    if not getattr(tokenizer, "chat_template", None):
        raise APIError(
            f"The tokenizer of {tm.server_args.tokenizer_path} has no chat template; "
            "use /v1/completions, or a model whose tokenizer_config.json has a chat_template.",
            param="messages",
        )
    messages = [m.template_dict() for m in req.messages]
    extra = req.chat_template_kwargs or {}
    taken = sorted(RESERVED_TEMPLATE_ARGS & set(extra))
    if taken:
        raise APIError(
            f"chat_template_kwargs may not set {', '.join(taken)}: the server sets them.", "chat_template_kwargs"
        )
    try:
        # The extra kwargs become template variables, e.g. Qwen3's enable_thinking.
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **extra)
    except Exception as e:  # jinja raises whatever the template author chose (e.g. role order rules)
        raise APIError(f"The chat template rejected the messages: {e}", param="messages") from None
    # The template already spells out any special tokens it wants, so none are added here.
    try:
        return await tm.encode(text, "messages", add_special_tokens=False)
    except ValueError as e:
        raise APIError(str(e), param="messages") from None


async def _stream(
    tm: TokenizerManager,
    req: ChatCompletionRequest,
    head: dict[str, Any],
    first: dict[str, Any],
    rest: AsyncIterator[dict[str, Any]],
) -> AsyncIterator[str]:
    head = {**head, "object": "chat.completion.chunk"}
    top_n = req.top_logprobs or 0
    for index in range(req.n):
        delta = {"role": "assistant", "content": ""}
        yield sse_event(
            {**head, "choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": None}]}
        )

    def fields(text: str, meta: dict[str, Any], start: int) -> tuple[dict[str, Any], bool]:
        logprobs = _logprobs(tm, meta, start, top_n) if req.logprobs else None
        return {"delta": {"content": text}, "logprobs": logprobs}, bool(logprobs and logprobs["content"])

    async for event in stream_choices(head, first, rest, req.n, req, fields):
        yield event


def _logprobs(tm: TokenizerManager, meta: dict[str, Any], start: int, top_n: int) -> dict[str, Any]:
    """Chat logprobs of the tokens from index start on."""
    entries = meta.get("output_token_logprobs", [])[start:]
    tops = meta.get("output_top_logprobs", [])[start:] if top_n else [[] for _ in entries]
    content = []
    for (logprob, token_id), alts in zip(entries, tops):
        item = _token_logprob(tm, token_id, logprob)
        item["top_logprobs"] = [_token_logprob(tm, t, lp) for lp, t in alts]
        content.append(item)
    return {"content": content}


def _token_logprob(tm: TokenizerManager, token_id: int, logprob: float) -> dict[str, Any]:
    token = token_text(tm, token_id)
    return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}
