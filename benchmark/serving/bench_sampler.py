"""Time one sampling step of a batch (Llama-3 vocabulary) with the Sampler, next to the way it sampled before, in
one run:

- plain sampling: the Sampler against a per-row loop that filtered on the device, copied the probabilities to the
  host and drew with torch.multinomial there;
- penalties (repetition, frequency, presence, each request with a prompt and earlier outputs): the Sampler with its
  batched device penalties against the same Sampler with the per-row reference path (Sampler(penalties="per_row"),
  the earlier code: host-built index tensors per row per step). Each timed call is one decode step: every row then
  gains the token it sampled, as in serving.

    python benchmark/serving/bench_sampler.py [--device cuda] [--batch-size 1 8 32 128] [--prompt-len 1024] \\
        [--history-len 256] [--output FILE]

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
PENALTY_PARAMS = {
    "greedy_repetition_1.1": {"temperature": 0, "repetition_penalty": 1.1},
    "greedy_frequency_presence": {"temperature": 0, "frequency_penalty": 0.5, "presence_penalty": 0.5},
    "top_p_0.95_all_penalties": {
        "temperature": 0.7,
        "top_p": 0.95,
        "repetition_penalty": 1.05,
        "frequency_penalty": 0.3,
        "presence_penalty": 0.3,
    },
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


def penalised_reqs(bs: int, params: dict, prompt_len: int, history_len: int) -> list[Req]:
    """bs requests with random prompts and outputs so far (a fresh set per variant: each keeps its own state)."""
    gen = torch.Generator().manual_seed(bs)
    reqs = []
    for i in range(bs):
        prompt = torch.randint(0, VOCAB, (prompt_len,), generator=gen).tolist()
        req = Req(rid=str(i), origin_input_ids=prompt, sampling_params=SamplingParams(**params))
        req.output_ids = torch.randint(0, VOCAB, (history_len,), generator=gen).tolist()
        reqs.append(req)
    return reqs


def decode_step(sampler: Sampler, logits: torch.Tensor, reqs: list[Req]) -> None:
    """One sampling step, then every row keeps its token (the next step has one more output token per row)."""
    for req, token in zip(reqs, sampler(logits, reqs).token_ids):
        req.output_ids.append(token)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch-size", type=int, nargs="+", default=[1, 8, 32, 128])
    ap.add_argument("--prompt-len", type=int, default=1024, help="prompt tokens of each penalised request")
    ap.add_argument("--history-len", type=int, default=256, help="output tokens each penalised request starts with")
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
    penalty_rows = []
    for name, params in PENALTY_PARAMS.items():
        for bs in args.batch_size:
            logits = torch.randn(bs, VOCAB, device=args.device) * 3
            times = {}
            for impl in ("batched", "per_row"):
                reqs = penalised_reqs(bs, params, args.prompt_len, args.history_len)
                sampler = Sampler(0, lambda req: {VOCAB - 1}, penalties=impl)
                times[impl] = median_ms(partial(decode_step, sampler, logits, reqs), args.device, args.repeat)
            penalty_rows.append(
                {
                    "params": name,
                    "batch_size": bs,
                    "batched_ms": times["batched"],
                    "per_row_ms": times["per_row"],
                    "speedup": times["per_row"] / times["batched"],
                }
            )
    report = {
        "command": f"python benchmark/serving/bench_sampler.py --device {args.device} --batch-size "
        + " ".join(map(str, args.batch_size))
        + f" --prompt-len {args.prompt_len} --history-len {args.history_len}",
        "machine": machine_name(args.device),
        "date": datetime.date.today().isoformat(),
        "vocab": VOCAB,
        "results": rows,
        "penalties": penalty_rows,
    }
    emit_report(report, args.output)


if __name__ == "__main__":
    main()
