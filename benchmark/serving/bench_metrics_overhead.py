"""Cost of --enable-metrics on a decode step: two engines of the same model, one with metrics and one without,
measured in alternating rounds in one run so that drift of the machine hits both alike.

    python benchmark/serving/bench_metrics_overhead.py --model-path DIR --batch-size 1 32 \\
        [--input-len 128] [--output-len 64] [--rounds 5] [--mem-fraction-static 0.4] [--result-filename FILE]

A decode step is measured as decode_compare.py says. Prints JSON: per batch size, the median milliseconds per
step with metrics off and on, and the overhead in percent.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode_compare import add_args, alternate  # noqa: E402

from sglang.bench_one_batch import emit_report, machine_name  # noqa: E402
from sglang.srt.entrypoints.engine import Engine  # noqa: E402


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the comparison and print its JSON report."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_args(parser)
    parser.add_argument("--mem-fraction-static", type=float, default=None, help="per engine; both share the GPU")
    args = parser.parse_args(argv)
    common = {
        "model_path": args.model_path,
        "load_format": args.load_format,
        "device": args.device,
        "mem_fraction_static": args.mem_fraction_static,
        "max_total_tokens": args.max_total_tokens,
        "max_running_requests": max(args.batch_size),
        "decode_log_interval": 40,
    }
    engines = {"off": Engine(**common), "on": Engine(**common, enable_metrics=True)}
    try:
        samples = alternate({name: (engine, None) for name, engine in engines.items()}, args)
    finally:
        for engine in engines.values():
            engine.shutdown()
    results = []
    for bs in args.batch_size:
        off, on = statistics.median(samples["off", bs]), statistics.median(samples["on", bs])
        results.append(
            {
                "batch_size": bs,
                "decode_step_ms_metrics_off": round(off, 4),
                "decode_step_ms_metrics_on": round(on, 4),
                "overhead_pct": round((on / off - 1) * 100, 2),
                "spread_ms_off": round(max(samples["off", bs]) - min(samples["off", bs]), 4),
                "spread_ms_on": round(max(samples["on", bs]) - min(samples["on", bs]), 4),
            }
        )
    device = engines["off"].server_args.device
    report = {
        "benchmark": "Metrics overhead on a decode step",
        "command": "python benchmark/serving/bench_metrics_overhead.py "
        + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": machine_name(device),
        "date": datetime.date.today().isoformat(),
        "description": "Median decode-step time through the whole serving path with --enable-metrics off and on, "
        f"{args.rounds} alternating rounds, input {args.input_len} tokens, output {args.output_len} tokens.",
        "results": results,
    }
    emit_report(report, args.result_filename)
    return report


if __name__ == "__main__":
    main()
