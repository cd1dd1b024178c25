"""R-Fork's Prometheus metrics (ours, `sglang:rfork_*`): what this instance received as a client, read from its fork
report at scrape time, and what it served as a seed, observed at its R-Fork endpoints."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

# Seed endpoint -> the step of a fork it serves (the label of the seed's metrics).
SEED_STEPS = {
    "/remote_instance_weight_manifest": "manifest",
    "/remote_instance_fork_lease": "lease",
    "/remote_instance_fork_lease/release": "release",
    "/init_weights_send_group_for_remote_instance": "init_group",
    "/send_weights_to_remote_instance": "send_weights",
    "/remote_instance_transfer_engine_info": "transfer_engine_info",
    "/get_remote_instance_transfer_engine_info": "transfer_engine_info",
}
# Steps during which the seed's ranks send weights (an upstream client sends in send_weights, ours in init_group).
SENDING_STEPS = frozenset({"init_group", "send_weights"})
STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300)


class ClientForkCollector(Collector):
    """The fork this instance's weights came from (rank 0's report), as it printed it in its log."""

    def __init__(self, model_name: str, scheduler_info: Any) -> None:
        self.model_name = model_name
        self.scheduler_info = scheduler_info  # callable: the TokenizerManager's scheduler_info as it is now

    def collect(self) -> Iterator[Metric]:
        report = (self.scheduler_info() or {}).get("fork_report")
        received = CounterMetricFamily(
            "sglang:rfork_forks_received", "Forks this instance took its weights from.", labels=["model_name"]
        )
        received.add_metric([self.model_name], 1.0 if report else 0.0)
        yield received
        if not report:
            return
        labels = ["model_name", "tp_rank"]
        values = [self.model_name, "0"]
        nbytes = CounterMetricFamily(
            "sglang:rfork_bytes_received", "Bytes TP rank 0 received in its fork.", labels=labels
        )
        nbytes.add_metric(values, float(report["bytes"]))
        yield nbytes
        gbps = GaugeMetricFamily("sglang:rfork_transfer_gbps", "GB/s of TP rank 0's fork transfer.", labels=labels)
        gbps.add_metric(values, float(report["gbps"]))
        yield gbps
        steps = GaugeMetricFamily(
            "sglang:rfork_client_step_seconds", "Duration of each step of TP rank 0's fork.", labels=[*labels, "step"]
        )
        for step, seconds in report["timings"].items():
            steps.add_metric([*values, step], float(seconds))
        yield steps


class SeedForkMetrics:
    """What this instance served as a seed: requests per step and outcome, forks, bytes, failures, the lease."""

    def __init__(self, registry: CollectorRegistry, model_name: str, bytes_per_fork: Any, lease_held: Any) -> None:
        self.labels = {"model_name": model_name}
        names = ["model_name"]
        self.bytes_per_fork = bytes_per_fork  # callable: weight bytes of all ranks, as they are now
        self.requests = Counter(
            "sglang:rfork_seed_requests",
            "Seed R-Fork requests by step and HTTP status.",
            [*names, "step", "status"],
            registry=registry,
        )
        self.failures = Counter(
            "sglang:rfork_seed_failures",
            "Seed R-Fork requests that failed, by step and HTTP status.",
            [*names, "step", "status"],
            registry=registry,
        )
        self.duration = Histogram(
            "sglang:rfork_seed_step_seconds",
            "Time the seed took to serve each R-Fork step.",
            [*names, "step"],
            buckets=STEP_BUCKETS,
            registry=registry,
        )
        self.served = Counter(
            "sglang:rfork_forks_served", "Forks whose weights this seed sent (NCCL).", names, registry=registry
        ).labels(**self.labels)
        self.bytes_served = Counter(
            "sglang:rfork_bytes_served", "Weight bytes this seed sent in forks (all ranks).", names, registry=registry
        ).labels(**self.labels)
        self.in_progress = Gauge(
            "sglang:rfork_forks_in_progress", "Forks this seed is sending right now.", names, registry=registry
        ).labels(**self.labels)
        lease = Gauge(
            "sglang:rfork_seed_lease_held",
            "1 while a client holds this seed's fork lease (NCCL).",
            names,
            registry=registry,
        ).labels(**self.labels)
        lease.set_function(lambda: 1.0 if lease_held() else 0.0)

    def record(self, step: str, status: int, seconds: float, request_body: bytes) -> None:
        """One R-Fork request has been answered."""
        self.requests.labels(**self.labels, step=step, status=str(status)).inc()
        self.duration.labels(**self.labels, step=step).observe(seconds)
        if status >= 400:
            self.failures.labels(**self.labels, step=step, status=str(status)).inc()
        elif step == "send_weights" or (step == "init_group" and _asks_to_send(request_body)):
            self.served.inc()
            self.bytes_served.inc(self.bytes_per_fork())


def _asks_to_send(body: bytes) -> bool:
    try:
        return bool(json.loads(body or b"{}").get("send_weights"))
    except (ValueError, AttributeError):
        return False


class SeedForkObserver:
    """ASGI middleware timing the seed's R-Fork endpoints for SeedForkMetrics; it leaves every other path alone."""

    def __init__(self, app: Any, metrics: SeedForkMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        step = SEED_STEPS.get(scope.get("path", "")) if scope["type"] == "http" else None
        if step is None:
            await self.app(scope, receive, send)
            return
        body = bytearray()
        status = [500]

        async def tee_receive() -> dict[str, Any]:
            message = await receive()
            if message["type"] == "http.request" and step == "init_group":
                body.extend(message.get("body", b""))
            return message

        async def tee_send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        sending = step in SENDING_STEPS
        if sending:
            self.metrics.in_progress.inc()
        start = time.perf_counter()
        try:
            await self.app(scope, tee_receive, tee_send)
        finally:
            if sending:
                self.metrics.in_progress.dec()
            self.metrics.record(step, status[0], time.perf_counter() - start, bytes(body))
