"""`python -m sglang.bench_one_batch`: prefill and decode latency of one static batch, without the server.

The same run measures HF transformers' `generate` on the same model shape and batch, and the HBM roofline of a
decode step (weight bytes / device copy bandwidth), and prints everything as one JSON object.

    python -m sglang.bench_one_batch --model-path DIR --load-format dummy --batch-size 1 32 \\
        --input-len 256 --output-len 64 --result-filename out.json
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

from sglang.srt.configs.model_config import ModelConfig
from sglang.srt.layers import fused_kernels
from sglang.srt.layers.logits_processor import LogitsProcessorOutput
from sglang.srt.managers.schedule_batch import Req, alloc_kv_slots, build_forward_batch
from sglang.srt.model_executor.forward_batch_info import ForwardMode
from sglang.srt.model_executor.model_runner import ModelRunner
from sglang.srt.sampling.sampling_params import SamplingParams
from sglang.srt.server_args import ServerArgs, free_port


@dataclasses.dataclass
class BenchArgs:
    """What to measure (upstream bench_one_batch's flag names)."""

    run_name: str = "default"
    batch_size: tuple[int, ...] = (1,)
    input_len: int = 1024
    output_len: int = 16
    result_filename: str | None = None
    skip_hf: bool = False
    profile: bool = False
    seed: int = 0

    @staticmethod
    def add_cli_args(parser: argparse.ArgumentParser) -> None:
        """Add the benchmark's own flags."""
        parser.add_argument("--run-name", default=BenchArgs.run_name)
        parser.add_argument("--batch-size", type=int, nargs="+", default=list(BenchArgs.batch_size))
        parser.add_argument("--input-len", type=int, default=BenchArgs.input_len)
        parser.add_argument("--output-len", type=int, default=BenchArgs.output_len)
        parser.add_argument("--result-filename", default=None, help="also write the JSON here")
        parser.add_argument("--skip-hf", action="store_true", help="do not measure HF transformers' generate")
        parser.add_argument("--profile", action="store_true", help="add the top device kernels of decode steps")
        parser.add_argument("--seed", type=int, default=BenchArgs.seed, help="seed of the random prompt ids")

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace) -> BenchArgs:
        """BenchArgs from parsed flags."""
        names = [f.name for f in dataclasses.fields(cls)]
        values = {name: getattr(args, name) for name in names}
        values["batch_size"] = tuple(values["batch_size"])
        return cls(**values)


class BatchDriver:
    """Prefills and greedily decodes a static batch on a ModelRunner through the scheduler's batch builder."""

    def __init__(self, runner: ModelRunner) -> None:
        self.runner = runner
        self.reqs: list[Req] = []

    def start(self, prompts: list[list[int]]) -> None:
        """Give each prompt a request row; nothing is computed yet."""
        self.reqs = []
        for i, prompt in enumerate(prompts):
            req = Req(rid=str(i), origin_input_ids=list(prompt), sampling_params=SamplingParams(temperature=0.0))
            req.req_pool_idx = self.runner.req_to_token_pool.alloc()
            if req.req_pool_idx is None:
                raise RuntimeError(f"{len(prompts)} prompts need more request rows than --max-running-requests")
            self.reqs.append(req)

    def _run(self, mode: ForwardMode, num_tokens: int, full_logits: bool) -> LogitsProcessorOutput:
        slots = alloc_kv_slots(self.reqs, mode, self.runner)
        if slots is None:
            raise RuntimeError(f"KV pool too small for {num_tokens} more tokens; raise --max-total-tokens")
        batch = build_forward_batch(self.reqs, mode, slots, self.runner, return_full_logits=full_logits)
        out = self.runner.forward(batch)
        for req in self.reqs:
            req.kv_len += req.extend_len if mode.is_extend() else 1
        return out

    def extend(self, max_tokens: int | None = None, full_logits: bool = False) -> LogitsProcessorOutput:
        """Prefill up to max_tokens more prompt tokens of every request (all that remain by default)."""
        for req in self.reqs:
            remaining = req.remaining_prefill()
            req.extend_len = remaining if max_tokens is None else min(remaining, max_tokens)
        return self._run(ForwardMode.EXTEND, sum(r.extend_len for r in self.reqs), full_logits)

    def decode(self, token_ids: list[int]) -> LogitsProcessorOutput:
        """Append one token per request and compute the logits after it."""
        for req, token in zip(self.reqs, token_ids):
            req.output_ids.append(token)
        return self._run(ForwardMode.DECODE, len(self.reqs), False)

    def finish(self) -> None:
        """Return every request's row and KV slots (whole pages: no two requests share one)."""
        pool = self.runner.req_to_token_pool
        for req in self.reqs:
            self.runner.token_to_kv_pool_allocator.free(pool.req_to_token[req.req_pool_idx, : req.kv_len])
            pool.free(req.req_pool_idx)
        self.reqs = []


