"""Main-server route of the R-Fork swarm registry (peer assist): GET/PUT /remote_instance_peers, proxied to the
bootstrap server that keeps the registry (clients know the seed's HTTP port, not its bootstrap port)."""

from __future__ import annotations

import logging

import requests
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from sglang.srt.entrypoints.http_rfork_te import NOT_PUBLISHING, ask_bootstrap, bootstrap_url
from sglang.srt.remote_instance.peer_registry import MAX_BODY_BYTES, PATH

logger = logging.getLogger(__name__)


def add_peer_routes(app: FastAPI) -> None:
    """Add GET and PUT /remote_instance_peers to app (once)."""
    if getattr(app.state, "rfork_peer_routes", False):
        return
    app.state.rfork_peer_routes = True

    @app.get(PATH)
    async def remote_instance_peers(request: Request, rank: str | None = None, addrs: str | None = None) -> Response:
        params = {k: v for k, v in (("rank", rank), ("addrs", addrs)) if v is not None}
        return await _proxy(request, "GET", params, None)

    @app.put(PATH)
    async def announce_remote_instance_peer(request: Request) -> Response:
        body = await request.body()
        if len(body) > MAX_BODY_BYTES:
            return _error(413, f"Body of {len(body)} bytes is over {MAX_BODY_BYTES}")
        return await _proxy(request, "PUT", {}, body)


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message}}, status_code=status)


async def _proxy(request: Request, method: str, params: dict[str, str], body: bytes | None) -> Response:
    args = request.app.state.tokenizer_manager.server_args
    if not args.remote_instance_weight_loader_start_seed_via_transfer_engine:
        return _error(400, NOT_PUBLISHING)
    url = bootstrap_url(args, PATH)
    try:
        resp = await ask_bootstrap(args, method, url, params, body)
    except requests.RequestException as e:
        logger.warning("swarm registry: bootstrap server at %s unreachable: %s", url, e)
        return _error(503, "The swarm registry (bootstrap server) is unreachable")
    if resp.status_code != 200:
        return _error(resp.status_code, resp.text[:300])
    return Response(content=resp.content, media_type="application/json")
