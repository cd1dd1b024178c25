"""Where does a fork's Mooncake read lose time against the raw read? Each variant runs in two fresh processes.

    python benchmark/rfork/mooncake_probe.py [--variants arena_sync,tensors_window,...]

The seed side holds the 195 Llama-3-8B-shaped tensors either in one allocation (`arena_*`) or one allocation per
tensor, registered per tensor, as a serving process holds them (`tensors_*`). The client reads them with one
`batch_transfer_sync_read` of every tensor (`*_sync`), or with our GuardedEngine's windowed reads (`*_window`) or
its batched reads (`*_batch`).
Prints one JSON line per variant with the seconds of each pass.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "python"))
from bench_transfer_engine import arena, raw_engine  # noqa: E402
from nccl_probe import llama3_8b_tensor_shapes  # noqa: E402

PASSES = 3


def _buffers(layout: str, fill: int) -> tuple[list[int], list[int], list[torch.Tensor]]:
    shapes = [(s, torch.bfloat16) for s in llama3_8b_tensor_shapes()]
    if layout == "arena":
        buffer, offsets, lengths = arena(shapes, fill)
        return [buffer.data_ptr() + o for o in offsets], lengths, [buffer]
    lengths = [int(torch.Size(s).numel()) * 2 for s, _ in shapes]
    tensors = [torch.full((n,), fill, dtype=torch.uint8, device="cuda") for n in lengths]
    return [t.data_ptr() for t in tensors], lengths, tensors


def guarded_engine(protocol: str):
    from sglang.srt.remote_instance.mooncake_guard import GuardedEngine

    return GuardedEngine("127.0.0.1", protocol)


def seed(gpu: int, layout: str, protocol: str, info, done) -> None:
    torch.cuda.set_device(gpu)
    addrs, lengths, keep = _buffers(layout, 7)
    engine = guarded_engine(protocol)
    if layout == "arena":
        engine.register([(keep[0].data_ptr(), keep[0].numel())], f"cuda:{gpu}")
    else:  # as a seed registers them: the whole caching-allocator segments that hold weights
        from sglang.srt.remote_instance.transfer_engine_memory import merged_regions, segment_regions

        named = [(str(i), t) for i, t in enumerate(keep)]
        regions = segment_regions if protocol == "nvlink_intra" else merged_regions
        engine.register(regions(named, torch.device("cuda", gpu)), f"cuda:{gpu}")
    info.put((engine.session_id, addrs))
    done.wait(600)


def client(gpu: int, layout: str, read: str, protocol: str, info, out) -> None:
    from sglang.srt.remote_instance.mooncake_guard import ReadEntry, ReadPlan

    torch.cuda.set_device(gpu)
    addrs, lengths, keep = _buffers(layout, 0)
    engine = raw_engine(protocol) if read == "sync" else guarded_engine(protocol)
    session, remote = info.get(timeout=120)
    times = []
    for _ in range(PASSES if protocol == "nvlink_intra" else 1):
        torch.cuda.synchronize()
        start = time.perf_counter()
        if read == "sync":
            rc = engine.batch_transfer_sync_read(session, addrs, remote, lengths)
            assert rc == 0, rc
        else:
            entries = [ReadEntry(str(i), a, r, n) for i, (a, r, n) in enumerate(zip(addrs, remote, lengths))]
            window = int(os.environ.get("WINDOW", "64"))
            plan = ReadPlan(window, batched=read == "batch")
            engine.read(session, entries, time.monotonic() + 120, plan, owner=keep, cuda_device=gpu)
        torch.cuda.synchronize()
        times.append(round(time.perf_counter() - start, 4))
    ok = all(bool((t == 7).all()) for t in keep)
    out.put({"passes_s": times, "data_ok": ok, "gbps_best": round(sum(lengths) / min(times) / 1e9, 1)})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--variants", default="arena_sync,tensors_sync,tensors_window,tensors_batch,arena_window")
    parser.add_argument("--protocol", default="nvlink_intra")
    args = parser.parse_args()
    ctx = mp.get_context("spawn")
    for variant in args.variants.split(","):
        layout, read = variant.split("_")
        info, done, out = ctx.Queue(), ctx.Event(), ctx.Queue()
        s = ctx.Process(target=seed, args=(0, layout, args.protocol, info, done))
        c = ctx.Process(target=client, args=(1, layout, read, args.protocol, info, out))
        s.start()
        c.start()
        try:
            record = out.get(timeout=300)
        except Exception as e:  # a failed variant must not hide the others
            record = {"error": repr(e), "client_exit": c.exitcode}
        done.set()
        c.join(30)
        s.join(30)
        print(json.dumps({"variant": variant, "protocol": args.protocol, **record}), flush=True)


if __name__ == "__main__":
    main()
