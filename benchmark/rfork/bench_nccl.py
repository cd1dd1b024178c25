"""R-Fork NCCL backend on two GPUs: fork GB/s vs a raw NCCL broadcast of the same tensors, fork load time vs disk.

python benchmark/rfork/bench_nccl.py [--model-dir /tmp/llama8b] [--seed-gpu 0 --client-gpu 1]

The Mooncake backend has its own script, bench_transfer_engine.py.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    drop_page_cache,
    ensure_checkpoint,
    launch,
    log_dir,
    server_info,
    stamp,
    write_result,
)

from sglang.srt.server_args import free_port  # noqa: E402
from sglang.test.rfork_utils import fork_client_args  # noqa: E402
from sglang.test.test_utils import config_only_copy  # noqa: E402


def param_shapes(model_dir: Path) -> list[tuple[tuple[int, ...], torch.dtype]]:
    """Shapes of the tensors a fork moves, from our model skeleton on the meta device."""
    from sglang.srt.configs.model_config import ModelConfig
    from sglang.srt.model_loader.loader import build_model_skeleton

    cfg = ModelConfig.from_path(str(model_dir), "bfloat16", device="cuda")
    model = build_model_skeleton(cfg, torch.device("meta"))
    return [(tuple(p.shape), p.dtype) for _, p in model.named_parameters()]


def _raw_broadcast(rank: int, gpus: list[int], port: int, shapes: list, results: dict) -> None:
    torch.cuda.set_device(gpus[rank])
    tensors = [torch.empty(s, dtype=d, device="cuda") for s, d in shapes]
    nbytes = sum(t.numel() * t.element_size() for t in tensors)
    # Cold: communicator creation plus the first pass, what a one-shot transfer between fresh processes pays.
    start = time.perf_counter()
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    dist.barrier()
    cold_setup = time.perf_counter() - start
    times = []
    for _ in range(4):
        dist.barrier()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for t in tensors:
            dist.broadcast(t, src=0)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    if rank == 1:
        best = min(times[1:])
        results["raw"] = {
            "bytes": nbytes,
            "best_s": best,
            "gbps": nbytes / best / 1e9,
            "first_pass_s": times[0],
            "cold_s": cold_setup + times[0],
        }
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-dir", default="/tmp/llama8b")
    parser.add_argument("--seed-gpu", type=int, default=0)
    parser.add_argument("--client-gpu", type=int, default=1)
    parser.add_argument("--seed-dummy-weights", action="store_true", help="seed with --load-format dummy (no disk)")
    parser.add_argument("--model-name", default="Llama-3-8B-shaped", help="what --model-dir holds, for the JSON")
    parser.add_argument("--result-name", default="rfork_nccl_h200x2.json")
    args = parser.parse_args()
    # Dummy seed weights need only a config-only directory (make_llama3_8b_dummy.py): no checkpoint, no disk baseline.
    model_dir = Path(args.model_dir) if args.seed_dummy_weights else ensure_checkpoint(Path(args.model_dir))
    shapes = param_shapes(model_dir)
    results = mp.Manager().dict()
    mp.spawn(_raw_broadcast, args=([args.seed_gpu, args.client_gpu], free_port(), shapes, results), nprocs=2)
    raw = dict(results["raw"])

    cold = drop_page_cache()
    common = ["--attention-backend", "torch_native", "--disable-cuda-graph", "--max-total-tokens", "65536"]
    logs = log_dir()
    seed_port, client_port = free_port(), free_port()
    seed_args = [*common, "--base-gpu-id", str(args.seed_gpu)]
    if args.seed_dummy_weights:
        seed_args += ["--load-format", "dummy"]
    seed = launch(model_dir, seed_port, seed_args, logs / "seed.log")
    client = None
    try:
        disk = server_info(seed_port)
        client_dir = Path(config_only_copy(model_dir, "/tmp/llama8b-client"))
        client_args = [
            *common,
            "--base-gpu-id",
            str(args.client_gpu),
            *fork_client_args(seed_port, "nccl", timeout=None),
            "--remote-instance-weight-loader-send-weights-group-ports",
            f"[{free_port()}]",
        ]
        client = launch(client_dir, client_port, client_args, logs / "client.log")
        forked = server_info(client_port)
        client.terminate()
        client.wait(30)
        client = None
    finally:
        for proc in (client, seed):
            if proc is not None:
                proc.terminate()
                proc.wait(30)
    report = forked["fork_report"]
    write_result(
        {
            **stamp(" ".join(["python benchmark/rfork/bench_nccl.py", *sys.argv[1:]])),
            "model": f"{args.model_name}, bf16, random weights",
            "num_tensors": len(shapes),
            "weight_bytes": forked["weight_bytes"],
            "raw_nccl_broadcast_gbps": round(raw["gbps"], 1),
            "raw_nccl_first_pass_s": round(raw["first_pass_s"], 3),
            "fork_transfer_gbps": round(report["gbps"], 1),
            "fork_vs_raw": round(report["gbps"] / raw["gbps"], 3),
            "fork_steps_s": {k: round(v, 3) for k, v in report["timings"].items()},
            "raw_nccl_cold_s": round(raw["cold_s"], 3),
            "fork_setup_transfer_teardown_s": round(
                sum(report["timings"][k] for k in ("group setup", "transfer", "teardown")), 3
            ),
            "fork_weight_load_s": round(forked["weight_load_seconds"], 2),
            "disk_weight_load_s": None if args.seed_dummy_weights else round(disk["weight_load_seconds"], 2),
            "disk_page_cache_dropped": cold,
            "fork_speedup_vs_disk": None
            if args.seed_dummy_weights
            else round(disk["weight_load_seconds"] / forked["weight_load_seconds"], 2),
            "seed_log": [line for line in (logs / "seed.log").read_text().splitlines() if "R-Fork" in line][-4:],
        },
        args.result_name,
    )


if __name__ == "__main__":
    main()
