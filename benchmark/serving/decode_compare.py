"""A/B comparison of decode steps through the whole serving path, shared by the overhead benchmarks.

A decode step's time is (time of a batch generating output-len tokens - time of the same batch generating one) /
(output-len - 1), through the whole serving path (TokenizerManager, scheduler, model). Variants are measured in
alternating rounds in one run, so that drift of the machine hits every variant alike.
"""

from __future__ import annotations

import argparse
import random
import time

from sglang.srt.entrypoints.engine import Engine

# A variant: the engine it runs on and the sampling parameters it adds to every row (None: none).
Variant = tuple[Engine, dict | None]


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
        outs = engine.generate(input_ids=prompts, sampling_params=params)
        elapsed = time.perf_counter() - start
        short = [o["meta_info"] for o in outs if o["meta_info"]["completion_tokens"] != n]
        if short:
            # A row that ends early (a grammar that no token of this vocabulary fits, say) times nothing.
            raise RuntimeError(
                f"{len(short)} of {batch_size} rows did not generate {n} tokens with {extra}, e.g. "
                f"{short[0]['completion_tokens']} tokens, finish_reason {short[0]['finish_reason']}; "
                "pick sampling parameters that let every row run its full length"
            )
        return elapsed

    engine.flush_cache()
    one = timed(1)
    engine.flush_cache()
    return (timed(output_len) - one) / (output_len - 1) * 1e3


def add_args(parser: argparse.ArgumentParser) -> None:
    """The flags every A/B decode benchmark takes."""
    parser.add_argument("--model-path", required=True)
    parser.add_argument("--batch-size", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--load-format", default="auto")
    parser.add_argument("--device", default=None)
    parser.add_argument("--max-total-tokens", type=int, default=None)
    parser.add_argument("--result-filename", default=None)


def alternate(variants: dict[str, Variant], args: argparse.Namespace) -> dict[tuple[str, int], list[float]]:
    """Per (variant, batch size), the decode-step milliseconds of every round, after one warm-up of each; the
    variants take turns going first."""
    for bs in args.batch_size:  # first-use costs (kernels, graphs, a grammar's tokenizer info) out of the numbers
        for engine, extra in variants.values():
            decode_step_ms(engine, bs, args.input_len, min(args.output_len, 8), -1, extra)
    samples: dict[tuple[str, int], list[float]] = {(k, bs): [] for k in variants for bs in args.batch_size}
    for r in range(args.rounds):
        for bs in args.batch_size:
            order = list(variants) if r % 2 == 0 else list(reversed(variants))
            for name in order:
                engine, extra = variants[name]
                samples[name, bs].append(decode_step_ms(engine, bs, args.input_len, args.output_len, r, extra))
    return samples
