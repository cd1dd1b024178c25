"""Test helpers: launch a real server process on a free port, wait until it serves, kill it and its children."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlparse

import requests

from sglang.srt.server_args import free_port
from sglang.srt.utils import kill_process_tree

__all__ = [
    "DEFAULT_TIMEOUT",
    "LLAMA3_8B_SHAPE",
    "config_only_copy",
    "find_free_port",
    "kill_process_tree",
    "popen_launch_server",
    "server_log_tail",
    "tiny_model",
]

# config.json fields that give a Llama model the shape of Llama-3-8B (for GPU tests and benchmarks).
LLAMA3_8B_SHAPE = {
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "num_hidden_layers": 32,
    "vocab_size": 128256,
    "rope_theta": 500000.0,
    "max_position_embeddings": 8192,
    "torch_dtype": "bfloat16",
    "head_dim": 128,
}

# Seconds a test server may take from launch to answering /health.
DEFAULT_TIMEOUT = 300.0
LOG_TAIL_CHARS = 6000
# A tiny bf16 llama with head_dim 128 like Llama-3-8B, so GPU tests compile the FlashInfer kernels benchmarks use.
TINY_BF16_LLAMA: dict[str, object] = dict(
    dtype="bfloat16", num_layers=4, hidden_size=512, num_heads=4, num_kv_heads=2, intermediate_size=1024
)


def find_free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (bound to port 0 and read back)."""
    return free_port(host)


def tiny_model(arch: str = "llama", **options: object) -> str:
    """Path of a tiny random checkpoint of arch, built once and cached (SGLANG_TINY_MODEL_DIR or the temp dir)."""
    from sglang.tools.make_tiny_model import ensure_tiny_model

    root = Path(os.environ.get("SGLANG_TINY_MODEL_DIR", Path(tempfile.gettempdir()) / "sglang_tiny_models"))
    suffix = "".join(f"-{key}={value}" for key, value in sorted(options.items()))
    return str(ensure_tiny_model(arch, root / f"{arch}{suffix}", **options))


def config_only_copy(model_dir: str | Path, dest: str | Path) -> str:
    """Copy a model dir without its weight files: what a new node that forks its weights has."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    for f in Path(model_dir).iterdir():
        if f.is_file() and f.suffix not in (".safetensors", ".bin", ".pt") and not f.name.endswith(".index.json"):
            shutil.copy(f, dest / f.name)
    return str(dest)


def popen_launch_server(
    model_path: str,
    base_url: str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    other_args: list[str] | tuple[str, ...] = (),
    env: dict[str, str] | None = None,
) -> subprocess.Popen:
    """Start `python -m sglang.launch_server` and return it once /health answers 200.

    Without base_url the server gets a free loopback port. The returned process carries `base_url` and
    `log_path` (its stdout and stderr); on failure the server is killed and the error quotes its log.
    """
    if base_url is None:
        base_url = f"http://127.0.0.1:{find_free_port()}"
    url = urlparse(base_url)
    command = [
        sys.executable,
        "-m",
        "sglang.launch_server",
        "--model-path",
        str(model_path),
        "--host",
        url.hostname or "127.0.0.1",
        "--port",
        str(url.port),
        *other_args,
    ]
    with tempfile.NamedTemporaryFile(prefix="sglang_server_", suffix=".log", delete=False) as log:
        env = {**os.environ, **(env or {})}
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    process.base_url = base_url  # type: ignore[attr-defined]
    process.log_path = log.name  # type: ignore[attr-defined]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(
                f"Server exited with code {process.returncode} before it was ready.\n"
                f"Command: {' '.join(command)}\n{server_log_tail(process)}"
            )
        try:
            if requests.get(f"{base_url}/health", timeout=5).status_code == 200:
                return process
        except requests.RequestException:
            pass  # not listening yet
        time.sleep(0.1)
    kill_process_tree(process.pid)
    raise TimeoutError(
        f"Server at {base_url} did not answer /health within {timeout:.0f} s.\n"
        f"Command: {' '.join(command)}\n{server_log_tail(process)}"
    )


def server_log_tail(process: subprocess.Popen, chars: int = LOG_TAIL_CHARS) -> str:
    """The last chars characters of a server's log (from popen_launch_server)."""
    path = getattr(process, "log_path", None)
    if path is None or not os.path.exists(path):
        return "(no server log)"
    with open(path, errors="replace") as f:
        text = f.read()
    return f"--- server log tail ({path}) ---\n{text[-chars:]}"
