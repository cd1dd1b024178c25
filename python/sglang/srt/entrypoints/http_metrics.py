"""GET /metrics: the server's Prometheus metrics in the text format (with --enable-metrics), R-Fork's included."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from fastapi import FastAPI, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST

from sglang.srt.entrypoints.openai.protocol import APIError
from sglang.srt.metrics.rfork_metrics import ClientForkCollector, SeedForkMetrics, SeedForkObserver

if TYPE_CHECKING:
    from sglang.srt.managers.tokenizer_manager import TokenizerManager


def add_metrics_routes(app: FastAPI) -> None:
    """Add /metrics to app; without --enable-metrics it answers 404 saying so."""
    tm = app.state.tokenizer_manager
    if tm is not None and tm.telemetry.metrics is not None:
        _add_rfork_metrics(app, tm)

    @app.get("/metrics")
    async def prometheus_metrics(request: Request) -> Response:
        metrics = request.app.state.tokenizer_manager.telemetry.metrics
        if metrics is None:
            raise APIError("Metrics are off: start the server with --enable-metrics to serve /metrics.", None, 404)
        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)


def _add_rfork_metrics(app: FastAPI, tm: TokenizerManager) -> None:
    metrics = tm.telemetry.metrics
    name = metrics.labels["model_name"]
    metrics.registry.register(ClientForkCollector(name, lambda: tm.scheduler_info))

    def bytes_per_fork() -> int:
        # Every TP rank of our models holds the same bytes (shards are even, the rest is replicated).
        return tm.scheduler_info.get("weight_bytes", 0) * tm.server_args.tp_size

    def lease_held() -> bool:
        lease = getattr(getattr(app.state, "fork_slot", None), "lease", None)
        return lease is not None and time.monotonic() < lease.expires

    seed = SeedForkMetrics(metrics.registry, name, bytes_per_fork, lease_held)
    app.add_middleware(SeedForkObserver, metrics=seed)
