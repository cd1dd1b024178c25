"""Where does a fresh pair group's first big broadcast lose its time? Each variant runs in fresh processes.

    python benchmark/rfork/nccl_probe.py [--extra-gb 80]

Variants (all move the same 195 Llama-3-8B-shaped tensors, ~16 GB bf16, from GPU 0 to GPU 1):
  pair            our pair group as the fork opens it (one-element probe), then four passes
  pair_big_heap   the same after each side allocated --extra-gb more (a serving process holds a KV cache)
  pair_warm_<MB>  pair_big_heap plus a warm-up broadcast of <MB> during setup
  world           init_process_group + barrier, as the raw baseline does (world_big_heap: with --extra-gb)
Each prints JSON lines: setup seconds, per-pass seconds, and the time to close the group.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "python"))

from sglang.srt.remote_instance.pair_group import join_seed_group, open_seed_group  # noqa: E402
from sglang.srt.server_args import free_port  # noqa: E402
from sglang.test.test_utils import LLAMA3_8B_SHAPE  # noqa: E402


def llama3_8b_tensor_shapes() -> list[tuple[int, ...]]:
    """The 195 weight shapes of a Llama-3-8B-shaped model as our runtime holds them (fused qkv and gate_up)."""
    s = LLAMA3_8B_SHAPE
    h, inter, v = s["hidden_size"], s["intermediate_size"], s["vocab_size"]
    kv = s["num_key_value_heads"] * s["head_dim"]
    layer = [(h + 2 * kv, h), (h, h), (2 * inter, h), (h, inter), (h,), (h,)]
    return [(v, h)] + layer * s["num_hidden_layers"] + [(h,), (v, h)]


def _sync_time(fn) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def worker(rank: int, variant: str, port: int, extra_gb: float, queue) -> None:
    torch.cuda.set_device(rank)
    tensors = [torch.empty(s, dtype=torch.bfloat16, device="cuda") for s in llama3_8b_tensor_shapes()]
    heap = None
    if ("big_heap" in variant or variant.startswith("pair_warm_")) and extra_gb:
        heap = torch.empty(int(extra_gb * 1e9), dtype=torch.uint8, device="cuda")
    record: dict = {"variant": variant, "bytes": sum(t.numel() * 2 for t in tensors)}
    start = time.perf_counter()
    if variant.startswith("world"):
        dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
        dist.barrier()
        record["setup_s"] = time.perf_counter() - start

        def run() -> None:
            for t in tensors:
                dist.broadcast(t, src=0)

        close = dist.destroy_process_group
    else:
        device = torch.device("cuda", rank)
        if rank == 0:
            group = open_seed_group("127.0.0.1", port, {"127.0.0.1"}, "probe", device, 120)
        else:
            group = join_seed_group("127.0.0.1", port, "probe", device, 120)
        record["setup_s"] = time.perf_counter() - start
        if variant.startswith("pair_warm_"):
            warm = torch.empty(int(variant.rsplit("_", 1)[1]) << 20, dtype=torch.uint8, device="cuda")
            record["warmup_s"] = _sync_time(lambda: group.broadcast_all([warm], time.monotonic() + 120))

        def run() -> None:
            group.broadcast_all(tensors, time.monotonic() + 120)

        close = group.close
    record["passes_s"] = [round(_sync_time(run), 4) for _ in range(4)]
    start = time.perf_counter()
    close()
    record["close_s"] = round(time.perf_counter() - start, 4)
    del heap
    if rank == 1:
        queue.put(record)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--extra-gb", type=float, default=80.0)
    variants = "pair,pair_big_heap,pair_warm_1,pair_warm_64,pair_warm_1024,world,world_big_heap"
    parser.add_argument("--variants", default=variants)
    args = parser.parse_args()
    ctx = mp.get_context("spawn")
    for variant in args.variants.split(","):
        queue = ctx.Queue()
        port = free_port()
        procs = [ctx.Process(target=worker, args=(r, variant, port, args.extra_gb, queue)) for r in range(2)]
        for p in procs:
            p.start()
        record = queue.get(timeout=300)
        for p in procs:
            p.join(60)
        record["gbps_per_pass"] = [round(record["bytes"] / s / 1e9, 1) for s in record["passes_s"]]
        record["env"] = {k: v for k, v in os.environ.items() if k.startswith("NCCL_")}
        print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
