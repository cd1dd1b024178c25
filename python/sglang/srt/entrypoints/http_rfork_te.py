"""Main-server R-Fork TransferEngine endpoints: per-rank seed info, proxied from the bootstrap server."""

from __future__ import annotations

import asyncio
import logging

import requests
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

logger = logging.getLogger(__name__)

BOOTSTRAP_TIMEOUT = 5.0
NOT_PUBLISHING = (
    "This instance does not publish TransferEngine info: it was started without "
    "--remote-instance-weight-loader-start-seed-via-transfer-engine"
)


def add_transfer_engine_routes(app: FastAPI) -> None:
    """Add GET /remote_instance_transfer_engine_info and its deprecated /get_... alias to app (once)."""
    if getattr(app.state, "rfork_transfer_engine_routes", False):
        return
    app.state.rfork_transfer_engine_routes = True
    warned = []

    @app.get("/remote_instance_transfer_engine_info")
    async def remote_instance_transfer_engine_info(request: Request, rank: str | None = None) -> Response:
        return await _proxy(request, rank)

    @app.get("/get_remote_instance_transfer_engine_info")
    async def get_remote_instance_transfer_engine_info(request: Request, rank: str | None = None) -> Response:
        if not warned:
            warned.append(True)
            logger.warning(
                "/get_remote_instance_transfer_engine_info is deprecated; use /remote_instance_transfer_engine_info"
            )
        return await _proxy(request, rank)


def _error(message: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message}}, status_code=400)


async def ask_bootstrap(args, method: str, url: str, params: dict, body: bytes | None = None) -> requests.Response:
    """This instance's bootstrap server's answer at url (bootstrap_url), asked with our API key from a worker
    thread so the event loop keeps streaming generations meanwhile; requests.RequestException if unreachable."""
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    if body is not None:
        headers["Content-Type"] = "application/json"
    kwargs = {"params": params, "data": body, "headers": headers, "timeout": BOOTSTRAP_TIMEOUT}
    return await asyncio.to_thread(requests.request, method, url, **kwargs)


def bootstrap_url(args, path: str) -> str:
    """URL of `path` on this instance's bootstrap server."""
    return f"{bootstrap_base_url(args.host, args.engine_info_bootstrap_port)}{path}"


async def _proxy(request: Request, rank_text: str | None) -> Response:
    try:
        rank = int(rank_text) if rank_text is not None else -1
    except ValueError:
        rank = -1
    if rank < 0:
        return _error("Missing or invalid rank parameter")
    args = request.app.state.tokenizer_manager.server_args
    if not args.remote_instance_weight_loader_start_seed_via_transfer_engine:
        return _error(NOT_PUBLISHING)
    url = bootstrap_url(args, "/get_transfer_engine_info")
    try:
        resp = await ask_bootstrap(args, "GET", url, {"rank": rank})
    except requests.RequestException as e:
        logger.warning("transfer engine info for rank %d: bootstrap server at %s unreachable: %s", rank, url, e)
        return _error(f"Failed to get transfer engine info for rank {rank}")
    if resp.status_code != 200:
        logger.warning(
            "transfer engine info for rank %d: bootstrap answered %d: %s", rank, resp.status_code, resp.text[:200]
        )
        return _error(f"Failed to get transfer engine info for rank {rank}")
    try:
        published_by = resp.json().get("instance", {}).get("http_port")
    except (ValueError, AttributeError):
        published_by = None
    if published_by is not None and published_by != args.port:
        # Another instance on this host answers on our --engine-info-bootstrap-port (the default 6789, say).
        logger.warning(
            "bootstrap server at %s holds the info of the instance on HTTP port %s, not ours (%d); not passing it on",
            url,
            published_by,
            args.port,
        )
        return _error(
            f"This instance does not publish TransferEngine info: its --engine-info-bootstrap-port "
            f"{args.engine_info_bootstrap_port} belongs to the instance on HTTP port {published_by}; give each "
            "instance on a host its own --engine-info-bootstrap-port"
        )
    return Response(content=resp.content, media_type="application/json")


def bootstrap_base_url(host: str, port: int) -> str:
    """URL of the bootstrap server that this server's node 0 runs on --engine-info-bootstrap-port."""
    local = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}
    host = local.get(host, host)
    host = f"[{host}]" if ":" in host else host
    return f"http://{host}:{port}"
