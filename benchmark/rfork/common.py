"""Shared pieces of the R-Fork benchmarks: an 8B-shaped checkpoint on disk, server launches, machine facts."""

from __future__ import annotations

import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import requests
import torch

from sglang.test.test_utils import LLAMA3_8B_SHAPE


def ensure_checkpoint(out: Path, shape: dict | None = None, device: str = "cuda") -> Path:
    """An HF Llama checkpoint of the given shape with random bf16 weights (tokenizer from the tiny model)."""
    from safetensors.torch import save_file

    from sglang.tools.make_tiny_model import make_tiny_model

    if (out / "config.json").exists():
        return out
    shape = shape or LLAMA3_8B_SHAPE
    tiny = make_tiny_model("llama", out.with_name(out.name + "-tiny"))
    out.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(tiny / name, out / name)
    config = json.loads((tiny / "config.json").read_text())
    config.update(shape)
    h, inter, v = shape["hidden_size"], shape["intermediate_size"], shape["vocab_size"]
    kv = shape["num_key_value_heads"] * shape["head_dim"]
    gen = torch.Generator(device=device).manual_seed(0)

    def rand(*dims: int) -> torch.Tensor:
        return (torch.randn(*dims, generator=gen, device=device, dtype=torch.float32) * 0.02).to(torch.bfloat16)

    weight_map, shard, files = {}, {}, []

    def flush() -> None:
        if shard:
            name = f"model-{len(files) + 1:05d}.safetensors"
            save_file({k: t.cpu() for k, t in shard.items()}, str(out / name), metadata={"format": "pt"})
            weight_map.update({k: name for k in shard})
            files.append(name)
            shard.clear()

    shard["model.embed_tokens.weight"] = rand(v, h)
    for i in range(shape["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shard.update(
            {
                p + "self_attn.q_proj.weight": rand(h, h),
                p + "self_attn.k_proj.weight": rand(kv, h),
                p + "self_attn.v_proj.weight": rand(kv, h),
                p + "self_attn.o_proj.weight": rand(h, h),
                p + "mlp.gate_proj.weight": rand(inter, h),
                p + "mlp.up_proj.weight": rand(inter, h),
                p + "mlp.down_proj.weight": rand(h, inter),
                p + "input_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
                p + "post_attention_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
            }
        )
        if i % 4 == 3:
            flush()
    shard["model.norm.weight"] = torch.ones(h, dtype=torch.bfloat16)
    shard["lm_head.weight"] = rand(v, h)
    flush()
    total = sum((out / f).stat().st_size for f in files)
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1, sort_keys=True)
    )
    (out / "config.json").write_text(json.dumps(config, indent=1, sort_keys=True))
    return out


def drop_page_cache() -> bool:
    """Try to empty the OS page cache so a disk load is cold; False where we may not."""
    try:
        subprocess.run(["sync"], check=True)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def log_dir() -> Path:
    """Where server logs go: $BENCH_LOG_DIR, else /tmp/rfork_bench_logs.

    Not $OUT: the lent GPU machine returns only so many files from $OUT, and a run's result file once stayed behind
    because its server logs came first. A server that fails to start raises with its log's tail anyway.
    """
    path = Path(os.environ.get("BENCH_LOG_DIR") or "/tmp/rfork_bench_logs")
    path.mkdir(parents=True, exist_ok=True)
    return path


def launch(
    model_dir: Path, port: int, args: list[str], log: Path, timeout: float = 900, env: dict | None = None
) -> subprocess.Popen:
    """Start a server and wait for /health; raises with the log tail if it dies."""
    cmd = [sys.executable, "-m", "sglang.launch_server", "--model-path", str(model_dir), "--port", str(port), *args]
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            if requests.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except requests.RequestException:
            pass
        time.sleep(0.5)
    proc.kill()
    raise TimeoutError(log.read_text()[-4000:])


def server_info(port: int) -> dict:
    return requests.get(f"http://127.0.0.1:{port}/get_server_info", timeout=30).json()


def machine() -> str:
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    gpus = [torch.cuda.get_device_name(i) for i in range(count)]
    return f"{platform.node()}: {len(gpus)}x {gpus[0] if gpus else 'no GPU'}, torch {torch.__version__}"


def stamp(command: str) -> dict:
    return {"command": command, "machine": machine(), "date": datetime.date.today().isoformat()}


def write_result(result: dict, name: str) -> None:
    """Print the JSON and keep a copy where the caller asked ($OUT on the GPU machine, else benchmark/results)."""
    text = json.dumps(result, indent=2)
    print(text)
    out_dir = Path(os.environ.get("OUT") or Path(__file__).resolve().parents[1] / "results")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / name).write_text(text + "\n")
