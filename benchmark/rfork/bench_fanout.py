"""Fan-out R-Fork: N clients started together from one TransferEngine seed, against one client alone, in one run.

    python benchmark/rfork/bench_fanout.py [--model-dir /tmp/llama8b] [--tcp-layers 16] [--clients 3]

For each transport (nvlink_intra, then tcp) a seed with --load-format dummy weights starts on --seed-gpu; then, one
after the other, with every client on --client-gpu (small KV pools):
  one       one client alone (the baseline),
  n         --clients clients launched at the same instant, without peer assist (every byte from the seed),
  n_peers   the same with --remote-instance-weight-loader-peer-assist (clients also read from each other).
The clients of `n_peers` come last: a peer-assisted client stays listed in the seed's registry for 15 s after it is
killed, and readers drop such dead peers at their first read.

Per run: launch_to_all_ready_s (launch until the last client's weights are in and verified: the fork report's
transfer end plus its verify step) and transfer_window_s (the first client's transfer start until the last one's
weights are verified: the part fan-out changes, without process start-up), each also as a ratio to `one`, and per
client the bytes it read from the seed and from peers and its start-up phases (`startup`, the server's own
timeline: with ~0.04 s transfers over NVLink, start-up is what spreads the clients apart).

The TCP seed holds an 8B-shaped model cut to --tcp-layers layers (Mooncake TCP on GPU memory moves ~1.5 GB/s, so the
full 16 GB would take ~11 s per client and ~35 s for three without peer assist; 16 layers hold 9 GB); the JSON says
which model each part used. The whole run should take 4-5 minutes on 2xH200 (not measured yet). --cpu-smoke runs the
same flow on the CPU with a tiny model over TCP, to check the script itself; with --cpu-layers 4 --cpu-hidden 1024
(~190 MB) its seed_copies_sent says something about the peer-assist schedule too.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "serving"))
from common import launch, log_dir, server_info, stamp, write_result  # noqa: E402

from sglang.srt import startup_timeline  # noqa: E402
from sglang.srt.server_args import free_port  # noqa: E402
from sglang.test.rfork_utils import fork_client_args  # noqa: E402
from sglang.test.test_utils import kill_process_tree  # noqa: E402

GPU_CLIENT_ARGS = ["--max-total-tokens", "8192", "--attention-backend", "torch_native", "--disable-cuda-graph"]
CPU_CLIENT_ARGS = ["--max-total-tokens", "4096", "--device", "cpu"]


def model_dirs(args: argparse.Namespace) -> dict[str, Path]:
    """Config-only model directories (the seed uses dummy weights): the full model, and the cut one for TCP."""
    if args.cpu_smoke:
        from sglang.tools.make_tiny_model import make_tiny_model

        shape = {
            "num_layers": args.cpu_layers,
            "hidden_size": args.cpu_hidden,
            "intermediate_size": args.cpu_hidden * 2,
        }
        out = Path(f"/tmp/rfork_fanout_tiny_{args.cpu_layers}x{args.cpu_hidden}")
        tiny = out if (out / "config.json").exists() else Path(make_tiny_model("llama", out, **shape))
        return {"nvlink_intra": tiny, "tcp": tiny}
    from make_llama3_8b_dummy import write_model_dir

    full = Path(args.model_dir)
    if not (full / "config.json").exists():
        write_model_dir(full)
    cut = full.with_name(f"{full.name}-{args.tcp_layers}layers")
    if not (cut / "config.json").exists():
        shutil.copytree(full, cut, dirs_exist_ok=True)
        config = json.loads((full / "config.json").read_text())
        config["num_hidden_layers"] = args.tcp_layers
        (cut / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return {"nvlink_intra": full, "tcp": cut}


def client_args(seed_port: int, gpu: int, peer_assist: bool, cpu: bool) -> list[str]:
    """Flags of one TransferEngine client of the seed on seed_port."""
    return [
        *(CPU_CLIENT_ARGS if cpu else [*GPU_CLIENT_ARGS, "--base-gpu-id", str(gpu)]),
        *fork_client_args(seed_port, "transfer_engine", timeout=None),
        "--remote-instance-weight-loader-timeout", "300",
        *(["--remote-instance-weight-loader-peer-assist"] if peer_assist else []),
    ]  # fmt: skip


def fork_together(
    name: str, model: Path, seed_port: int, count: int, peer_assist: bool, protocol: str, args: argparse.Namespace
) -> dict:
    """Launch count clients at one instant; when each had its weights, and from where."""
    env = {**os.environ, "MOONCAKE_PROTOCOL": protocol, "MC_LOG_LEVEL": "WARNING"}
    flags = client_args(seed_port, args.client_gpu, peer_assist, args.cpu_smoke)
    ports = [free_port() for _ in range(count)]
    logs = [log_dir() / f"fanout_{protocol}_{name}_{i}.log" for i in range(count)]
    launched = time.time()
    with ThreadPoolExecutor(count) as pool:
        futures = [pool.submit(launch, model, p, flags, log, 300, env) for p, log in zip(ports, logs)]
        procs, errors = [], []
        for f in futures:
            try:
                procs.append(f.result())
            except (RuntimeError, TimeoutError) as e:
                errors.append(str(e)[-800:])
    try:
        if errors:
            return {"error": errors}
        infos = [server_info(p) for p in ports]
    finally:
        for proc in procs:
            kill_process_tree(proc.pid)
    clients = []
    for info in infos:
        rep = info["fork_report"]
        t0, t1 = rep["backend_window_unix_s"]
        peers = rep.get("peer_assist") or {}
        clients.append(
            {
                "transport": rep.get("transport"),
                "transfer_start_unix": t0,
                "ready_unix": t1 + rep["timings"].get("verify", 0.0),
                "transfer_s": round(rep["transfer_s"], 3),
                "gbps": round(rep["gbps"], 2),
                "bytes": rep["bytes"],
                "seed_bytes": peers.get("seed_bytes", rep["bytes"]),
                "peer_bytes": peers.get("peer_bytes", 0),
                "dropped_sources": peers.get("dropped_sources", {}),
                # Tensors asked of the seed although a forking peer had claimed them (its claim timed out).
                "seed_reads_after_claim_wait": peers.get("seed_reads_after_claim_wait", 0),
                "startup": startup_timeline.summary_line(info["startup_timeline"]),
            }
        )
    ready = max(c["ready_unix"] for c in clients)
    return {
        "clients": count,
        "peer_assist": peer_assist,
        "launch_to_all_ready_s": round(ready - launched, 3),
        "transfer_window_s": round(ready - min(c["transfer_start_unix"] for c in clients), 3),
        "seed_bytes_total": sum(c["seed_bytes"] for c in clients),
        "peer_bytes_total": sum(c["peer_bytes"] for c in clients),
        "per_client": [
            {k: v for k, v in c.items() if k not in ("transfer_start_unix", "ready_unix")}
            | {
                "start_after_launch_s": round(c["transfer_start_unix"] - launched, 3),
                "ready_after_launch_s": round(c["ready_unix"] - launched, 3),
            }
            for c in clients
        ],
    }


def run_transport(protocol: str, model: Path, args: argparse.Namespace) -> dict:
    """One seed serving protocol; the one-client baseline, then the fan-outs."""
    seed_port = free_port()
    seed_args = [
        "--load-format", "dummy",
        "--remote-instance-weight-loader-start-seed-via-transfer-engine",
        "--engine-info-bootstrap-port", str(free_port()),
        # The seed serves no requests here: it starts fastest without CUDA graphs, as the clients do.
        *(CPU_CLIENT_ARGS if args.cpu_smoke else [*GPU_CLIENT_ARGS, "--base-gpu-id", str(args.seed_gpu)]),
    ]  # fmt: skip
    env = {**os.environ, "MC_LOG_LEVEL": "WARNING"}
    seed = launch(model, seed_port, seed_args, log_dir() / f"fanout_seed_{protocol}.log", timeout=300, env=env)
    out: dict = {"model_dir": str(model), "weight_bytes": server_info(seed_port).get("weight_bytes")}
    try:
        runs = {
            "one": (1, False),
            "n": (args.clients, False),
            "n_peers": (args.clients, True),
        }
        for name, (count, peer_assist) in runs.items():
            out[name] = fork_together(name, model, seed_port, count, peer_assist, protocol, args)
            print(protocol, name, json.dumps(out[name]), flush=True)  # partial results survive a cut-off run
    finally:
        kill_process_tree(seed.pid)
    one = out["one"]
    for name in ("n", "n_peers"):
        run = out[name]
        if "error" in run or "error" in one:
            continue
        for key in ("launch_to_all_ready_s", "transfer_window_s"):
            run[f"{key.removesuffix('_s')}_vs_one"] = round(run[key] / max(one[key], 1e-9), 3)
        if out["weight_bytes"]:
            # How many copies of the weights left the seed: n without peer assist, ideally 1 with it.
            run["seed_copies_sent"] = round(run["seed_bytes_total"] / out["weight_bytes"], 2)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-dir", default="/tmp/llama8b", help="made with make_llama3_8b_dummy.py if missing")
    parser.add_argument("--tcp-layers", type=int, default=16, help="layers of the model the TCP part forks")
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--seed-gpu", type=int, default=0)
    parser.add_argument("--client-gpu", type=int, default=1)
    parser.add_argument("--protocols", default="nvlink_intra,tcp")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny model on the CPU over TCP: checks the script")
    # ~190 MB of float32 weights with 4 layers of hidden 1024: big enough for seed_copies_sent to mean something.
    parser.add_argument("--cpu-layers", type=int, default=2, help="--cpu-smoke: layers of the model")
    parser.add_argument("--cpu-hidden", type=int, default=64, help="--cpu-smoke: hidden size (MLP: twice that)")
    parser.add_argument("--result-name", default="rfork_fanout_h200x2.json")
    args = parser.parse_args()
    protocols = ["tcp"] if args.cpu_smoke else args.protocols.split(",")
    dirs = model_dirs(args)
    results: dict = {}
    for protocol in protocols:
        results[protocol] = run_transport(protocol, dirs[protocol], args)
        # Written after each transport, so that a run cut off in the second keeps the first.
        write_result(
            {
                **stamp(" ".join(["python benchmark/rfork/bench_fanout.py", *sys.argv[1:]])),
                "model": f"tiny llama, {args.cpu_layers} layers of hidden {args.cpu_hidden} (CPU smoke run)"
                if args.cpu_smoke
                else f"Llama-3-8B-shaped, bf16, dummy weights; TCP part cut to {args.tcp_layers} of 32 layers",
                "seed_gpu": None if args.cpu_smoke else args.seed_gpu,
                "client_gpu": None if args.cpu_smoke else args.client_gpu,
                "targets": {
                    "tcp n_peers transfer_window_vs_one": "<= 1.5 (n without peer assist: ~n)",
                    "nvlink_intra n launch_to_all_ready_vs_one": "<= 1.3",
                },
                "transports": results,
            },
            args.result_name,
        )


if __name__ == "__main__":
    main()
