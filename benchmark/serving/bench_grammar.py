"""Cost of structured output on a decode step: the same engine decoding free rows and grammar-constrained rows,
in alternating rounds of one run.

    python benchmark/serving/bench_grammar.py --model-path DIR --batch-size 1 32 [--input-len 128] \\
        [--output-len 64] [--rounds 5] [--result-filename FILE]

A constrained row carries a regex that never completes (default `[a-z0-9 ]+`, which the words of the tiny
models' and the dummy 8B model's vocabularies fit), so every one of its output-len steps fills and applies a token
mask (xgrammar); a decode step is measured as decode_compare.py says, which fails if a row ends early. Prints JSON: per
batch size, the median milliseconds per step free and constrained, and the overhead in percent.
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
    parser.add_argument("--regex", default="[a-z0-9 ]+", help="the never-completing regex of constrained rows")
    args = parser.parse_args(argv)
    constrained = {"regex": args.regex}
    engine = Engine(
        model_path=args.model_path,
        load_format=args.load_format,
        device=args.device,
        max_total_tokens=args.max_total_tokens,
        max_running_requests=max(args.batch_size),
    )
    try:
        samples = alternate({"free": (engine, None), "constrained": (engine, constrained)}, args)
    finally:
        engine.shutdown()
    results = []
    for bs in args.batch_size:
        free, constrained = statistics.median(samples["free", bs]), statistics.median(samples["constrained", bs])
        results.append(
            {
                "batch_size": bs,
                "decode_step_ms_free": round(free, 4),
                "decode_step_ms_constrained": round(constrained, 4),
                "overhead_pct": round((constrained / free - 1) * 100, 2),
            }
        )
    report = {
        "benchmark": "Structured output (xgrammar masks) on a decode step",
        "command": "python benchmark/serving/bench_grammar.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": machine_name(engine.server_args.device),
        "date": datetime.date.today().isoformat(),
        "description": f"Median decode-step time through the whole serving path, {args.rounds} alternating rounds, "
        f"input {args.input_len} tokens, output {args.output_len}; constrained rows carry {constrained}.",
        "results": results,
    }
    emit_report(report, args.result_filename)
    return report


if __name__ == "__main__":
    main()
