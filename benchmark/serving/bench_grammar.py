"""Cost of structured output on a decode step: free rows, grammar-constrained rows whose masks are filled after the
forward (the default), and constrained rows whose masks are prefetched on a worker thread while the forward runs
(SGLANG_GRAMMAR_MASK_PREFETCH=1, on a second engine), in alternating rounds of one run.

    python benchmark/serving/bench_grammar.py --model-path DIR --batch-size 1 32 [--input-len 128] \\
        [--output-len 64] [--rounds 5] [--result-filename FILE]

A constrained row carries the regex `[a-z0-9 ]+` (or --regex), which never completes and which the words of the
tiny models' and of make_llama3_8b_dummy.py's vocabularies fit, so every one of its output-len steps fills and
applies a token mask (xgrammar); a regex that no token of the vocabulary can follow ends rows at once, and
decode_compare.py fails on any row that stops short, warm-up rows included, naming the sampling parameters. A
decode step is measured as decode_compare.py says. Prints JSON: per batch size, the median milliseconds per step
of each variant, and the overheads in percent.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode_compare import add_args, alternate  # noqa: E402

from sglang.bench_one_batch import emit_report, machine_name  # noqa: E402
from sglang.srt.constrained.mask_prefetch import ENABLE_ENV  # noqa: E402
from sglang.srt.entrypoints.engine import Engine  # noqa: E402

CONSTRAINED = {"regex": "[a-z0-9 ]+"}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the comparison and print its JSON report."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_args(parser)
    parser.add_argument("--regex", default=CONSTRAINED["regex"], help="the constrained rows' regex (never ending)")
    args = parser.parse_args(argv)
    common = {
        "model_path": args.model_path,
        "load_format": args.load_format,
        "device": args.device,
        # Both engines share one device: each KV pool holds what the largest batch needs, twice over, and no more
        # (a memory fraction would not do: it counts the whole device, the other engine's memory included).
        "max_total_tokens": args.max_total_tokens or 2 * max(args.batch_size) * (args.input_len + args.output_len + 8),
        "max_running_requests": max(args.batch_size),
    }
    constrained = {"regex": args.regex}
    engine = Engine(**common)
    os.environ[ENABLE_ENV] = "1"  # read by the second engine's scheduler when it starts
    try:
        prefetching = Engine(**common)
    finally:
        del os.environ[ENABLE_ENV]
    variants = {"free": (engine, None), "constrained": (engine, constrained), "prefetch": (prefetching, constrained)}
    try:
        samples = alternate(variants, args)
    finally:
        engine.shutdown()
        prefetching.shutdown()
    results = []
    for bs in args.batch_size:
        free, after, prefetched = (statistics.median(samples[name, bs]) for name in variants)
        results.append(
            {
                "batch_size": bs,
                "decode_step_ms_free": round(free, 4),
                "decode_step_ms_constrained": round(after, 4),
                "decode_step_ms_constrained_prefetch": round(prefetched, 4),
                "overhead_pct": round((after / free - 1) * 100, 2),
                "overhead_pct_prefetch": round((prefetched / free - 1) * 100, 2),
            }
        )
    report = {
        "benchmark": "Structured output (xgrammar masks) on a decode step, masks filled after forward or prefetched",
        "command": "python benchmark/serving/bench_grammar.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": machine_name(engine.server_args.device),
        "date": datetime.date.today().isoformat(),
        "description": f"Median decode-step time through the whole serving path, {args.rounds} alternating rounds, "
        f"input {args.input_len} tokens, output {args.output_len}; constrained rows carry {constrained}; "
        f"prefetch runs on a second engine started with {ENABLE_ENV}=1.",
        "results": results,
    }
    emit_report(report, args.result_filename)
    return report


if __name__ == "__main__":
    main()
