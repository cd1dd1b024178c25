"""Topology-changing R-Fork over Mooncake nvlink_intra on two GPUs: fork GB/s vs a raw read of the same bytes.

    python benchmark/rfork/bench_topology.py [--model-dir /tmp/llama8b] [--scenarios tp1_to_tp2,tp2_to_tp1]

Scenarios (8B-shaped model, the seed on --load-format dummy weights, so no checkpoint is read):
  tp1_to_tp2: seed TP1 on GPU 0 -> client TP2 on GPUs 0+1;
  tp2_to_tp1: seed TP2 on GPUs 0+1 -> client TP1 on GPU 1.
Fork: per client rank, the bytes it read and its "transfer" time (the reads, summing the staged blocks for their
checks, the scatter into place) from its log line; fork GB/s = all ranks' bytes / the slowest rank's time. The
"verify" step (the in-place blocks' checksums and the comparison) is in each rank's steps, as for an equal-TP fork.
Raw baseline, same run: bare processes on the same GPUs hold the seed ranks' bytes (one registered allocation
each); each client rank's process reads exactly the byte ranges its fork plan reads from each seed rank (planned
here from the same layouts), one `batch_transfer_sync_read` per seed rank, seed ranks in parallel, all client
ranks at once; best of PASSES after the first. "useful" figures count only the client's own weight bytes (a
row-parallel weight split finer than the seed's is read whole: its other columns cross the link too).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import threading
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import launch, log_dir, stamp, write_result  # noqa: E402

from sglang.srt.server_args import free_port  # noqa: E402
from sglang.test.rfork_utils import fork_client_args  # noqa: E402

PASSES = 4
SCENARIOS = {  # name: (seed tp, seed base GPU, client tp, client base GPU)
    "tp1_to_tp2": (1, 0, 2, 0),
    "tp2_to_tp1": (2, 0, 1, 1),
}
COMMON = ["--max-total-tokens", "16384", "--attention-backend", "torch_native", "--disable-cuda-graph"]
# The log gives seconds to the millisecond and GB/s to 0.01; the rate is the finer of the two (26.6 ms prints as
# 0.027 s, which alone would understate a 21 ms-scale transfer by 2-4 %).
FORK_LINE = re.compile(
    r"TP(\d+) R-Fork from \S+ via transfer_engine: ([\d.]+) MB in [\d.]+ s \(([\d.]+) GB/s\).*steps: (.*)"
)


def model_config(model_dir: Path):
    from sglang.srt.configs.model_config import ModelConfig

    return ModelConfig.from_path(str(model_dir), "bfloat16", device="cuda")


def rank_model(cfg, tp: int, rank: int) -> tuple[dict, dict]:
    """(tensors on the meta device, shard layouts) of one rank of a --tp-size tp instance."""
    from sglang.srt.distributed import parallel_state
    from sglang.srt.model_loader.loader import build_model_skeleton
    from sglang.srt.remote_instance.manifest import weight_tensors
    from sglang.srt.remote_instance.shard_layout import model_layouts

    saved = parallel_state._TP
    parallel_state._TP = parallel_state.TPGroup(rank=rank, size=tp, device=torch.device("meta"))
    try:
        model = build_model_skeleton(cfg, torch.device("meta"))
        return dict(weight_tensors(model)), model_layouts(model)
    finally:
        parallel_state._TP = saved


def seed_shards(cfg, seed_tp: int) -> tuple[dict, dict]:
    """{seed rank: {name: SeedShard}} as the seed would publish them (with placeholder digests: the timings do not
    look at which blocks compare equal) and per-rank sizes."""
    from sglang.srt.model_loader.transfer_engine_reshard import Block, SeedShard
    from sglang.srt.remote_instance.shard_layout import block_bounds

    seeds, sizes = {}, {}
    for r in range(seed_tp):
        tensors, layouts = rank_model(cfg, seed_tp, r)
        sizes[r] = {n: t.numel() * t.element_size() for n, t in tensors.items()}
        seeds[r] = {}
        for n, t in tensors.items():
            bounds = block_bounds(layouts[n], t.element_size())
            blocks = tuple(Block(lo, hi, "0" * 16) for lo, hi in zip(bounds, bounds[1:]) if hi > lo)
            seeds[r][n] = SeedShard(layouts[n], t.element_size(), blocks)
    return seeds, sizes


def client_plans(cfg, seeds: dict, scenario: tuple[int, int, int, int], rank: int) -> tuple[dict, dict, dict]:
    """(tensors on meta, layouts, {seed rank: RankPlan}) of one client rank, preferring seed ranks on its GPU."""
    from sglang.srt.model_loader.transfer_engine_reshard import plan_all

    seed_tp, seed_gpu, client_tp, client_gpu = scenario
    tensors, layouts = rank_model(cfg, client_tp, rank)
    dtypes = {r: {n: "bfloat16" for n in seeds[r]} for r in seeds}
    order = [(rank + k) % seed_tp for k in range(seed_tp)]
    local = [r for r in order if seed_gpu + r == client_gpu + rank]  # as the client prefers seed ranks on its GPU
    return tensors, layouts, plan_all(tensors, layouts, seeds, dtypes, local + [r for r in order if r not in local])


def plans_for(model_dir: Path, seed_tp: int, seed_gpu: int, client_tp: int, client_gpu: int) -> dict:
    """{client rank: {seed rank: [(tensor, lo, hi)]}} as the fork plans them, plus per-rank tensor sizes."""
    cfg = model_config(model_dir)
    seeds, seed_sizes = seed_shards(cfg, seed_tp)
    sizes = {("seed", r): s for r, s in seed_sizes.items()}
    out = {}
    for c in range(client_tp):
        tensors, _, plans = client_plans(cfg, seeds, (seed_tp, seed_gpu, client_tp, client_gpu), c)
        sizes[("client", c)] = {n: t.numel() * t.element_size() for n, t in tensors.items()}
        out[c] = {
            r: [(d.name, d.lo, d.hi) for d in p.direct] + [(s.name, s.lo, s.hi) for s in p.staged]
            for r, p in plans.items()
        }
    return {"plans": out, "sizes": sizes}


def _engine():
    from mooncake.engine import TransferEngine

    os.environ["MC_INTRANODE_NVLINK"] = "1"
    engine = TransferEngine()
    if engine.initialize("127.0.0.1", "P2PHANDSHAKE", "nvlink_intra", "") != 0:
        raise RuntimeError("Mooncake initialize failed for nvlink_intra")
    return engine


def _offsets(sizes: dict[str, int]) -> tuple[dict[str, int], int]:
    offsets, total = {}, 0
    for name, n in sizes.items():
        offsets[name] = total
        total += (n + 255) // 256 * 256
    return offsets, total


def where(gpu: int | None) -> tuple[str, str]:
    """(torch device, Mooncake protocol) of a bare process: NVLink between GPUs, TCP on the CPU (smoke runs)."""
    if gpu is None:
        return "cpu", "tcp"
    torch.cuda.set_device(gpu)
    return "cuda", "nvlink_intra"


def bare_seed(gpu: int | None, sizes: dict[str, int], info: mp.Queue, done: mp.Event) -> None:
    """A seed rank's bytes (tensors of these sizes back to back) in one registered allocation, until done."""
    from sglang.srt.remote_instance.mooncake_guard import GuardedEngine, memory_location

    device, protocol = where(gpu)
    offsets, total = _offsets(sizes)
    buffer = torch.full((total,), 7, dtype=torch.uint8, device=device)
    engine = GuardedEngine("127.0.0.1", protocol)
    engine.register([(buffer.data_ptr(), total)], memory_location(gpu))
    info.put((engine.session_id, buffer.data_ptr(), offsets))
    done.wait(900)


