"""Cost of --enable-metrics on a decode step: two engines of the same model, one with metrics and one without,
measured in alternating rounds in one run so that drift of the machine hits both alike.

    python benchmark/serving/bench_metrics_overhead.py --model-path DIR --batch-size 1 32 \\
        [--input-len 128] [--output-len 64] [--rounds 5] [--mem-fraction-static 0.4] [--result-filename FILE]

A decode step's time is (time of a batch generating output-len tokens - time of the same batch generating one) /
(output-len - 1), through the whole serving path (TokenizerManager, scheduler, model). Prints JSON: per batch
size, the median milliseconds per step with metrics off and on, and the overhead in percent.
"""

from __future__ import annotations

import argparse
import datetime
import random
import statistics
import sys
import time
from typing import Any

from sglang.bench_one_batch import emit_report, machine_name
from sglang.srt.entrypoints.engine import Engine


def decode_step_ms(
    engine: Engine, batch_size: int, input_len: int, output_len: int, seed: int, extra: dict | None = None
) -> float:
    """One measurement of a decode step of a batch of fresh random prompts (fresh: no prefix-cache hits); extra:
    more sampling parameters for every row (a grammar, say)."""
    rng = random.Random(seed)
    vocab = engine.tokenizer_manager.model_config.vocab_size
    prompts = [[rng.randrange(10, vocab) for _ in range(input_len)] for _ in range(batch_size)]

    def timed(n: int) -> float:
        params = {"max_new_tokens": n, "ignore_eos": True, "temperature": 0, **(extra or {})}
        start = time.perf_counter()
        engine.generate(input_ids=prompts, sampling_params=params)
        return time.perf_counter() - start

    engine.flush_cache()
    one = timed(1)
    engine.flush_cache()
    return (timed(output_len) - one) / (output_len - 1) * 1e3


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the comparison and print its JSON report."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-path", required=True)
    parser.add_argument("--batch-size", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--load-format", default="auto")
    parser.add_argument("--device", default=None)
    parser.add_argument("--mem-fraction-static", type=float, default=None, help="per engine; both share the GPU")
    parser.add_argument("--max-total-tokens", type=int, default=None)
    parser.add_argument("--result-filename", default=None)
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
        for engine in engines.values():  # warm-up: first-use costs (kernels, graphs, allocator) out of the numbers
            for bs in args.batch_size:
                decode_step_ms(engine, bs, args.input_len, min(args.output_len, 8), seed=-1)
        samples: dict[tuple[str, int], list[float]] = {(k, bs): [] for k in engines for bs in args.batch_size}
        for r in range(args.rounds):
            for bs in args.batch_size:
                # Alternate which engine goes first, so neither always runs on a just-warmed machine.
                order = ["off", "on"] if r % 2 == 0 else ["on", "off"]
                for key in order:
                    samples[key, bs].append(decode_step_ms(engines[key], bs, args.input_len, args.output_len, r))
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
