"""Where a topology-changing fork's transfer time goes, without servers: the read step alone, in bare processes.

    python benchmark/rfork/profile_reshard.py [--model-dir /tmp/llama8b] [--scenarios tp1_to_tp2,tp2_to_tp1]
        [--variants raw,fork,fork_verified] [--reference PATH_TO_OLD_transfer_engine_reshard.py] [--cpu]

(--reference: an older module that held read_rank, e.g. `git show bf0cc89:python/sglang/srt/model_loader/
transfer_engine_reshard.py > /tmp/reshard_before.py`.)

Seed ranks are bare processes holding an 8B-shaped rank's bytes in one registered allocation (as in
bench_topology.py); each client rank is a process with its real tensors that runs the fork's own plan,
`prepare_rank` untimed and `RankRead.run` timed over Mooncake nvlink_intra, one thread per seed rank, as the
server's "engine setup" and "transfer" steps do. Variants, each timed for PASSES passes (the first is warm-up),
all client ranks at once:
  raw              the plan's byte ranges, one blocking batch per seed rank, into a flat buffer (the link's rate);
  fork             the read step with its checks of the staged blocks, as a client's "transfer" step runs it
                   (torch block sums, the read step's kernels loaded first: warm_kernels);
  fork_verified    fork plus the client's "verify" step (the in-place blocks summed, digests compared);
  fork_noverify    without any checks;
  fork_fused       fork_verified with the fused Triton block sums (what a client that loaded them would do);
  direct_only      only the in-place reads of the plan, unchecked; staged_only: only the staged (scratch) ones;
  reference        read_rank of an older transfer_engine_reshard.py (--reference; with torch block sums, as it
                   had), and reference_verified, for an A/B in one run.
Per variant: the slowest rank's best time, GB/s over all ranks' bytes, and per rank and seed rank the host
time spent in each step of read_rank (direct read, staged read, sums, scatter, wait scratch).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import sys
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_topology import SCENARIOS, client_plans, model_config, run_bare, seed_shards, where  # noqa: E402
from common import stamp, write_result  # noqa: E402

PASSES = 4
VARIANTS = ("raw", "fork", "fork_verified", "fork_noverify", "fork_fused")


@contextlib.contextmanager
def _torch_sums():
    """Block sums through torch while inside, as in a server that never compiled the fused kernel."""
    from sglang.srt.remote_instance import block_checksum_gpu

    saved = set(block_checksum_gpu._ready)
    block_checksum_gpu._ready.clear()
    try:
        yield
    finally:
        block_checksum_gpu._ready.update(saved)


def _reference(path: str):
    """An older transfer_engine_reshard.py (one that still held read_rank), summing blocks with torch as then."""
    from sglang.srt.remote_instance.block_checksum import _torch_range_sums

    spec = importlib.util.spec_from_file_location("reference_reshard", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    module.range_sums = _torch_range_sums
    return module


def _compile_ms(device: str) -> float | None:
    """How long compiling and loading the fused block-sum kernel takes in this process (with an empty
    TRITON_CACHE_DIR, what a fresh node pays once, in the background)."""
    from sglang.srt.remote_instance import block_checksum_gpu

    if device != "cuda":
        return None
    start = time.perf_counter()
    thread = block_checksum_gpu.warm_up(torch.device("cuda", torch.cuda.current_device()))
    thread.join()
    return round((time.perf_counter() - start) * 1e3, 1)


def _sums_bench(plans: dict, tensors: dict, device: str) -> dict:
    """Host and device time of summing every block of the plans in place (as the verify step does): range_sums
    (the fused kernel if this process loaded it, for fork_fused; else torch, as a client) and torch's alone."""
    from sglang.srt.remote_instance.block_checksum import _torch_range_sums, range_sums

    raw = {n: t.reshape(-1).view(torch.uint8) for n, t in tensors.items()}
    ranges = [
        (raw[d.name], d.local + b.lo - d.lo, d.local + b.hi - d.lo)
        for p in plans.values()
        for d in p.direct
        for b in d.blocks
    ]
    out = {"blocks": len(ranges), "gb": round(sum(hi - lo for _, lo, hi in ranges) / 1e9, 2)}
    for name, fn in (("range_sums", range_sums), ("torch", _torch_range_sums)):  # range_sums: fused if loaded
        best = None
        for _ in range(3):
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            sums = fn(ranges)
            host = time.perf_counter() - start
            if device == "cuda":
                torch.cuda.synchronize()
            total = time.perf_counter() - start
            best = min(best or (9e9, 0), (total, host))
        out[name] = {"total_ms": round(best[0] * 1e3, 2), "host_ms": round(best[1] * 1e3, 2)}
        del sums
    return out


