"""Print the headline numbers of benchmark JSON files (bench_one_batch, bench_serving, backend agreement)."""

from __future__ import annotations

import json
import sys
from typing import Any

ONE_BATCH_KEYS = (
    "batch_size",
    "prefill_ms",
    "decode_median_ms",
    "decode_tok_per_s",
    "decode_vs_roofline",
    "hf_decode_step_ms",
    "decode_speedup_vs_hf",
)
SERVING_KEYS = (
    "completed",
    "output_throughput",
    "median_ttft_ms",
    "p99_ttft_ms",
    "median_itl_ms",
    "p99_itl_ms",
    "median_tpot_ms",
)


def headline(report: dict[str, Any]) -> dict[str, Any]:
    """The few numbers of a report worth reading first."""
    if "results" in report:
        keys = ("fused_kernels", "roofline_decode_ms", "copy_bandwidth_gb_per_s", "cuda_graph_capture_s")
        fixed = {k: report.get(k) for k in keys}
        rows = [{k: row.get(k) for k in ONE_BATCH_KEYS} for row in report["results"]]
        profiles = [row["profile"] for row in report["results"] if "profile" in row]
        busy = [p["device_busy_ms_per_step"] for p in profiles]
        kernels = [p.get("kernels_per_step") for p in profiles]
        return {**fixed, "rows": rows, "profile_device_busy_ms": busy, "profile_kernels_per_step": kernels}
    if "output_throughput" in report:
        return {"max_concurrency": report.get("max_concurrency"), **{k: report.get(k) for k in SERVING_KEYS}}
    return {k: v for k, v in report.items() if isinstance(v, dict) and k != "model"}


def _rounded(value: Any) -> Any:
    if isinstance(value, float):
        return round(value, 3)
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    return value


if __name__ == "__main__":
    for path in sys.argv[1:]:
        with open(path) as f:
            print(path, json.dumps(_rounded(headline(json.load(f)))))
