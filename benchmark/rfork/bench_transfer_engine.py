"""R-Fork over Mooncake on two GPUs: fork GB/s vs a raw Mooncake read of the same tensors, fork load time vs
disk, and the seed's decode speed while a client forks from it vs before.

    python benchmark/rfork/bench_transfer_engine.py [--model-dir /tmp/llama8b] [--seeds cuda_graph,eager,...]

Raw baseline: two bare processes, the same 195 tensors' bytes on the same GPUs (each side one registered
allocation), one `batch_transfer_sync_read` of all of them (Mooncake's own fastest call); first and best pass.
Fork: a seed server started with --remote-instance-weight-loader-start-seed-via-transfer-engine on --seed-gpu, a
client forked from it on --client-gpu with MOONCAKE_PROTOCOL set to each protocol. During each fork the seed streams
one long generation; its tokens/s across the client's transfer window (from the last token before it to the first
after it) is compared with the same stream's rate before the client started.

Seeds (SEEDS below): `cuda_graph` serves as a production seed does on CUDA (flashinfer, CUDA graphs); `eager` is
torch_native without graphs (about 1300 kernel launches per decode step). Our engines move 4 MiB per Mooncake TCP
slice (MC_TCP_SLICE_SIZE: how much GPU memory its TCP transport copies per cudaMemcpy); the `_mooncake_slice`
variants, and the raw read `tcp_mooncake_slice`, use Mooncake's own default of 64 KiB.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import requests
import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_nccl import param_shapes  # noqa: E402
from common import drop_page_cache, ensure_checkpoint, launch, log_dir, server_info, stamp, write_result  # noqa: E402

from sglang.srt.remote_instance.mooncake_guard import TCP_SLICE_BYTES  # noqa: E402
from sglang.srt.server_args import free_port  # noqa: E402
from sglang.test.rfork_utils import fork_client_args  # noqa: E402
from sglang.test.test_utils import config_only_copy  # noqa: E402

PASSES = {"nvlink_intra": 4, "tcp": 1}  # TCP moves ~1.4 GB/s: one pass of 16 GB is enough


def raw_engine(protocol: str):
    """A bare Mooncake TransferEngine for protocol, as Mooncake's own examples set one up."""
    from mooncake.engine import TransferEngine

    if protocol == "nvlink_intra":
        os.environ["MC_INTRANODE_NVLINK"] = "1"
    engine = TransferEngine()
    if engine.initialize("127.0.0.1", "P2PHANDSHAKE", protocol, "") != 0:
        raise RuntimeError(f"Mooncake initialize failed for {protocol}")
    return engine


def arena(shapes: list, fill: int) -> tuple[torch.Tensor, list[int], list[int]]:
    """One allocation holding every tensor's bytes (256-byte aligned): (arena, offsets, lengths)."""
    lengths = [int(torch.Size(s).numel()) * torch.empty((), dtype=d).element_size() for s, d in shapes]
    offsets, total = [], 0
    for n in lengths:
        offsets.append(total)
        total += (n + 255) // 256 * 256
    return torch.full((total,), fill, dtype=torch.uint8, device="cuda"), offsets, lengths


def _raw_seed(gpu: int, protocol: str, shapes: list, info: mp.Queue, done: mp.Event) -> None:
    torch.cuda.set_device(gpu)
    buffer, offsets, _ = arena(shapes, 7)
    engine = raw_engine(protocol)
    rc = engine.register_memory(buffer.data_ptr(), buffer.numel(), f"cuda:{gpu}")
    if rc != 0:
        raise RuntimeError(f"register_memory failed: {rc}")
    info.put((f"127.0.0.1:{engine.get_rpc_port()}", [buffer.data_ptr() + o for o in offsets]))
    done.wait(900)


