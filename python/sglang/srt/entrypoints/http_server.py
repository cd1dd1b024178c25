"""The HTTP server: native endpoints (/generate, /health, control calls) plus the OpenAI-compatible /v1 API."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

import sglang
from sglang.srt.entrypoints.http_auth import ApiKeyMiddleware
from sglang.srt.entrypoints.http_extra import add_extra_routes, model_card
from sglang.srt.entrypoints.http_limits import BodyLimitMiddleware
from sglang.srt.entrypoints.http_metrics import add_metrics_routes
from sglang.srt.entrypoints.http_profile import add_profile_routes
from sglang.srt.entrypoints.http_rfork import add_rfork_routes
from sglang.srt.entrypoints.http_rfork_peers import add_peer_routes
from sglang.srt.entrypoints.http_rfork_te import add_transfer_engine_routes
from sglang.srt.entrypoints.openai.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    error_body,
)
from sglang.srt.entrypoints.openai.serving_base import (
    SSE_DONE,
    ClientDisconnected,
    guard_stream,
    sse_event,
    start_generation,
    with_rids,
)
from sglang.srt.entrypoints.openai.serving_chat import serve_chat
from sglang.srt.entrypoints.openai.serving_completions import serve_completions
from sglang.srt.managers.io_struct import GenerateReqInput
from sglang.srt.model_executor.weights_by_name import join_rank_answers
from sglang.srt.server_args import ServerArgs

if TYPE_CHECKING:
    from sglang.srt.managers.tokenizer_manager import TokenizerManager

logger = logging.getLogger(__name__)

HEALTH_GENERATE_TIMEOUT = 20.0


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class GenerateRequest(_Strict):
    """Body of POST /generate (the fields of GenerateReqInput)."""

    text: str | list[str] | None = None
    input_ids: list[int] | list[list[int]] | None = None
    sampling_params: dict[str, Any] | list[dict[str, Any]] | None = None
    rid: str | list[str] | None = None
    return_logprob: bool = False
    top_logprobs_num: int = Field(default=0, ge=0)
    stream: bool = False


class WeightsRequest(_Strict):
    """Body (or query) of /get_weights_by_name."""

    name: str
    truncate_size: int | None = Field(default=None, ge=1)
    raw: bool = False


class AbortRequest(_Strict):
    """Body of POST /abort_request: one request by rid, or every request in flight with abort_all."""

    rid: str = ""
    abort_all: bool = False


def create_app(tokenizer_manager: TokenizerManager, api_key: str | None = None) -> FastAPI:
    """The FastAPI app serving tokenizer_manager; other features add their routes to it (all behind the key)."""
    app = FastAPI(title="SGLang")
    app.state.tokenizer_manager = tokenizer_manager
    app.state.created = int(time.time())
    # The docs build makes an app without a TokenizerManager (to list its routes): the flag's default then.
    limits = tokenizer_manager.server_args if tokenizer_manager is not None else ServerArgs
    app.add_middleware(BodyLimitMiddleware, max_bytes=limits.max_request_body_bytes)
    if api_key:
        # Added last, so it runs first: a caller without the key cannot even make the server read a body.
        app.add_middleware(ApiKeyMiddleware, api_key=api_key)
    _add_error_handlers(app)
    _add_native_routes(app)
    _add_openai_routes(app)
    add_extra_routes(app)
    add_metrics_routes(app)
    add_profile_routes(app)
    add_rfork_routes(app)
    add_transfer_engine_routes(app)
    add_peer_routes(app)
    return app


def _tm(request: Request) -> TokenizerManager:
    return request.app.state.tokenizer_manager


def _add_native_routes(app: FastAPI) -> None:
    @app.get("/health")
    async def health(request: Request) -> Response:
        reason = _tm(request).dead_reason
        if reason:
            return JSONResponse(error_body(reason, None, 503), status_code=503)
        return Response(status_code=200)

    @app.get("/health_generate")
    async def health_generate(request: Request) -> Response:
        obj = with_rids(GenerateReqInput(text="Hello", sampling_params={"max_new_tokens": 1, "temperature": 0}))
        try:
            await asyncio.wait_for(start_generation(request, _tm(request), obj, "text"), HEALTH_GENERATE_TIMEOUT)
        except asyncio.TimeoutError:
            message = f"A 1-token generation took more than {HEALTH_GENERATE_TIMEOUT:.0f} s."
            return JSONResponse(error_body(message, None, 503), status_code=503)
        return Response(status_code=200)

    @app.post("/generate")
    async def generate(req: GenerateRequest, request: Request) -> Response:
        tm = _tm(request)
        obj = with_rids(GenerateReqInput(**req.model_dump()))
        prompt_param = "input_ids" if req.input_ids is not None else "text"
        first, rest = await start_generation(request, tm, obj, prompt_param, cumulative=None)
        if not req.stream:
            return JSONResponse(first)

        async def events() -> Any:
            yield sse_event(first)
            async for out in rest:
                yield sse_event(out)
            yield SSE_DONE

        return StreamingResponse(guard_stream(events(), rest), media_type="text/event-stream")

    @app.get("/get_model_info")
    async def get_model_info(request: Request) -> dict[str, Any]:
        return _tm(request).model_info()

    @app.get("/get_server_info")
    async def get_server_info(request: Request) -> dict[str, Any]:
        tm = _tm(request)
        load = (await tm.rpc("get_load"))[0]
        info = {
            key: ("<redacted>" if key.endswith("api_key") and value else value)
            for key, value in tm.server_info().items()
        }
        return {**info, **load, "internal_states": [load], "version": sglang.__version__}

    @app.api_route("/flush_cache", methods=["GET", "POST"])
    async def flush_cache(request: Request) -> Response:
        if all(await _tm(request).rpc("flush_cache")):
            return PlainTextResponse("Cache flushed.\n")
        raise APIError("Cache not flushed: requests are running or waiting; retry when the server is idle.")

    @app.api_route("/get_weights_by_name", methods=["GET", "POST"])
    async def get_weights_by_name(
        request: Request,
        body: WeightsRequest | None = None,
        name: str | None = None,
        truncate_size: int | None = Query(default=None, ge=1),
        raw: bool = False,
    ) -> Response:
        if body is None:
            if name is None:
                raise APIError("'name' is required: the parameter to read, e.g. model.norm.weight.", param="name")
            body = WeightsRequest(name=name, truncate_size=truncate_size, raw=raw)
        try:
            answers = await _tm(request).rpc("get_weights_by_name", **body.model_dump())
        except RuntimeError as e:
            raise APIError(f"Cannot read parameter {body.name!r}: {e}", param="name") from None
        return JSONResponse(join_rank_answers(answers))

    @app.post("/abort_request")
    async def abort_request(req: AbortRequest, request: Request) -> Response:
        if req.abort_all:
            _tm(request).abort_all()
        elif req.rid:
            _tm(request).abort_request(req.rid)
        else:
            raise APIError("Give the 'rid' of the request to stop, or \"abort_all\": true.", param="rid")
        return Response(status_code=200)


def _add_openai_routes(app: FastAPI) -> None:
    @app.get("/v1/models")
    async def list_models(request: Request) -> dict[str, Any]:
        return {"object": "list", "data": [model_card(_tm(request), request.app.state.created)]}

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request) -> Response:
        return await serve_completions(request, _tm(request), req)

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, request: Request) -> Response:
        return await serve_chat(request, _tm(request), req)


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> Response:
        return JSONResponse(exc.body(), status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> Response:
        error = validation_error(exc.errors(), request.headers.get("content-type"))
        return JSONResponse(error.body(), status_code=error.status_code)

    @app.exception_handler(ClientDisconnected)
    async def client_gone(request: Request, exc: ClientDisconnected) -> Response:
        return Response(status_code=499)  # nobody reads it; the request was aborted already

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        return JSONResponse(error_body(str(exc.detail), None, exc.status_code), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> Response:
        logger.exception("%s %s failed", request.method, request.url.path)
        message = f"Internal server error: {type(exc).__name__}: {exc}"
        return JSONResponse(error_body(message, None, 500), status_code=500)


def _is_json(content_type: str | None) -> bool:
    media = (content_type or "").split(";")[0].strip().lower()
    return media == "application/json" or media.endswith("+json")


def validation_error(errors: Any, content_type: str | None = None) -> APIError:
    """Turn FastAPI's request-validation errors into a 400 naming the first bad field."""
    error = errors[0]
    loc = [str(part) for part in error["loc"][1:]]  # the first entry says where: body, query, ...
    kind = error["type"]
    if error["loc"][:1] == ("body",) and not loc and not _is_json(content_type):
        # Without a JSON content type the body is never parsed as JSON (`curl -d` sends a form type).
        return APIError(
            f"The request body must be JSON sent with 'Content-Type: application/json'; this request's content "
            f"type is {content_type or 'missing'!r}. With curl, add -H 'Content-Type: application/json'."
        )
    if kind == "json_invalid":
        detail = error.get("ctx", {}).get("error", error["msg"])
        return APIError(f"Malformed JSON in the request body: {detail}.")
    if not loc:
        if kind == "missing":
            return APIError("The request body is missing; send a JSON object.")
        return APIError(f"Invalid request body: {error['msg']}.")
    param, path = loc[0], ".".join(loc)
    if kind == "extra_forbidden":
        return APIError(f"Unknown field '{path}'; remove it.", param=param)
    if kind == "missing":
        return APIError(f"Missing required field '{path}'.", param=param)
    return APIError(f"Invalid '{param}' (at {path}): {error['msg']}.", param=param)
