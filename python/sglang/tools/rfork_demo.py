"""`python -m sglang.tools.rfork_demo`: start a seed, fork a client from it, compare them, clean up.

Runs the NCCL backend (gloo on CPU) and, when Mooncake is installed, the TransferEngine backend too.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from pathlib import Path

import requests

from sglang.test.test_utils import config_only_copy, find_free_port, kill_process_tree, popen_launch_server
from sglang.tools.make_tiny_model import ensure_tiny_model

QUESTION = "What is the capital of France?"


def _ask(url: str) -> str:
    body = {"text": QUESTION, "sampling_params": {"temperature": 0, "max_new_tokens": 24, "ignore_eos": True}}
    r = requests.post(f"{url}/generate", json=body, timeout=60)
    r.raise_for_status()
    return r.json()["text"]


def _checksums(url: str, tp_size: int) -> list[dict[str, str]]:
    return [
        requests.get(f"{url}/remote_instance_weight_manifest", params={"rank": r}, timeout=60).json()["checksums"]
        for r in range(tp_size)
    ]


def _fork_timings(log_path: str) -> str:
    lines = [line for line in Path(log_path).read_text().splitlines() if "R-Fork from" in line]
    return re.sub(r"^\[[^\]]*\]\s*", "", lines[-1]) if lines else "(no fork line in the client log)"


def _mooncake_available() -> bool:
    try:
        import mooncake.engine  # noqa: F401
    except ImportError:
        return False
    return True


def run_backend(backend: str, model_dir: Path, work: Path, tp_size: int) -> dict:
    """Seed → client over one backend; returns what the demo prints."""
    seed_args = ["--tp-size", str(tp_size)]
    if backend == "transfer_engine":
        seed_args += [
            "--remote-instance-weight-loader-start-seed-via-transfer-engine",
            "--engine-info-bootstrap-port",
            str(find_free_port()),
        ]
    started = time.perf_counter()
    seed = popen_launch_server(str(model_dir), other_args=seed_args)
    client = None
    try:
        seed_ready = time.perf_counter() - started
        client_dir = config_only_copy(model_dir, work / f"client-{backend}")
        port = seed.base_url.rsplit(":", 1)[1]
        client_args = [
            "--tp-size",
            str(tp_size),
            "--load-format",
            "remote_instance",
            "--remote-instance-weight-loader-backend",
            backend,
            "--remote-instance-weight-loader-seed-instance-ip",
            "127.0.0.1",
            "--remote-instance-weight-loader-seed-instance-service-port",
            port,
        ]
        if backend == "nccl":
            ports = [find_free_port() for _ in range(tp_size)]
            client_args += ["--remote-instance-weight-loader-send-weights-group-ports", json.dumps(ports)]
        started = time.perf_counter()
        client = popen_launch_server(str(client_dir), other_args=client_args)
        client_ready = time.perf_counter() - started
        seed_answer, client_answer = _ask(seed.base_url), _ask(client.base_url)
        return {
            "backend": backend,
            "weights_identical": _checksums(seed.base_url, tp_size) == _checksums(client.base_url, tp_size),
            "answers_identical": seed_answer == client_answer,
            "answer": client_answer,
            "seed_start_s": round(seed_ready, 2),
            "client_start_s": round(client_ready, 2),
            "fork": _fork_timings(client.log_path),
        }
    finally:
        for proc in (client, seed):
            if proc is not None:
                kill_process_tree(proc.pid)


def main(argv: list[str] | None = None) -> int:
    """Run the demo; exit code 0 only if every backend forked identical weights and answers."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", default=str(Path(tempfile.gettempdir()) / "sglang_rfork_demo_model"))
    parser.add_argument("--arch", default="llama", choices=["llama", "qwen2", "qwen3"])
    parser.add_argument("--tp-size", type=int, default=1)
    parser.add_argument("--backend", choices=["nccl", "transfer_engine", "all"], default="all")
    args = parser.parse_args(argv)
    model_dir = ensure_tiny_model(args.arch, args.model_dir)
    backends = ["nccl", "transfer_engine"] if args.backend == "all" else [args.backend]
    if "transfer_engine" in backends and not _mooncake_available():
        print(
            "Mooncake is not installed: skipping the transfer_engine backend "
            "(pip install mooncake-transfer-engine-non-cuda; apt-get install libibverbs1)."
        )
        backends.remove("transfer_engine")
    ok = True
    with tempfile.TemporaryDirectory(prefix="rfork_demo_") as work:
        for backend in backends:
            print(f"\n== R-Fork over {backend}: seed {model_dir} -> client without weights ==", flush=True)
            result = run_backend(backend, Path(model_dir), Path(work), args.tp_size)
            for key, value in result.items():
                print(f"  {key:18} {value}")
            ok &= result["weights_identical"] and result["answers_identical"]
    print("\n(The tiny model has random weights, so its answer is gibberish; what matters is that both agree.)")
    print("Every weight matched and the answers agree." if ok else "MISMATCH: see above.")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
