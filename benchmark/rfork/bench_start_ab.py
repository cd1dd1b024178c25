"""A/B of a forked replica's start: this checkout's runtime against another git ref's, launches interleaved, one run.

    python benchmark/rfork/bench_start_ab.py --baseline-ref HEAD~1 [--model-dir /tmp/llama8b] [--repeat 3]
    python benchmark/rfork/bench_start_ab.py --baseline-src DIR   # DIR/python/sglang: a tree from elsewhere

A TransferEngine seed (dummy weights, this checkout's code) serves on --seed-gpu. Then forked clients start one after
the other on --client-gpu with the server defaults (CUDA graphs, FlashInfer), alternating between
  current   this checkout's python/sglang,
  baseline  python/sglang of --baseline-ref (extracted with `git archive`) or of --baseline-src, put first on the
            clients' PYTHONPATH,
so that drift of the machine over the run hits both alike. Each launch is timed as bench_cold_start.py times it
(launch -> /health 200, launch -> first 1-token /generate) and keeps the server's own phase timeline; the JSON gives
per variant every run, the median launch -> first token, and current/baseline. Only the runtime differs between the
two: the benchmark scripts, the installed packages and the seed are this checkout's.

On one GPU (the default: seed and clients on GPU 0) both KV pools are capped by --max-total-tokens.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_cold_start import client_args, start_timed, stop, timed_launch  # noqa: E402
from common import log_dir, stamp, write_result  # noqa: E402

from sglang.srt.server_args import free_port  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
# The phases that decide a fork's start (the rest are each well under 0.1 s).
KEY_PHASES = ("process start + imports", "weights (remote_instance)", "CUDA graphs", "resolve arguments",
              "tokenizer manager", "HTTP app", "wait for ranks")  # fmt: skip


def baseline_tree(ref: str) -> Path:
    """python/sglang of ref in a temp dir; the path to put on PYTHONPATH."""
    root = Path(tempfile.mkdtemp(prefix="start_ab_"))
    archive = subprocess.run(["git", "-C", str(REPO), "archive", ref, "python/sglang"], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(root)], input=archive.stdout, check=True)
    return root / "python"


def short_rev(ref: str) -> str:
    """ref as a short commit id, or '?' where there is no git repository."""
    done = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", ref], capture_output=True, text=True)
    return done.stdout.strip() or "?"


def summary(run: dict) -> dict:
    """One launch: its times and the key phases of its timeline."""
    if "error" in run:
        return run
    phases = {f"{p['process']}: {p['name']}": p["seconds"] for p in run["timeline"] if p["name"] in KEY_PHASES}
    return {k: run[k] for k in ("launch_to_ready_s", "launch_to_first_token_s", "fork_steps_s")} | {"phases": phases}


def main() -> None:
    parser = argparse.ArgumentParser()
    base = parser.add_mutually_exclusive_group(required=True)
    base.add_argument("--baseline-ref", help="git ref whose python/sglang is the baseline")
    base.add_argument("--baseline-src", help="a directory holding python/sglang (where the machine has no .git)")
    parser.add_argument("--model-dir", default="/tmp/llama8b", help="made by make_llama3_8b_dummy.py if missing")
    parser.add_argument("--repeat", type=int, default=3, help="launches per variant")
    parser.add_argument("--seed-gpu", type=int, default=0)
    parser.add_argument("--client-gpu", type=int, default=0)
    parser.add_argument("--max-total-tokens", type=int, default=65536, help="KV pool of the seed and of each client")
    parser.add_argument("--protocol", default="nvlink_intra", help="Mooncake transport")
    parser.add_argument("--result-name", default="rfork_start_ab_h200.json")
    args = parser.parse_args()

    model_dir = Path(args.model_dir)
    if not (model_dir / "config.json").exists():
        maker = REPO / "benchmark" / "serving" / "make_llama3_8b_dummy.py"
        subprocess.run([sys.executable, str(maker), str(model_dir)], check=True)
    if args.baseline_ref:
        tree, baseline = baseline_tree(args.baseline_ref), f"{args.baseline_ref} = {short_rev(args.baseline_ref)}"
    else:
        tree, baseline = Path(args.baseline_src).resolve() / "python", f"tree at {args.baseline_src}"
    if not (tree / "sglang" / "srt").is_dir():
        parser.error(f"{tree / 'sglang'} is not an sglang source tree")
    env = {**os.environ, "MOONCAKE_PROTOCOL": args.protocol}
    path = os.pathsep.join(filter(None, [str(tree), env.get("PYTHONPATH")]))
    variants = {"current": env, "baseline": {**env, "PYTHONPATH": path}}
    kv = ["--max-total-tokens", str(args.max_total_tokens)]
    seed_args = [
        "--base-gpu-id", str(args.seed_gpu), "--remote-instance-weight-loader-start-seed-via-transfer-engine",
        "--engine-info-bootstrap-port", str(free_port()), "--load-format", "dummy", *kv,
    ]  # fmt: skip
    logs = log_dir()
    seed, seed_url, seed_info = start_timed(model_dir, seed_args, logs / "start_ab_seed.log", env, 900)
    seed_port = int(seed_url.rsplit(":", 1)[1])
    runs: dict[str, list[dict]] = {name: [] for name in variants}
    try:
        for i in range(args.repeat):
            # Baseline first in even rounds, current first in odd ones: neither always meets a freshly freed GPU.
            order = list(variants) if i % 2 else list(reversed(variants))
            for name in order:
                flags = client_args("transfer_engine", args.client_gpu, seed_port) + kv
                run = timed_launch(model_dir, flags, logs / f"start_ab_{name}_{i}.log", variants[name], 300)
                runs[name].append(summary(run))
                print(name, i, {k: v for k, v in runs[name][-1].items() if k != "phases"}, flush=True)
    finally:
        stop(seed)
    result = {
        **stamp(" ".join(["python", *sys.argv])),
        "current": f"{short_rev('HEAD')} (working tree)",
        "baseline": baseline,
        "seed_launch_to_first_token_s": seed_info["launch_to_first_token_s"],
        "variants": {},
    }
    for name, rs in runs.items():
        ok = [r["launch_to_first_token_s"] for r in rs if "error" not in r]
        result["variants"][name] = {"median_first_token_s": statistics.median(ok) if ok else None, "runs": rs}
    medians = [result["variants"][n]["median_first_token_s"] for n in ("current", "baseline")]
    if all(medians):
        result["current_vs_baseline_first_token"] = round(medians[0] / medians[1], 3)
    write_result(result, args.result_name)


if __name__ == "__main__":
    main()