def run_bare(seed_gpus: list, seed_sizes: list[dict], client_target, clients: int, client_args) -> dict | None:
    """Start one bare_seed per seed rank, then `clients` processes running client_target(*client_args(rank,
    seeds, barrier, results)), meeting at a barrier; {client rank: what it put in results}, or None if one
    failed."""
    ctx = mp.get_context("spawn")
    done, results, info = ctx.Event(), ctx.Manager().dict(), ctx.Queue()
    seeds, procs = {}, []
    for r, (gpu, sizes) in enumerate(zip(seed_gpus, seed_sizes)):
        procs.append(ctx.Process(target=bare_seed, args=(gpu, sizes, info, done)))
        procs[-1].start()
        seeds[r] = info.get(timeout=300)
    barrier = ctx.Barrier(clients)
    workers = [ctx.Process(target=client_target, args=client_args(c, seeds, barrier, results)) for c in range(clients)]
    for p in workers:
        p.start()
    for p in workers:
        p.join(900)
    done.set()
    for p in procs:
        p.join(60)
    return dict(results) if len(results) == clients else None


def _raw_client(gpu: int, rank: int, sizes: dict, reads: dict, seeds: dict, barrier, results: dict) -> None:
    torch.cuda.set_device(gpu)
    offsets, total = _offsets(sizes)
    buffer = torch.zeros(total, dtype=torch.uint8, device="cuda")
    engine = _engine()
    engine.register_memory(buffer.data_ptr(), total, f"cuda:{gpu}")
    batches = {}
    for r, ranges in reads.items():
        session, base, remote = seeds[r]
        local, at = [], buffer.data_ptr()
        for _, lo, hi in ranges:  # destination: consecutive bytes of this rank's allocation (wraps if it must)
            if at + hi - lo > buffer.data_ptr() + total:
                at = buffer.data_ptr()
            local.append(at)
            at += hi - lo
        batches[r] = (session, local, [base + remote[n] + lo for n, lo, _ in ranges], [hi - lo for _, lo, hi in ranges])

    def read(r: int) -> None:
        session, local, remote, lengths = batches[r]
        torch.cuda.set_device(gpu)
        if engine.batch_transfer_sync_read(session, local, remote, lengths) != 0:
            raise RuntimeError(f"raw read from seed rank {r} failed")

    times = []
    for _ in range(PASSES):
        barrier.wait(300)
        torch.cuda.synchronize()
        start = time.perf_counter()
        threads = [threading.Thread(target=read, args=(r,)) for r in batches]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    results[rank] = {"passes_s": times, "bytes": sum(sum(b[3]) for b in batches.values())}


