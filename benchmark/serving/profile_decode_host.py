"""Host (CPU) cost of one decode step through the real Scheduler, with and without the model's forward.

A scheduler is built in this process (tp 1) and fed greedy requests that never stop; once all of them decode, each
step is `step_once()` exactly as the event loop runs it (with overlap scheduling: launch this step, then apply the
previous one's tokens; `get_next_batch()` + `run_batch()` in trees without it), outputs drained from the socket.
`null_model` replaces ModelRunner.forward by a stub that returns ready logits, so what is left is the scheduler's
own bookkeeping: building the ForwardBatch, sampling, stop checks, sending outputs. On a GPU the real rows include
the CUDA-graph input copies and the attention plan as well; with the model and overlap on, a row is the decode
step as the server runs it (the host's work hidden behind the device's where it is shorter).

    python benchmark/serving/profile_decode_host.py --batch-size 1 8 32 [--device cuda --model-path DIR]
    python benchmark/serving/profile_decode_host.py --batch-size 8 --cprofile 25   # where the time goes
    # long sequences (the tiny model is generated with a context that holds them), the host alone:
    python benchmark/serving/profile_decode_host.py --batch-size 256 --input-len 4096 --forward null_model
    # the same against another source tree (e.g. `git archive <commit> python | tar -x -C /tmp/old`), alternating:
    python benchmark/serving/profile_decode_host.py --batch-size 32 256 --input-len 4096 --forward null_model \
        --baseline-python /tmp/old/python --rounds 3
"""

from __future__ import annotations

import argparse
import cProfile
import datetime
import json
import os
import pstats
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import zmq

from sglang.bench_one_batch import emit_report, machine_name
from sglang.srt.layers.logits_processor import LogitsProcessorOutput
from sglang.srt.managers.io_struct import TokenizedGenerateReqInput
from sglang.srt.managers.scheduler import Scheduler
from sglang.srt.sampling.sampling_params import SamplingParams
from sglang.srt.server_args import PortArgs, ServerArgs


def build_scheduler(args: argparse.Namespace) -> tuple[Scheduler, zmq.Socket]:
    """A rank-0 scheduler in this process and the socket its outputs arrive on."""
    # Older trees (a --baseline-python run) have no overlap scheduling and no flag for it.
    fields = ServerArgs.__dataclass_fields__
    extra = {"disable_overlap_schedule": args.disable_overlap_schedule} if "disable_overlap_schedule" in fields else {}
    server_args = ServerArgs(
        **extra,
        model_path=args.model_path,
        device=args.device,
        dtype=args.dtype,
        load_format=args.load_format,
        max_running_requests=max(args.batch_size),
        max_total_tokens=max(args.batch_size) * context_needed(args) + 64,
        chunked_prefill_size=args.chunked_prefill_size,
    )
    port_args = PortArgs.init_new(server_args)
    sink = zmq.Context.instance().socket(zmq.PULL)
    sink.bind(port_args.tokenizer_ipc_name)
    return Scheduler(server_args, port_args, 0, 0), sink


def drain(sink: zmq.Socket) -> None:
    while True:
        try:
            sink.recv(zmq.NOBLOCK)
        except zmq.Again:
            return


def start_batch(scheduler: Scheduler, sink: zmq.Socket, bs: int, input_len: int, tag: str) -> None:
    """Queue bs never-ending greedy requests and step until every one of them decodes."""
    for i in range(bs):
        params = SamplingParams(max_new_tokens=1 << 20, temperature=0.0, ignore_eos=True)
        ids = [(7 * i + j) % 200 + 3 for j in range(input_len)]
        scheduler.process_input(TokenizedGenerateReqInput(rid=f"{tag}-{i}", input_ids=ids, sampling_params=params))
    while scheduler.waiting or scheduler.chunked_req:
        scheduler.run_batch(*scheduler.get_next_batch())
    drain(sink)


def stop_batch(scheduler: Scheduler, sink: zmq.Socket) -> None:
    if hasattr(scheduler, "flush_pending"):
        scheduler.flush_pending()
    for req in list(scheduler.running):
        scheduler.abort(req.rid)
    scheduler.drop_aborted_running()
    drain(sink)


def decode_steps(scheduler: Scheduler, sink: zmq.Socket, steps: int) -> list[float]:
    """Seconds per decode step as the event loop runs it: schedule, run (under overlap scheduling: launch this step,
    then apply the previous one's tokens)."""
    times = []
    step_once = getattr(scheduler, "step_once", None)
    for _ in range(steps):
        start = time.perf_counter()
        if step_once is not None:
            step_once()
        else:
            scheduler.run_batch(*scheduler.get_next_batch())
        times.append(time.perf_counter() - start)
        drain(sink)
    return times


def context_needed(args: argparse.Namespace) -> int:
    """Positions the longest sequence reaches: prompt, warm-up, timed (and profiled) steps, and some slack."""
    return args.input_len + 3 * args.steps + 64


