"""Time one sampling step of a batch (Llama-3 vocabulary) with the Sampler, next to the way it sampled before:
per row, filter on the device, copy the probabilities to the host and draw with torch.multinomial there.

    python benchmark/serving/bench_sampler.py [--device cuda] [--batch-size 1 8 32] [--output FILE]

Prints JSON: for each batch size and parameter set, the median milliseconds per step of both and their ratio.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import time
from functools import partial

import torch

from sglang.bench_one_batch import emit_report, machine_name
from sglang.srt.layers.sampler import Sampler
from sglang.srt.managers.schedule_batch import Req
from sglang.srt.sampling.sampling_params import SamplingParams

VOCAB = 128256
PARAMS = {
    "temperature_1": {"temperature": 1.0},
    "top_p_0.95": {"temperature": 0.7, "top_p": 0.95},
    "top_p_0.9_top_k_50": {"temperature": 0.8, "top_p": 0.9, "top_k": 50},
}


def per_row_host_draw(logits: torch.Tensor, reqs: list[Req], generator: torch.Generator) -> list[int]:
    """The baseline: what the Sampler did until 2026-11-29 for each non-greedy row."""
    ids = []
    for i, req in enumerate(reqs):
        p = req.sampling_params
        probs = torch.softmax(logits[i].float() / p.temperature, dim=-1)
        if 0 < p.top_k < probs.numel():
            kth = torch.topk(probs, p.top_k).values[-1]
            probs = torch.where(probs >= kth, probs, torch.zeros_like(probs))
        if p.top_p < 1.0:
            sorted_probs, order = torch.sort(probs, descending=True)
            cum = torch.cumsum(sorted_probs, 0)
            sorted_probs[(cum - sorted_probs) > p.top_p * cum[-1]] = 0
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
        ids.append(int(torch.multinomial((probs / probs.sum()).cpu(), 1, generator=generator)))
    return ids


def median_ms(fn, device: str, repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()  # both end in a host copy of the chosen ids, so the step is complete here
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch-size", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--output", default=None)
    args = ap.parse_args()
    rows = []
    for name, params in PARAMS.items():
        for bs in args.batch_size:
            logits = torch.randn(bs, VOCAB, device=args.device) * 3
            reqs = [Req(rid=str(i), origin_input_ids=[1], sampling_params=SamplingParams(**params)) for i in range(bs)]
            sampler, gen = Sampler(0, lambda req: set()), torch.Generator().manual_seed(0)
            new = median_ms(partial(sampler, logits, reqs), args.device, args.repeat)
            old = median_ms(partial(per_row_host_draw, logits, reqs, gen), args.device, args.repeat)
            rows.append(
                {"params": name, "batch_size": bs, "sampler_ms": new, "per_row_host_draw_ms": old, "speedup": old / new}
            )
    report = {
        "command": f"python benchmark/serving/bench_sampler.py --device {args.device} --batch-size "
        + " ".join(map(str, args.batch_size)),
        "machine": machine_name(args.device),
        "date": datetime.date.today().isoformat(),
        "vocab": VOCAB,
        "results": rows,
    }
    emit_report(report, args.output)


if __name__ == "__main__":
    main()
