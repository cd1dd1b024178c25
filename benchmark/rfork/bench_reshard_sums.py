"""Host cost of a topology-changing fork's block sums through torch, in fresh processes, with and without the read
step's kernels loaded ahead (transfer_engine_reshard_read.warm_kernels). One GPU.

    python benchmark/rfork/bench_reshard_sums.py [--repeats 2]

Each process times, on 8B-shaped data: the sums of one staged round (32 o_proj-like shards of 16 MiB cut into 4
blocks and 32 down_proj-like of 56 MiB cut into 7, back to back, as `rounds` lays them out) and of in-place
blocks (170 pieces in separate tensors, 3 blocks of 1 MiB each, as a TP2 -> TP1 fork's column-parallel reads
land), each twice: the first call is what a fork pays. CUDA loads a kernel at its first launch, so `cold` (no
warm-up) against `warm` (warm_kernels first, its own time reported) is the baseline, in the same run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import stamp, write_result  # noqa: E402


def _one(warm: bool) -> dict:
    import torch

    from sglang.srt.model_loader.transfer_engine_reshard_read import warm_kernels
    from sglang.srt.remote_instance.block_checksum import RangeSums

    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    torch.zeros(1, device=device)
    start = time.perf_counter()
    if warm:
        warm_kernels(device).join()
    out = {"warm_kernels_ms": round((time.perf_counter() - start) * 1e3, 1) if warm else None}
    sizes = [(16 << 20, 4)] * 32 + [(56 << 20, 7)] * 32
    staged = torch.randint(0, 255, (sum(s for s, _ in sizes),), dtype=torch.uint8, device=device)
    spans, at = [], 0
    for size, k in sizes:
        spans += [(staged, at + size * i // k, at + size * (i + 1) // k) for i in range(k)]
        at += size
    dests = [torch.randint(0, 255, (3 << 20,), dtype=torch.uint8, device=device) for _ in range(170)]
    in_place = [(d, i << 20, (i + 1) << 20) for d in dests for i in range(3)]
    torch.cuda.synchronize()
    for name, ranges in (("staged_round", spans), ("in_place", in_place)):
        for call in ("first", "second"):
            sums = RangeSums(ranges)
            start = time.perf_counter()
            sums()
            host = time.perf_counter() - start
            torch.cuda.synchronize()
            out[f"{name}_{call}"] = {
                "host_ms": round(host * 1e3, 2),
                "total_ms": round((time.perf_counter() - start) * 1e3, 2),
                "blocks": len(ranges),
            }
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--child", choices=["cold", "warm"], help=argparse.SUPPRESS)
    parser.add_argument("--result-name", default="reshard_sums_h200.json")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_one(args.child == "warm")))
        return
    runs: dict[str, list[dict]] = {"cold": [], "warm": []}
    for _ in range(args.repeats):
        for mode in runs:
            proc = subprocess.run(
                [sys.executable, __file__, "--child", mode], capture_output=True, text=True, check=True, timeout=300
            )
            runs[mode].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    write_result(
        {**stamp(" ".join(["python benchmark/rfork/bench_reshard_sums.py", *sys.argv[1:]])), **runs}, args.result_name
    )


if __name__ == "__main__":
    main()
