"""POST /v1/completions: OpenAI text completions on top of the TokenizerManager."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from sglang.srt.entrypoints.openai.protocol import APIError, CompletionRequest
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


async def serve_completions(request: Request, tm: TokenizerManager, req: CompletionRequest) -> Any:
    """Answer a completions request, streamed or not."""
    check_extra_fields(req)
    check_choices(tm, req)
    prompts = _prompts(req.prompt)
    expanded = [p for p in prompts for _ in range(req.n)]
    as_text = isinstance(prompts[0], str)
    if req.echo and req.logprobs is not None:
        raise APIError("'echo' with 'logprobs' needs prompt logprobs, which are not supported; drop one.", "echo")
    obj = GenerateReqInput(
        text=expanded if as_text else None,
        input_ids=None if as_text else expanded,
        sampling_params=per_choice_params(req, len(prompts)),
        return_logprob=req.logprobs is not None,
        top_logprobs_num=req.logprobs or 0,
        stream=req.stream,
    )
    with_rids(obj)
    first, rest = await start_generation(request, tm, obj, "prompt", openai_param)
    # With echo, each choice's text starts with its prompt (token-id prompts decoded, once they are known to be
    # token ids of this vocabulary and no longer than the context).
    echoed = [(p if as_text else tm.tokenizer.decode(p)) if req.echo else "" for p in expanded]
    model = req.model or tm.server_args.served_model_name
    head = {
        "id": f"cmpl-{uuid.uuid4().hex}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
    }
    if req.stream:
        events = _stream(tm, req, head, first, rest, echoed)
        return StreamingResponse(guard_stream(events, rest), media_type="text/event-stream")
    choices = [
        {
            "index": i,
            "text": echoed[i] + out["text"],
            "logprobs": _logprobs(tm, out["meta_info"], 0, req.logprobs) if req.logprobs is not None else None,
            "finish_reason": finish_reason(out["meta_info"]),
            "matched_stop": matched_stop(out["meta_info"]),
        }
        for i, out in enumerate(first)
    ]
    return JSONResponse({**head, "choices": choices, "usage": usage(first, req.n)})


def _prompts(prompt: str | list[str] | list[int] | list[list[int]]) -> list[str] | list[list[int]]:
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise APIError("'prompt' is empty; send a string, a list of strings or token ids.", param="prompt")
    if isinstance(prompt[0], int):
        return [prompt]  # type: ignore[list-item]
    if any(not p for p in prompt):
        raise APIError("'prompt' contains an empty prompt.", param="prompt")
    return prompt  # type: ignore[return-value]


async def _stream(
    tm: TokenizerManager,
    req: CompletionRequest,
    head: dict[str, Any],
    first: dict[str, Any],
    rest: AsyncIterator[dict[str, Any]],
    echoed: list[str],
) -> AsyncIterator[str]:
    def fields(text: str, meta: dict[str, Any], start: int) -> tuple[dict[str, Any], bool]:
        logprobs = _logprobs(tm, meta, start, req.logprobs) if req.logprobs is not None else None
        return {"text": text, "logprobs": logprobs}, bool(logprobs and logprobs["tokens"])

    for index, prompt in enumerate(echoed):
        if prompt:
            choice = {"index": index, "text": prompt, "logprobs": None, "finish_reason": None}
            yield sse_event({**head, "choices": [choice]})
    async for event in stream_choices(head, first, rest, len(echoed), req, fields):
        yield event


def _logprobs(tm: TokenizerManager, meta: dict[str, Any], start: int, top_n: int) -> dict[str, Any]:
    """Legacy completions logprobs of the tokens from index start on."""
    entries = meta.get("output_token_logprobs", [])[start:]
    top = None
    if top_n:
        top = [{_alt_key(tm, t): lp for lp, t in alts} for alts in meta.get("output_top_logprobs", [])[start:]]
    return {
        "tokens": [token_text(tm, token_id) for _, token_id in entries],
        "token_logprobs": [lp for lp, _ in entries],
        "top_logprobs": top,
    }


def _alt_key(tm: TokenizerManager, token_id: int) -> str:
    """A token's key in a top_logprobs dict. A token that is only part of a character (a byte of UTF-8) reads as
    U+FFFD like every other such token, and would overwrite them in the dict; it is keyed by its bytes instead,
    written the way OpenAI writes them ("bytes:\\xe2\\x80")."""
    text = token_text(tm, token_id)
    if "\ufffd" not in text:
        return text
    raw = token_bytes(tm.tokenizer.convert_ids_to_tokens(token_id))
    return "bytes:" + "".join(f"\\x{b:02x}" for b in raw) if raw is not None else text


def _byte_level_alphabet() -> dict[str, int]:
    # Byte-level BPE (GPT-2 and its descendants) spells each byte as one printable character: printable Latin-1
    # bytes as themselves, the others as the code points from 256 on, in byte order.
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), 256)]
    shifted = (b for b in range(256) if b not in printable)
    spelled = {chr(b): b for b in printable}
    spelled.update({chr(256 + i): b for i, b in enumerate(shifted)})
    return spelled


_BYTE_LEVEL = _byte_level_alphabet()


def token_bytes(piece: str) -> bytes | None:
    """The bytes a vocabulary piece stands for: a byte-fallback piece ("<0xE2>") or a byte-level one ("âĢ");
    None when it is neither."""
    if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
        return bytes([int(piece[3:5], 16)])
    if all(ch in _BYTE_LEVEL for ch in piece):
        return bytes(_BYTE_LEVEL[ch] for ch in piece)
    return None