def null_forward(vocab: int, device: torch.device):
    """A ModelRunner.forward that does no model work: fixed logits (token 5 wins) for each row."""
    logits = torch.zeros(1024, vocab, device=device)
    logits[:, 5] = 1.0

    def forward(batch: Any) -> LogitsProcessorOutput:
        return LogitsProcessorOutput(next_token_logits=logits[: batch.batch_size])

    return forward


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-path", default=None, help="default: a generated tiny llama")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--load-format", default="auto")
    parser.add_argument("--batch-size", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--input-len", type=int, default=32)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument(
        "--forward",
        nargs="+",
        choices=["model", "null_model"],
        default=["model", "null_model"],
        help="which forwards to time (null_model alone for long sequences: the host's share)",
    )
    parser.add_argument("--chunked-prefill-size", type=int, default=8192)
    parser.add_argument("--disable-overlap-schedule", action="store_true", help="each step's results before the next")
    parser.add_argument(
        "--torch-threads",
        type=int,
        default=1,
        help="CPU threads of torch's ops (1: a shared machine's busy cores do not make small ops wait for a pool)",
    )
    parser.add_argument(
        "--baseline-python",
        default=None,
        help="a python/ directory of another source tree: time it and this tree in alternating child runs",
    )
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds with --baseline-python")
    parser.add_argument("--cprofile", type=int, default=0, help="print the N costliest functions of null-model steps")
    parser.add_argument("--output", default=None, help="also write the JSON here")
    args = parser.parse_args()
    torch.set_num_threads(args.torch_threads)
    if args.model_path is None:
        from sglang.test.test_utils import tiny_model

        # The default tiny model holds 2048 positions; a longer run gets one generated with room for its sequences.
        # (rounded up to a power of two, so nearby runs share one generated checkpoint).
        needed = 1 << (context_needed(args) - 1).bit_length()
        args.model_path = tiny_model("llama") if needed <= 2048 else tiny_model("llama", max_position_embeddings=needed)
    if args.baseline_python:
        emit_report(compare(args), args.output)
        return
    scheduler, sink = build_scheduler(args)
    real_forward = scheduler.runner.forward
    stub = null_forward(scheduler.model_config.vocab_size, scheduler.runner.device)
    rows = []
    for bs in args.batch_size:
        row: dict[str, Any] = {"batch_size": bs}
        for name, forward in (("model", real_forward), ("null_model", stub)):
            if name not in args.forward:
                continue
            scheduler.runner.forward = forward
            start_batch(scheduler, sink, bs, args.input_len, f"{name}{bs}")
            decode_steps(scheduler, sink, 5)
            times = decode_steps(scheduler, sink, args.steps)
            row[f"{name}_step_ms_median"] = statistics.median(times) * 1e3
            if name == "null_model" and args.cprofile:
                profiler = cProfile.Profile()
                profiler.enable()
                decode_steps(scheduler, sink, args.steps)
                profiler.disable()
                print(f"--- batch size {bs}, null model, {args.steps} steps")
                pstats.Stats(profiler).sort_stats("tottime").print_stats(args.cprofile)
            stop_batch(scheduler, sink)
        rows.append(row)
    report = {
        "device": args.device,
        "model_path": args.model_path,
        "steps": args.steps,
        "input_len": args.input_len,
        "torch_threads": args.torch_threads,
        "overlap_schedule": hasattr(scheduler, "step_once") and not args.disable_overlap_schedule,
        "results": rows,
    }
    emit_report(report, args.output)


def child_argv(args: argparse.Namespace) -> list[str]:
    """The flags of one plain measurement with this run's settings (the model already resolved)."""
    argv = ["--model-path", args.model_path, "--device", args.device, "--dtype", args.dtype]
    argv += ["--load-format", args.load_format, "--input-len", str(args.input_len), "--steps", str(args.steps)]
    argv += ["--chunked-prefill-size", str(args.chunked_prefill_size), "--torch-threads", str(args.torch_threads)]
    argv += ["--disable-overlap-schedule"] if args.disable_overlap_schedule else []
    return argv + ["--batch-size", *map(str, args.batch_size), "--forward", *args.forward]


def compare(args: argparse.Namespace) -> dict[str, Any]:
    """Median step times of --baseline-python and of this tree, measured in alternating child processes."""
    trees = {
        "baseline": str(Path(args.baseline_python).resolve()),
        "this_tree": str(Path(__file__).resolve().parents[2] / "python"),
    }
    runs: dict[str, list[list[dict[str, Any]]]] = {name: [] for name in trees}
    for _ in range(args.rounds):
        for name, path in trees.items():
            with tempfile.TemporaryDirectory() as tmp:
                out = os.path.join(tmp, "report.json")
                # The tree first, then whatever else the caller's path held (the GPU machine's bundle of packages),
                # without either tree's own python/ directory.
                rest = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p not in trees.values()]
                env = {**os.environ, "PYTHONPATH": os.pathsep.join([path, *rest])}
                cmd = [sys.executable, __file__, *child_argv(args), "--output", out]
                subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, timeout=3600)
                with open(out) as f:
                    runs[name].append(json.load(f)["results"])
    rows = []
    for i, bs in enumerate(args.batch_size):
        row: dict[str, Any] = {"batch_size": bs}
        for forward in args.forward:
            key = f"{forward}_step_ms_median"
            for name in trees:
                row[f"{forward}_{name}_step_ms"] = statistics.median(run[i][key] for run in runs[name])
            row[f"{forward}_speedup_vs_baseline"] = (
                row[f"{forward}_baseline_step_ms"] / row[f"{forward}_this_tree_step_ms"]
            )
        rows.append(row)
    return {
        "command": "python " + " ".join(sys.argv),
        "machine": machine_name(args.device),
        "date": datetime.date.today().isoformat(),
        "description": "Host cost of one decode step through the real Scheduler (median of each run's median), "
        f"this tree against {args.baseline_python}, {args.rounds} alternating rounds.",
        "input_len": args.input_len,
        "steps": args.steps,
        "torch_threads": args.torch_threads,
        "results": rows,
    }


if __name__ == "__main__":
    main()