def _client(gpu, rank, scenario, model_dir, seeds_at, variants, reference, barrier, results) -> None:
    from sglang.srt.model_loader import transfer_engine_reshard_read as current
    from sglang.srt.model_loader.transfer_engine_client import READ_PLANS
    from sglang.srt.model_loader.transfer_engine_reshard import RankPlan, bad_blocks
    from sglang.srt.remote_instance.block_checksum import digests
    from sglang.srt.remote_instance.mooncake_guard import GuardedEngine, ReadEntry, ReadPlan

    device, protocol = where(gpu)
    compile_ms = _compile_ms(device) if "fork_fused" in variants else None
    if device == "cuda":
        from sglang.srt.model_loader.transfer_engine_reshard_read import warm_kernels

        warm_kernels(torch.device("cuda", gpu)).join()  # as a client does before its reads
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    cfg = model_config(model_dir)
    seeds, _ = seed_shards(cfg, scenario[0])
    meta, _, plans = client_plans(cfg, seeds, scenario, rank)
    tensors = {n: torch.zeros(t.shape, dtype=t.dtype, device=device) for n, t in meta.items()}
    engines = {r: GuardedEngine("127.0.0.1", protocol) for r in plans}
    ptrs = {r: {n: seeds_at[r][1] + seeds_at[r][2][n] for n in tensors} for r in plans}
    plan = READ_PLANS[protocol]
    deadline = time.monotonic() + 600

    def reader(r):
        def read(entries, owner):
            return engines[r].read(seeds_at[r][0], entries, deadline, plan, owner=owner, cuda_device=gpu)

        return read

    probe = torch.empty(len(tensors) * 256, dtype=torch.uint8, device=device)  # map the seed's memory first
    for r in plans:
        touches = [ReadEntry(n, probe.data_ptr() + i * 256, ptrs[r][n], 256) for i, n in enumerate(tensors)]
        reader(r)(touches, probe)
    flat = {r: torch.zeros(p.nbytes, dtype=torch.uint8, device=device) for r, p in plans.items()}  # raw's

    def run_raw(traces):
        entries = {}
        for r in plans:
            at = flat[r].data_ptr()
            entries[r] = []
            for d in [*plans[r].direct, *plans[r].staged]:
                entries[r].append(ReadEntry(d.name, at, ptrs[r][d.name] + d.lo, d.hi - d.lo))
                at += d.hi - d.lo

        def one(r):
            start = time.perf_counter()
            batch = ReadPlan(len(entries[r]), batched=plan.batched)
            moved = engines[r].read(seeds_at[r][0], entries[r], deadline, batch, owner=flat, cuda_device=gpu)
            traces[r].append(("raw read", start, time.perf_counter()))
            return moved

        def timed():
            with ThreadPoolExecutor(len(plans)) as pool:
                return sum(pool.map(one, plans))

        return timed

    def run_fork(module, verify, pick, traces, full_check=False, torch_sums=True):
        """Prepared untimed (as in the server's "engine setup"), run timed (its "transfer")."""
        if module is current:
            with _torch_sums() if torch_sums else contextlib.nullcontext():
                jobs = {
                    r: current.prepare_rank(
                        pick(plans[r]),
                        seeds[r],
                        ptrs[r],
                        tensors,
                        reader(r),
                        verify,
                        trace=traces[r],
                        seed_ranks=len(plans),
                    )
                    for r in plans
                }

        def one(r):
            if gpu is not None:
                torch.cuda.set_device(gpu)
            if module is current:
                return jobs[r].run()
            return module.read_rank(pick(plans[r]), seeds[r], ptrs[r], tensors, reader(r), verify)

        def timed():
            with _torch_sums() if torch_sums or module is not current else contextlib.nullcontext():
                with ThreadPoolExecutor(len(plans)) as pool:
                    results = list(pool.map(one, plans))
                if full_check:  # the verify step: in-place sums of all seed ranks, digests on the host
                    start = time.perf_counter()
                    if module is current:
                        bad_blocks(current.all_checks(results))
                    else:
                        digests([sums for result in results for sums, _, _ in result.checks()])
                    traces["all seed ranks"].append(("verify step", start, time.perf_counter()))
            return sum(result.moved for result in results)

        return timed

    runs = {
        "raw": run_raw,
        "fork": lambda t: run_fork(current, True, lambda p: p, t),
        "fork_verified": lambda t: run_fork(current, True, lambda p: p, t, full_check=True),
        "fork_noverify": lambda t: run_fork(current, False, lambda p: p, t),
        "fork_fused": lambda t: run_fork(current, True, lambda p: p, t, full_check=True, torch_sums=False),
        "direct_only": lambda t: run_fork(current, False, lambda p: RankPlan(direct=p.direct), t),
        "staged_only": lambda t: run_fork(current, False, lambda p: RankPlan(staged=p.staged), t),
    }
    if reference:
        old = _reference(reference)
        runs["reference"] = lambda t: run_fork(old, True, lambda p: p, t)
        runs["reference_verified"] = lambda t: run_fork(old, True, lambda p: p, t, full_check=True)
    out = {}
    for name in variants:
        times, moved, kept = [], 0, None
        for _ in range(PASSES):
            traces = defaultdict(list)
            timed = runs[name](traces)
            barrier.wait(300)
            sync()
            start = time.perf_counter()
            moved = timed()
            sync()
            times.append(time.perf_counter() - start)
            if len(times) > 1 and times[-1] == min(times[1:]):
                kept = (start, traces)
        start, traces = kept
        steps = {}
        for r, spans in traces.items():
            total = defaultdict(float)
            for step, a, b in spans:
                total[step] += b - a
            first = min((a for _, a, _ in spans), default=start)
            last = max((b for _, _, b in spans), default=start)
            steps[f"seed rank {r}"] = {
                **{k: round(v * 1e3, 2) for k, v in total.items()},
                "host span ms": round((last - first) * 1e3, 2),
                "calls": len(spans),
            }
        out[name] = {"passes_ms": [round(t * 1e3, 2) for t in times], "bytes": moved, "steps_ms": steps}
    out["kernel_compile_ms"] = compile_ms
    out["block_sums"] = _sums_bench(plans, tensors, device)
    results[rank] = out