def raw_read(scenario: tuple[int, int, int, int], planned: dict) -> dict:
    """The same byte ranges as the fork's plans, read by bare processes on the same GPUs."""
    seed_tp, seed_gpu, client_tp, client_gpu = scenario
    sizes = [planned["sizes"][("seed", r)] for r in range(seed_tp)]

    def client_args(c, seeds, barrier, results):
        return (client_gpu + c, c, planned["sizes"][("client", c)], planned["plans"][c], seeds, barrier, results)

    results = run_bare([seed_gpu + r for r in range(seed_tp)], sizes, _raw_client, client_tp, client_args)
    if results is None:
        return {"error": "a raw client did not finish"}
    per_pass = [max(results[c]["passes_s"][i] for c in range(client_tp)) for i in range(PASSES)]
    nbytes = sum(results[c]["bytes"] for c in range(client_tp))
    return {
        "passes_s": [round(t, 4) for t in per_pass],
        "bytes": nbytes,
        "gbps": round(nbytes / min(per_pass[1:]) / 1e9, 1),
    }


def fork(name: str, scenario: tuple[int, int, int, int], model_dir: Path, logs: Path) -> dict:
    """Start the seed, fork one client into the other TP size, read each rank's bytes and transfer time."""
    seed_tp, seed_gpu, client_tp, client_gpu = scenario
    env = {**os.environ, "MOONCAKE_PROTOCOL": "nvlink_intra"}
    seed_port = free_port()
    seed_args = [
        *COMMON,
        "--load-format",
        "dummy",
        "--tp-size",
        str(seed_tp),
        "--base-gpu-id",
        str(seed_gpu),
        "--remote-instance-weight-loader-start-seed-via-transfer-engine",
        "--engine-info-bootstrap-port",
        str(free_port()),
    ]
    seed = launch(model_dir, seed_port, seed_args, logs / f"topology_seed_{name}.log", env=env)
    try:
        client_args = [
            *COMMON,
            "--tp-size",
            str(client_tp),
            "--base-gpu-id",
            str(client_gpu),
            *fork_client_args(seed_port, "transfer_engine", timeout=None),
        ]
        log = logs / f"topology_client_{name}.log"
        client = launch(model_dir, free_port(), client_args, log, env=env)
        client.terminate()
        client.wait(60)
    finally:
        seed.terminate()
        seed.wait(60)
    text = log.read_text(errors="replace")
    ranks = {}
    for rank, mb, gbps, steps in FORK_LINE.findall(text):
        seconds = float(mb) / 1e3 / max(float(gbps), 1e-9)
        ranks[int(rank)] = {"bytes": int(float(mb) * 1e6), "transfer_s": round(seconds, 5), "steps": steps}
    if len(ranks) < client_tp or "read from the TP" not in text:
        return {"error": "no fork lines in the client log", "log_tail": text[-3000:]}
    slowest = max(r["transfer_s"] for r in ranks.values())
    return {
        "ranks": ranks,
        "bytes": sum(r["bytes"] for r in ranks.values()),
        "gbps": round(sum(r["bytes"] for r in ranks.values()) / slowest / 1e9, 1),
        "transfer_s": slowest,
        "verified": [line for line in text.splitlines() if "per-block checksums" in line][-client_tp:],
        # With SGLANG_RFORK_RESHARD_TRACE=1 in the environment: where each rank's read step spent its time.
        "trace": [line.split("TP", 1)[-1] for line in text.splitlines() if "reshard trace" in line],
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-dir", default="/tmp/llama8b", help="made by benchmark/serving/make_llama3_8b_dummy.py")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    parser.add_argument("--result-name", default="rfork_topology_h200x2.json")
    args = parser.parse_args()
    model_dir = Path(args.model_dir)
    logs = log_dir()
    results = {}
    for name in args.scenarios.split(","):
        scenario = SCENARIOS[name]
        planned = plans_for(model_dir, *scenario)
        useful = sum(sum(planned["sizes"][("client", c)].values()) for c in range(scenario[2]))
        raw = raw_read(scenario, planned)
        forked = fork(name, scenario, model_dir, logs)
        entry = {
            "seed_tp": scenario[0],
            "client_tp": scenario[2],
            "useful_bytes": useful,
            "raw_nvlink_intra": raw,
            "fork": forked,
        }
        if "gbps" in raw and "gbps" in forked:
            entry["fork_vs_raw"] = round(forked["gbps"] / raw["gbps"], 3)
            entry["wire_bytes_per_useful_byte"] = round(forked["bytes"] / useful, 3)
            entry["fork_useful_gbps"] = round(useful / forked["transfer_s"] / 1e9, 1)
            # The client's own bytes at the fork's pace, against the raw link's rate: what the extra columns cost.
            entry["fork_useful_vs_raw"] = round(useful / forked["transfer_s"] / 1e9 / raw["gbps"], 3)
        results[name] = entry
        print(name, entry, flush=True)
    write_result(
        {
            **stamp(" ".join(["python benchmark/rfork/bench_topology.py", *sys.argv[1:]])),
            "model": "Llama-3-8B-shaped, bf16, dummy weights; servers torch_native without CUDA graphs",
            "scenarios": results,
        },
        args.result_name,
    )


if __name__ == "__main__":
    main()
