"""GET /metrics (Prometheus text format) when the server runs with --enable-metrics."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST


def add_metrics_routes(app: FastAPI) -> None:
    """Serve the TokenizerManager's metrics at /metrics; without --enable-metrics the path stays a 404."""
    metrics = app.state.tokenizer_manager.telemetry.metrics
    if metrics is None:
        return

    @app.get("/metrics")
    async def prometheus_metrics(request: Request) -> Response:
        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)
