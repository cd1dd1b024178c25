"""GET /metrics: the server's Prometheus metrics in the text format (with --enable-metrics)."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST

from sglang.srt.entrypoints.openai.protocol import APIError


def add_metrics_routes(app: FastAPI) -> None:
    """Add /metrics to app; without --enable-metrics it answers 404 saying so."""

    @app.get("/metrics")
    async def prometheus_metrics(request: Request) -> Response:
        metrics = request.app.state.tokenizer_manager.telemetry.metrics
        if metrics is None:
            raise APIError("Metrics are off: start the server with --enable-metrics to serve /metrics.", None, 404)
        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)