def _raw_client(gpu: int, protocol: str, shapes: list, info: mp.Queue, results: dict) -> None:
    torch.cuda.set_device(gpu)
    buffer, offsets, lengths = arena(shapes, 0)
    engine = raw_engine(protocol)
    engine.register_memory(buffer.data_ptr(), buffer.numel(), f"cuda:{gpu}")
    session, remote = info.get(timeout=300)
    local = [buffer.data_ptr() + o for o in offsets]
    times = []
    for _ in range(PASSES[protocol]):
        torch.cuda.synchronize()
        start = time.perf_counter()
        rc = engine.batch_transfer_sync_read(session, local, remote, lengths)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        if rc != 0:
            raise RuntimeError(f"raw {protocol} read failed: {rc}")
    ok = all(bool((buffer[o : o + n] == 7).all()) for o, n in zip(offsets, lengths))
    results[protocol] = {"passes_s": [round(x, 3) for x in times], "data_ok": ok, "bytes": sum(lengths)}


def raw_read(protocol: str, seed_gpu: int, client_gpu: int, shapes: list, env: dict[str, str]) -> dict:
    """Mooncake's own best: one batch read of every tensor between two bare processes (env: for both of them)."""
    ctx = mp.get_context("spawn")
    info, done = ctx.Queue(), ctx.Event()
    results = ctx.Manager().dict()
    seed = ctx.Process(target=_raw_seed, args=(seed_gpu, protocol, shapes, info, done))
    client = ctx.Process(target=_raw_client, args=(client_gpu, protocol, shapes, info, results))
    saved = dict(os.environ)
    os.environ.update({"MC_TCP_SLICE_SIZE": str(TCP_SLICE_BYTES), **env})  # the spawned processes inherit it
    try:
        seed.start()
        client.start()
    finally:
        os.environ.clear()
        os.environ.update(saved)
    client.join(900)
    done.set()
    seed.join(60)
    if protocol not in results:
        return {"error": f"raw {protocol} read did not finish (client exit {client.exitcode})"}
    out = dict(results[protocol])
    best = min(out["passes_s"][1:] or out["passes_s"])
    out["gbps"] = round(out["bytes"] / best / 1e9, 1)
    return out


