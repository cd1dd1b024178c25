"""Upstream endpoints that tools expect besides generation: one model's card, tokenize and detokenize, load."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from pydantic import BaseModel, ConfigDict, Field

from sglang.srt.entrypoints.openai.protocol import APIError

if TYPE_CHECKING:
    from sglang.srt.managers.tokenizer_manager import TokenizerManager


class TokenizeRequest(BaseModel):
    """Body of POST /tokenize (upstream's): one text or a list of texts."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    prompt: str | list[str]
    add_special_tokens: bool = True


class DetokenizeRequest(BaseModel):
    """Body of POST /detokenize: token ids, or one list of ids per text."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    tokens: list[int] | list[list[int]] = Field(min_length=1)


def model_card(tm: TokenizerManager, created: int) -> dict[str, Any]:
    """The OpenAI model object of the served model."""
    return {
        "id": tm.server_args.served_model_name,
        "object": "model",
        "created": created,
        "owned_by": "sglang",
        "root": tm.server_args.model_path,
        "max_model_len": tm.model_config.context_len,
    }


def add_extra_routes(app: FastAPI) -> None:
    """Add /v1/models/{model_id}, /tokenize, /detokenize and /get_load to app."""

    def tm_of(request: Request) -> TokenizerManager:
        return request.app.state.tokenizer_manager

    @app.get("/v1/models/{model_id:path}")
    async def retrieve_model(model_id: str, request: Request) -> dict[str, Any]:
        tm = tm_of(request)
        if model_id != tm.server_args.served_model_name:
            raise APIError(
                f"The model {model_id!r} does not exist; this server serves {tm.server_args.served_model_name!r}.",
                param="model",
                status_code=404,
            )
        return model_card(tm, request.app.state.created)

    @app.post("/tokenize")
    async def tokenize(req: TokenizeRequest, request: Request) -> dict[str, Any]:
        tm = tm_of(request)
        texts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        try:
            # Off the event loop when long; no context check: counting a long document's tokens is a fair question.
            tokens = [await tm.encode(t, "prompt", req.add_special_tokens, check_length=False) for t in texts]
        except ValueError as e:
            raise APIError(str(e), param="prompt") from None
        counts = [len(t) for t in tokens]
        single = isinstance(req.prompt, str)
        return {
            "tokens": tokens[0] if single else tokens,
            "count": counts[0] if single else counts,
            "max_model_len": tm.model_config.context_len,
        }

    @app.post("/detokenize")
    async def detokenize(req: DetokenizeRequest, request: Request) -> dict[str, Any]:
        tm = tm_of(request)
        single = isinstance(req.tokens[0], int)
        batches = [req.tokens] if single else req.tokens
        vocab = tm.model_config.vocab_size
        bad = [t for ids in batches for t in ids if not 0 <= t < vocab]
        if bad:
            raise APIError(f"token id {bad[0]} is not in the vocabulary [0, {vocab}).", param="tokens")
        texts = [tm.tokenizer.decode(ids) for ids in batches]
        return {"text": texts[0] if single else texts}

    @app.get("/get_load")
    async def get_load(request: Request) -> list[dict[str, Any]]:
        # One entry per data-parallel rank, as upstream; this server has one.
        load = (await tm_of(request).rpc("get_load"))[0]
        return [{"dp_rank": 0, "num_reqs": load["num_running_reqs"] + load["num_waiting_reqs"], **load}]
