"""Cold start of a new replica: launch -> ready and launch -> first token, per way of getting the weights.

    python benchmark/rfork/bench_cold_start.py [--model-dir /tmp/llama8b] [--seed-gpu 0 --client-gpu 1]

One run on two GPUs: a seed serves the 8B-shaped checkpoint on --seed-gpu (started first, so on a fresh machine it
is the start that meets an empty FlashInfer JIT cache), then clients start one after the other on --client-gpu with
the servers' default settings (CUDA graphs, FlashInfer):
  disk             the checkpoint from disk, page cache dropped first (the baseline)
  transfer_engine  forked from the seed over Mooncake (nvlink_intra between the GPUs)
  nccl             forked from the seed over NCCL
  *_fresh_jit      the same with an empty FlashInfer JIT cache (FLASHINFER_WORKSPACE_BASE in a new directory):
                   what a brand-new node sees when its image ships no kernels
Each client's clock starts just before `Popen` of `python -m sglang.launch_server`; "ready" is the first 200 of
/health, "first token" the first 200 of a 1-token /generate. The per-phase timeline is the server's own
(/get_server_info startup_timeline). Ratios are against the disk client of the same run.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import drop_page_cache, ensure_checkpoint, log_dir, stamp, write_result  # noqa: E402

from sglang.srt.server_args import free_port  # noqa: E402
from sglang.test.rfork_utils import fork_client_args  # noqa: E402
from sglang.test.test_utils import config_only_copy  # noqa: E402

POLL_S = 0.02
ONE_TOKEN = {"text": "Hello", "sampling_params": {"max_new_tokens": 1, "temperature": 0}}


def start_timed(
    model_dir: Path, args: list[str], log: Path, env: dict[str, str], timeout: float
) -> tuple[subprocess.Popen, str, dict]:
    """Start a server; (process, its URL, launch -> /health 200 and -> first 1-token /generate with its start-up
    facts). The server keeps running; on failure it is stopped and the error raised."""
    port = free_port()
    cmd = [sys.executable, "-m", "sglang.launch_server", "--model-path", str(model_dir), "--port", str(port), *args]
    url = f"http://127.0.0.1:{port}"
    launched = time.time()
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)
    try:
        ready = _poll(proc, lambda: requests.get(f"{url}/health", timeout=5), launched + timeout, log)
        first = _poll(
            proc, lambda: requests.post(f"{url}/generate", json=ONE_TOKEN, timeout=600), launched + timeout, log
        )
        info = requests.get(f"{url}/get_server_info", timeout=30).json()
    except BaseException:
        stop(proc)
        raise
    result = {
        "launch_to_ready_s": round(ready - launched, 3),
        "launch_to_first_token_s": round(first - launched, 3),
        "weight_load_s": round(info["weight_load_seconds"], 3),
        "weight_gb": round(info["weight_bytes"] / 1e9, 2),
    }
    if info.get("fork_report"):
        rep = info["fork_report"]
        result["fork_steps_s"] = {k: round(v, 3) for k, v in rep["timings"].items()}
        result["fork_gbps"] = round(rep["gbps"], 1)
    timeline = info.get("startup_timeline") or {}
    result["server_launch_to_ready_s"] = timeline.get("launch_to_ready_s")
    result["timeline"] = [
        {k: p[k] for k in ("process", "name", "start_s", "seconds")} for p in timeline.get("phases", [])
    ]
    return proc, url, result


def timed_launch(model_dir: Path, args: list[str], log: Path, env: dict[str, str], timeout: float) -> dict:
    """start_timed, then stop the server; a failed start is reported under "error"."""
    try:
        proc, _, result = start_timed(model_dir, args, log, env, timeout)
    except (RuntimeError, TimeoutError) as e:
        return {"error": str(e)[-1500:]}
    stop(proc)
    return result


def stop(proc: subprocess.Popen) -> None:
    """Terminate a server, killing it if it has not exited within 30 s."""
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()


def _poll(proc: subprocess.Popen, call, deadline: float, log: Path) -> float:
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if call().status_code == 200:
                return time.time()
        except requests.RequestException:
            pass
        time.sleep(POLL_S)
    raise TimeoutError(log.read_text()[-3000:])


def client_args(kind: str, gpu: int, seed_port: int) -> list[str]:
    """The command line of one client kind (the server's defaults otherwise)."""
    base = ["--base-gpu-id", str(gpu)]
    if kind == "disk":
        return base
    fork = fork_client_args(seed_port, kind, timeout=None)
    if kind == "nccl":
        fork += ["--remote-instance-weight-loader-send-weights-group-ports", f"[{free_port()}]"]
    return base + fork


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-dir", default="/tmp/llama8b")
    parser.add_argument("--seed-gpu", type=int, default=0)
    parser.add_argument("--client-gpu", type=int, default=1)
    parser.add_argument("--clients", default="disk,transfer_engine,nccl,transfer_engine_fresh_jit")
    parser.add_argument("--repeat", type=int, default=1, help="launches per client kind (the best is reported)")
    parser.add_argument("--timeout", type=float, default=400)
    parser.add_argument("--seed-args", default="", help="extra seed flags, e.g. '--max-total-tokens 65536' on one GPU")
    parser.add_argument("--seed-dummy-weights", action="store_true", help="no checkpoint on disk (no disk client)")
    parser.add_argument("--protocol", default="nvlink_intra", help="Mooncake transport (tcp to try it on CPU)")
    parser.add_argument("--result-name", default="rfork_cold_start_h200x2.json")
    args = parser.parse_args()
    logs = log_dir()
    if args.seed_dummy_weights:
        model_dir = Path(args.model_dir)
        maker = Path(__file__).parents[1] / "serving" / "make_llama3_8b_dummy.py"
        subprocess.run([sys.executable, str(maker), str(model_dir)], check=True)
    else:
        model_dir = ensure_checkpoint(Path(args.model_dir))
    client_dir = Path(config_only_copy(model_dir, Path(tempfile.mkdtemp(prefix="cold_client_"))))
    env = {**os.environ, "MOONCAKE_PROTOCOL": args.protocol}
    seed_args = [
        "--base-gpu-id", str(args.seed_gpu), "--remote-instance-weight-loader-start-seed-via-transfer-engine",
        "--engine-info-bootstrap-port", str(free_port()),
        *(["--load-format", "dummy"] if args.seed_dummy_weights else []),
        *args.seed_args.split(),
    ]  # fmt: skip
    result: dict = {**stamp(" ".join(["python", *sys.argv])), "clients": {}}
    seed, seed_url, result["seed"] = start_timed(model_dir, seed_args, logs / "cold_seed.log", env, 900)
    result["seed"]["note"] = "first start on this machine: meets whatever FlashInfer JIT cache the machine has"
    seed_port = int(seed_url.rsplit(":", 1)[1])
    try:
        print("seed", {k: v for k, v in result["seed"].items() if k != "timeline"}, flush=True)
        for kind in args.clients.split(","):
            fresh = kind.endswith("_fresh_jit")
            backend = kind.removesuffix("_fresh_jit")
            runs = []
            for i in range(args.repeat):
                run_env = dict(env)
                if fresh:
                    run_env["FLASHINFER_WORKSPACE_BASE"] = tempfile.mkdtemp(prefix="empty_jit_")
                if backend == "disk":
                    runs.append({"page_cache_dropped": drop_page_cache()})
                else:
                    runs.append({})
                model = model_dir if backend == "disk" else client_dir
                log = logs / f"cold_{kind}_{i}.log"
                runs[-1].update(timed_launch(model, client_args(backend, args.client_gpu, seed_port), log, run_env,
                                             args.timeout))  # fmt: skip
                print(kind, i, {k: v for k, v in runs[-1].items() if k != "timeline"}, flush=True)
            ok = [r for r in runs if "error" not in r]
            best = min(ok, key=lambda r: r["launch_to_first_token_s"]) if ok else runs[-1]
            result["clients"][kind] = {
                **best,
                "runs_launch_to_first_token_s": [r.get("launch_to_first_token_s") for r in runs],
            }
    finally:
        stop(seed)
    disk = result["clients"].get("disk", {})
    ratios = {}
    for kind, r in result["clients"].items():
        if kind != "disk" and "weight_load_s" in r and "weight_load_s" in disk:
            ratios[f"{kind}_weights_ready_speedup_vs_cold_disk"] = round(disk["weight_load_s"] / r["weight_load_s"], 1)
        if "launch_to_first_token_s" in r and "launch_to_first_token_s" in disk:
            ratios[f"{kind}_first_token_speedup_vs_disk"] = round(
                disk["launch_to_first_token_s"] / r["launch_to_first_token_s"], 2
            )
    result["ratios"] = ratios
    write_result(result, args.result_name)


if __name__ == "__main__":
    main()