class TokenClock(threading.Thread):
    """Streams one long greedy generation from the seed and records (wall time, tokens so far) per event."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.events: list[tuple[float, int]] = []
        self.stop = threading.Event()
        self.error: str | None = None

    def run(self) -> None:
        try:
            self._stream()
        except Exception as e:  # reported in the result instead of vanishing with the thread
            self.error = repr(e)

    def _stream(self) -> None:
        """One generation after another (a fast seed finishes one before a slow fork ends), tokens counted on."""
        body = {
            "text": "Once upon a time",
            "sampling_params": {"max_new_tokens": 4000, "temperature": 0, "ignore_eos": True},
            "stream": True,
        }
        done = 0
        while not self.stop.is_set():
            last = 0
            with requests.post(f"http://127.0.0.1:{self.port}/generate", json=body, stream=True, timeout=600) as r:
                for line in r.iter_lines():
                    if self.stop.is_set():
                        return
                    if line.startswith(b"data: {"):
                        event = json.loads(line[6:])
                        if "meta_info" not in event:
                            self.error = str(event)[:300]
                            return
                        last = event["meta_info"]["completion_tokens"]
                        self.events.append((time.time(), done + last))
            done += last

    def rate_across(self, t0: float, t1: float) -> float | None:
        """Tokens per second from the last event at or before t0 to the first at or after t1: a window shorter
        than one decode step still shows any step it stretched."""
        before = [e for e in self.events if e[0] <= t0]
        after = [e for e in self.events if e[0] >= t1]
        if not (before and after):
            return None
        return (after[0][1] - before[-1][1]) / (after[0][0] - before[-1][0])

    def rate(self, t0: float, t1: float) -> float | None:
        """Tokens per second between two wall-clock times, from the events inside them."""
        inside = [e for e in self.events if t0 <= e[0] <= t1]
        if len(inside) < 2:
            return None
        return (inside[-1][1] - inside[0][1]) / (inside[-1][0] - inside[0][0])


@dataclass(frozen=True)
class SeedConfig:
    """How a seed serves while clients fork from it, and which protocols to fork it over."""

    args: list[str]
    protocols: tuple[str, ...]
    env: dict[str, str] = field(default_factory=dict)


_EAGER = ["--attention-backend", "torch_native", "--disable-cuda-graph"]
_MOONCAKE_SLICE = {"MC_TCP_SLICE_SIZE": "65536"}  # Mooncake's own default; ours is 4 MiB (mooncake_guard)
SEEDS = {
    "cuda_graph": SeedConfig([], ("nvlink_intra", "tcp")),
    "cuda_graph_mooncake_slice": SeedConfig([], ("tcp",), _MOONCAKE_SLICE),
    "eager": SeedConfig(_EAGER, ("tcp",)),
    "eager_mooncake_slice": SeedConfig(_EAGER, ("tcp",), _MOONCAKE_SLICE),
}
# Raw reads: each protocol with the slice size our engines use, TCP also with Mooncake's default.
RAW = {"nvlink_intra": ("nvlink_intra", {}), "tcp": ("tcp", {}), "tcp_mooncake_slice": ("tcp", _MOONCAKE_SLICE)}


def fork_during_stream(
    protocol: str, client_dir: Path, seed_port: int, common: list, gpu: int, logs: Path, env: dict[str, str]
) -> dict:
    """Fork one client while the seed streams; the seed's tokens/s before and during the transfer."""
    env = {**os.environ, **env, "MOONCAKE_PROTOCOL": protocol}
    # A short generation first, so the stream below measures a warmed-up seed.
    warm = {"text": "Hello", "sampling_params": {"max_new_tokens": 64, "temperature": 0, "ignore_eos": True}}
    requests.post(f"http://127.0.0.1:{seed_port}/generate", json=warm, timeout=120)
    clock = TokenClock(seed_port)
    clock.start()
    time.sleep(6)
    launched = time.time()
    args = [
        *common,
        "--base-gpu-id",
        str(gpu),
        *fork_client_args(seed_port, "transfer_engine", timeout=None),
    ]
    port = free_port()
    try:
        proc = launch(client_dir, port, args, logs / f"client_te_{protocol}_{gpu}_{seed_port}.log", env=env)
    except (RuntimeError, TimeoutError) as e:
        clock.stop.set()
        return {"error": str(e)[-800:]}
    try:
        info = server_info(port)
    finally:
        proc.terminate()
        proc.wait(30)
        clock.stop.set()
    rep = info["fork_report"]
    t0, t1 = rep["backend_window_unix_s"]
    first = clock.events[0][0] if clock.events else launched
    before, during = clock.rate(first + 1, launched), clock.rate_across(t0, t1)
    return {
        "transport": rep.get("transport"),
        "gbps": round(rep["gbps"], 1),
        "steps_s": {k: round(v, 3) for k, v in rep["timings"].items()},
        "weight_load_s": round(info["weight_load_seconds"], 2),
        "seed_decode_tok_s_before": None if before is None else round(before, 1),
        "seed_decode_tok_s_during_transfer": None if during is None else round(during, 1),
        "seed_decode_during_vs_before": None if not (before and during) else round(during / before, 3),
        "seed_stream_events_during_transfer": sum(1 for e in clock.events if t0 <= e[0] <= t1),
        "seed_stream_events": len(clock.events),
        "seed_stream_first_event_before_launch_s": round(launched - first, 2),
        "seed_stream_error": clock.error,
    }