def greedy(out: LogitsProcessorOutput) -> list[int]:
    """Argmax token per row (the copy to the host also waits for the step to finish)."""
    return out.next_token_logits.argmax(dim=-1).tolist()


def random_prompts(batch_size: int, input_len: int, vocab_size: int, seed: int) -> list[list[int]]:
    """Uniform random token ids, reproducible for a seed."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch_size, input_len), generator=gen).tolist()


def latency_test(driver: BatchDriver, prompts: list[list[int]], output_len: int) -> dict[str, float]:
    """Time one prefill and output_len - 1 decode steps of the batch (each timed to the tokens on the host)."""
    driver.start(prompts)
    start = time.perf_counter()
    tokens = greedy(driver.extend())
    prefill = time.perf_counter() - start
    steps: list[float] = []
    for _ in range(output_len - 1):
        start = time.perf_counter()
        tokens = greedy(driver.decode(tokens))
        steps.append(time.perf_counter() - start)
    driver.finish()
    bs, input_len = len(prompts), len(prompts[0])
    median = statistics.median(steps)
    return {
        "prefill_ms": prefill * 1e3,
        "prefill_tok_per_s": bs * input_len / prefill,
        "decode_median_ms": median * 1e3,
        "decode_mean_ms": statistics.fmean(steps) * 1e3,
        "decode_tok_per_s": bs / median,
    }


def copy_bandwidth(device: torch.device, iters: int = 10) -> float:
    """Device-to-device copy rate in bytes/s, counting bytes read plus bytes written (the HBM ceiling)."""
    # Far larger than the GPU's L2, so the copy streams from HBM; CPUs get less to keep smoke runs quick.
    nbytes = 1 << 30 if device.type == "cuda" else 1 << 26
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    _sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        dst.copy_(src)
    _sync(device)
    return 2 * nbytes * iters / (time.perf_counter() - start)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def emit_report(report: dict[str, Any], path: str | None) -> None:
    """Print a benchmark's JSON report and, when path is given, write the same text there."""
    text = json.dumps(report, indent=2)
    print(text)
    if path:
        with open(path, "w") as f:
            f.write(text + "\n")


def machine_name(device: str) -> str:
    """GPU model and count, or the CPU and its cores."""
    if device == "cuda":
        return f"{torch.cuda.device_count()}x {torch.cuda.get_device_name()}"
    return f"{platform.machine()} CPU, {os.cpu_count()} cores"


