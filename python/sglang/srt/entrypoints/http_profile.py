"""POST /start_profile and /stop_profile: a torch profiler trace of every TP rank, as upstream serves them."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field

from sglang.srt.entrypoints.openai.protocol import APIError


class ProfileRequest(BaseModel):
    """Body of /start_profile (all optional). Upstream fields this runtime has no use for are ignored."""

    model_config = ConfigDict(extra="ignore")

    output_dir: str | None = None
    num_steps: int | None = Field(default=None, ge=1)
    activities: list[str] | None = None
    with_stack: bool = True
    record_shapes: bool = False
    profile_id: str | None = None


def add_profile_routes(app: FastAPI) -> None:
    """Add /start_profile and /stop_profile to app."""

    @app.post("/start_profile")
    async def start_profile(request: Request, body: ProfileRequest | None = None) -> PlainTextResponse:
        options = (body or ProfileRequest()).model_dump()
        try:
            paths = await request.app.state.tokenizer_manager.rpc("start_profile", **options)
        except RuntimeError as e:
            raise APIError(f"Cannot start profiling: {e}") from None
        return PlainTextResponse(f"Start profiling. Traces will be written to: {', '.join(paths)}\n")

    @app.post("/stop_profile")
    async def stop_profile(request: Request) -> PlainTextResponse:
        try:
            paths = await request.app.state.tokenizer_manager.rpc("stop_profile")
        except RuntimeError as e:
            raise APIError(f"Cannot stop profiling: {e}") from None
        return PlainTextResponse(f"Stop profiling. Traces written to: {', '.join(paths)}\n")
