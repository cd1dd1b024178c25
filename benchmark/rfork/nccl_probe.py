"""Where does pair-group NCCL time go? Per-iteration broadcast times: world group vs our pair group.

    python benchmark/rfork/nccl_probe.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from sglang.srt.remote_instance.pair_group import open_pair_group
from sglang.srt.server_args import free_port

# Llama-3-8B-like tensor list: 195 tensors, about 16 GB in bf16.
SHAPES = [(128256, 4096)] + [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336), (4096,), (4096,)] * 32 + [
    (4096,), (128256, 4096)]


def _timed(label: str, rank: int, fn) -> None:
    for i in range(4):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        if rank == 1:
            print(f"{label} iter {i}: {time.perf_counter() - start:.3f} s", flush=True)


def worker(rank: int, world_port: int, pair_port: int) -> None:
    torch.cuda.set_device(rank)
    tensors = [torch.empty(s, dtype=torch.bfloat16, device="cuda") for s in SHAPES]
    if rank == 1:
        print(f"{sum(t.numel() * 2 for t in tensors) / 1e9:.2f} GB in {len(tensors)} tensors", flush=True)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{world_port}", rank=rank, world_size=2)
    _timed("world group", rank, lambda: [dist.broadcast(t, src=0) for t in tensors])
    start = time.perf_counter()
    group = open_pair_group("127.0.0.1", pair_port, rank, "probe", torch.device("cuda", rank), 60)
    if rank == 1:
        print(f"pair group setup {time.perf_counter() - start:.3f} s", flush=True)
    _timed("pair group", rank, lambda: group.broadcast_all(tensors, time.monotonic() + 60))
    group.close()
    dist.destroy_process_group()


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "python"))
    mp.spawn(worker, args=(free_port(), free_port()), nprocs=2)