def profile_steps(step: Callable[[], Any], device: torch.device, steps: int = 5, top: int = 12) -> dict[str, Any]:
    """Device time per step, split by kernel: where a decode step's time goes."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    step()
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            step()
        wall = (time.perf_counter() - start) / steps
    # On a GPU the kernels' own time; on a CPU the operators' own time (the CPU is the device there).
    attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = sorted(
        (e for e in prof.key_averages() if getattr(e, attr) > 0), key=lambda e: getattr(e, attr), reverse=True
    )
    return {
        "wall_ms_per_step": wall * 1e3,
        "device_busy_ms_per_step": sum(getattr(e, attr) for e in events) / steps / 1e3,
        # Fusing the elementwise layers shows up here first: fewer, not just faster, kernels per step.
        "kernels_per_step": sum(e.count for e in events) / steps,
        "top_kernels": [
            {"name": e.key[:120], "calls_per_step": e.count / steps, "ms_per_step": getattr(e, attr) / steps / 1e3}
            for e in events[:top]
        ],
    }


def hf_generate_latency(
    model_path: str, dtype: str, device: str, bench: BenchArgs, vocab_size: int
) -> list[dict[str, float]]:
    """HF transformers `generate` (greedy, random weights of the same shape) on the same batches."""
    from transformers import AutoConfig, AutoModelForCausalLM, LogitsProcessorList

    config = AutoConfig.from_pretrained(model_path)
    torch_dtype = ModelConfig.from_path(model_path, dtype, None, device).dtype
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch_dtype)
    try:
        # Built directly on the device: initialising billions of weights on the host first takes minutes.
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config)
    finally:
        torch.set_default_dtype(default_dtype)
    model = model.to(device=device, dtype=torch_dtype).eval()

    def generate(ids: torch.Tensor, n: int) -> tuple[float, float]:
        """(prefill, mean decode step) of one generate call, timed inside it: a logits processor runs after
        every forward, so the steps are measured directly rather than as the difference of two runs (which
        a busy host could make zero or negative)."""
        stamps: list[float] = []

        def stamp(input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            _sync(scores.device)
            stamps.append(time.perf_counter())
            return scores

        _sync(ids.device)
        start = time.perf_counter()
        model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            pad_token_id=0,
            logits_processor=LogitsProcessorList([stamp]),
        )
        step = (stamps[-1] - stamps[0]) / (len(stamps) - 1) if len(stamps) > 1 else float("nan")
        return stamps[0] - start, step

    rows = []
    with torch.inference_mode():
        for bs in bench.batch_size:
            ids = torch.tensor(random_prompts(bs, bench.input_len, vocab_size, bench.seed), device=device)
            generate(ids, min(bench.output_len, 4))
            # Best of three of each: a single slow run (a busy host) says little about the model.
            runs = [generate(ids, max(bench.output_len, 2)) for _ in range(3)]
            prefill, step = min(r[0] for r in runs), min(r[1] for r in runs)
            rows.append({"prefill_ms": prefill * 1e3, "decode_step_ms": step * 1e3, "decode_tok_per_s": bs / step})
    return rows


def make_runner(server_args: ServerArgs) -> ModelRunner:
    """A single-rank ModelRunner built from server flags."""
    if server_args.tp_size != 1:
        raise SystemExit("bench_one_batch runs one rank; use --tp-size 1 (bench_serving measures TP servers).")
    config = ModelConfig.from_path(
        server_args.model_path, server_args.dtype, server_args.context_length, server_args.device
    )
    return ModelRunner(config, server_args, 0, server_args.base_gpu_id, f"tcp://127.0.0.1:{free_port()}")


def profile_decode(driver: BatchDriver, prompts: list[list[int]]) -> dict[str, Any]:
    """Profile decode steps of the batch after its prefill."""
    driver.start(prompts)
    tokens = greedy(driver.extend())

    def step() -> None:
        tokens[:] = greedy(driver.decode(tokens))

    report = profile_steps(step, driver.runner.device)
    driver.finish()
    return report


def measure_runtime(server_args: ServerArgs, bench: BenchArgs) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Our latency rows per batch size, and facts about the model and device; the runner is freed on return."""
    runner = make_runner(server_args)
    driver = BatchDriver(runner)
    bandwidth = copy_bandwidth(runner.device)
    roofline_ms = runner.weight_bytes / bandwidth * 1e3
    results = []
    for bs in bench.batch_size:
        prompts = random_prompts(bs, bench.input_len, runner.model_config.vocab_size, bench.seed)
        latency_test(driver, prompts, min(bench.output_len, 4))  # warm-up: kernel selection, JIT, allocator
        row: dict[str, Any] = {"batch_size": bs, "input_len": bench.input_len, "output_len": bench.output_len}
        row.update(latency_test(driver, prompts, bench.output_len))
        row["decode_vs_roofline"] = row["decode_median_ms"] / roofline_ms
        if bench.profile:
            row["profile"] = profile_decode(driver, prompts)
        results.append(row)
    graphs = runner.cuda_graph_runner
    facts = {
        "dtype": str(runner.model_config.dtype).removeprefix("torch."),
        "vocab_size": runner.model_config.vocab_size,
        "attention_backend": server_args.attention_backend,
        "fused_kernels": fused_kernels.enabled(runner.device, runner.model_config.dtype),
        "decode_tensor_cores": getattr(runner.attn_backend, "tensor_cores", None),
        "page_size": server_args.page_size,
        "cuda_graph_batch_sizes": graphs.batch_sizes if graphs else [],
        "cuda_graph_capture_s": graphs.capture_seconds if graphs else None,
        "weight_bytes": runner.weight_bytes,
        "copy_bandwidth_gb_per_s": bandwidth / 1e9,
        "roofline_decode_ms": roofline_ms,
    }
    return results, facts


def run(server_args: ServerArgs, bench: BenchArgs, command: str) -> dict[str, Any]:
    """Measure every batch size, then HF transformers on the same batches, and return the report."""
    results, facts = measure_runtime(server_args, bench)
    gc.collect()  # the runner and its graph runner point at each other; free both before HF loads its copy
    if server_args.device == "cuda":
        torch.cuda.empty_cache()
    if not bench.skip_hf:
        hf_rows = hf_generate_latency(
            server_args.model_path, server_args.dtype, server_args.device, bench, facts["vocab_size"]
        )
        for row, hf in zip(results, hf_rows):
            row.update({f"hf_{key}": value for key, value in hf.items()})
            row["decode_speedup_vs_hf"] = row["decode_tok_per_s"] / hf["decode_tok_per_s"]
    return {
        "command": command,
        "machine": machine_name(server_args.device),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "run_name": bench.run_name,
        "model_path": server_args.model_path,
        "load_format": server_args.load_format,
        **facts,
        "results": results,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse flags, run, print the JSON (and write it to --result-filename)."""
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m sglang.bench_one_batch")
    ServerArgs.add_cli_args(parser)
    BenchArgs.add_cli_args(parser)
    args = parser.parse_args(argv)
    bench = BenchArgs.from_cli_args(args)
    server_args = ServerArgs.from_cli_args(args)
    longest = bench.input_len + bench.output_len
    if server_args.max_total_tokens is None:
        server_args.max_total_tokens = max(bench.batch_size) * longest + 64
    server_args.max_running_requests = max(server_args.max_running_requests, *bench.batch_size)
    report = run(server_args, bench, " ".join(["python -m sglang.bench_one_batch", *argv]))
    emit_report(report, bench.result_filename)
    return report


if __name__ == "__main__":
    main()