def profile(
    scenario: tuple[int, int, int, int], model_dir: Path, variants: list[str], reference: str | None, cpu: bool
) -> dict:
    seed_tp, seed_gpu, client_tp, client_gpu = scenario
    cfg = model_config(model_dir)
    _, sizes = seed_shards(cfg, seed_tp)

    def client_args(c, seeds_at, barrier, results):
        gpu = None if cpu else client_gpu + c
        return (gpu, c, scenario, model_dir, seeds_at, variants, reference, barrier, results)

    seed_gpus = [None if cpu else seed_gpu + r for r in range(seed_tp)]
    results = run_bare(seed_gpus, [sizes[r] for r in range(seed_tp)], _client, client_tp, client_args)
    if results is None:
        return {"error": "a client rank did not finish"}
    out = {}
    out["kernel_compile_ms"] = {c: results[c]["kernel_compile_ms"] for c in range(client_tp)}
    out["block_sums"] = {c: results[c]["block_sums"] for c in range(client_tp)}
    for name in variants:
        per_pass = [max(results[c][name]["passes_ms"][i] for c in range(client_tp)) for i in range(PASSES)]
        nbytes = sum(results[c][name]["bytes"] for c in range(client_tp))
        best = min(per_pass[1:])
        out[name] = {
            "best_ms": best,
            "gbps": round(nbytes / best / 1e6, 1),
            "passes_ms": per_pass,
            "ranks": {c: results[c][name] for c in range(client_tp)},
        }
    if "raw" in out:
        for name in variants:
            out[name]["vs_raw"] = round(out[name]["gbps"] / out["raw"]["gbps"], 3)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-dir", help="default: /tmp/llama8b, or with --cpu a tiny Llama made in a temp dir")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--reference", help="another transfer_engine_reshard.py to time as variant 'reference'")
    parser.add_argument("--cpu", action="store_true", help="smoke run over Mooncake TCP on CPU (tiny models)")
    parser.add_argument("--result-name", default="profile_reshard_h200x2.json")
    args = parser.parse_args()
    variants = args.variants.split(",") + (["reference", "reference_verified"] if args.reference else [])
    model_dir = Path(args.model_dir or ("" if args.cpu else "/tmp/llama8b"))
    if args.cpu and not args.model_dir:
        # Bare seeds hold every byte of their ranks: an 8B-shaped model would take 16 GB of host memory.
        import tempfile

        from sglang.tools.make_tiny_model import make_tiny_model

        model_dir = make_tiny_model(
            "llama", Path(tempfile.mkdtemp(prefix="profile-reshard-")), num_heads=4, num_kv_heads=2
        )
    results = {}
    for name in args.scenarios.split(","):
        results[name] = profile(SCENARIOS[name], model_dir, variants, args.reference, args.cpu)
        summary = {v: (r.get("best_ms"), r.get("vs_raw")) for v, r in results[name].items() if isinstance(r, dict)}
        print(name, summary, flush=True)
    write_result(
        {**stamp(" ".join(["python benchmark/rfork/profile_reshard.py", *sys.argv[1:]])), **results}, args.result_name
    )


if __name__ == "__main__":
    main()