def fork_from_seed(name: str, model_dir: Path, client_dir: Path, args: argparse.Namespace, logs: Path) -> dict:
    """Start one seed configuration and fork a client from it over each of its protocols."""
    config = SEEDS[name]
    # The clients only have to load: torch_native without graphs starts fastest and loads the same way.
    common = ["--max-total-tokens", "65536"]
    client_common = [*common, *_EAGER]
    seed_port = free_port()
    seed_args = [
        *common,
        *config.args,
        *(["--load-format", "dummy"] if args.seed_dummy_weights else []),
        "--base-gpu-id",
        str(args.seed_gpu),
        "--remote-instance-weight-loader-start-seed-via-transfer-engine",
        "--engine-info-bootstrap-port",
        str(free_port()),
    ]
    seed = launch(model_dir, seed_port, seed_args, logs / f"seed_te_{name}.log", env={**os.environ, **config.env})
    forks: dict = {"seed_args": " ".join(config.args) or "(CUDA defaults)", "seed_env": config.env}
    try:
        forks["seed_weight_load_s"] = round(server_info(seed_port)["weight_load_seconds"], 2)
        for p in (p for p in config.protocols if p in args.protocols):
            forks[p] = fork_during_stream(p, client_dir, seed_port, client_common, args.client_gpu, logs, config.env)
            print("fork", name, p, json.dumps(forks[p]), flush=True)
    finally:
        seed.terminate()
        seed.wait(30)
    return forks


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-dir", default="/tmp/llama8b")
    parser.add_argument("--seed-gpu", type=int, default=0)
    parser.add_argument("--client-gpu", type=int, default=1)
    parser.add_argument("--protocols", default="nvlink_intra,tcp")
    # The _mooncake_slice seeds are opt-in: with 64 KiB slices a busy seed makes a 16 GB TCP fork take ~2 minutes.
    parser.add_argument("--seeds", default="cuda_graph,eager", help=f"seed configurations to fork from: {list(SEEDS)}")
    parser.add_argument("--result-name", default="rfork_transfer_engine_h200x2.json")
    parser.add_argument("--seed-dummy-weights", action="store_true", help="seed with --load-format dummy")
    parser.add_argument("--skip-raw", action="store_true", help="no raw Mooncake baseline")
    parser.add_argument("--model-name", default="Llama-3-8B-shaped", help="what --model-dir holds, for the JSON")
    args = parser.parse_args()
    args.protocols = args.protocols.split(",")
    # Dummy seed weights skip the 16 GB checkpoint (and so the disk baseline): for a quick look at one seed setting.
    model_dir = Path(args.model_dir) if args.seed_dummy_weights else ensure_checkpoint(Path(args.model_dir))
    shapes = param_shapes(model_dir)
    raw = {}
    for name, (protocol, env) in RAW.items():
        if protocol in args.protocols and not args.skip_raw:
            raw[name] = {"env": env, **raw_read(protocol, args.seed_gpu, args.client_gpu, shapes, env)}
            print("raw", name, json.dumps(raw[name]), flush=True)  # partial results survive a cut-off run

    # The first seed's load is the disk baseline: it reads the checkpoint right after the page cache is dropped.
    cold = drop_page_cache()
    logs = log_dir()
    client_dir = Path(config_only_copy(model_dir, "/tmp/llama8b-client"))
    seeds = {name: fork_from_seed(name, model_dir, client_dir, args, logs) for name in args.seeds.split(",")}
    disk = None if args.seed_dummy_weights else next(iter(seeds.values())).get("seed_weight_load_s")
    for name, forks in seeds.items():
        for p in args.protocols:
            fork = forks.get(p)
            # Compared with the raw read that used the same slice size.
            base = raw.get(p + ("_mooncake_slice" if SEEDS[name].env == _MOONCAKE_SLICE else ""), {})
            if fork and "gbps" in fork and "gbps" in base:
                fork["fork_vs_raw"] = round(fork["gbps"] / base["gbps"], 3)
                if disk:
                    fork["fork_speedup_vs_disk"] = round(disk / fork["weight_load_s"], 2)
    write_result(
        {
            **stamp(" ".join(["python benchmark/rfork/bench_transfer_engine.py", *sys.argv[1:]])),
            "model": f"{args.model_name}, bf16, random weights; clients: torch_native, no CUDA graphs",
            "num_tensors": len(shapes),
            "disk_weight_load_s": disk,
            "disk_page_cache_dropped": cold,
            "raw_mooncake_read": raw,
            "seeds": seeds,
        },
        args.result_name,
    )


if __name__ == "__main__":
    main()
