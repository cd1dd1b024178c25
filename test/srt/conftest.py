"""Shared fixtures: tiny checkpoints built once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory):
    """Factory: tiny_model_dir(arch, **options) -> path of a generated checkpoint (cached per options)."""
    from sglang.tools.make_tiny_model import make_tiny_model

    root = tmp_path_factory.mktemp("tiny_models")
    cache: dict[tuple, Path] = {}

    def build(arch: str = "llama", **options) -> str:
        key = (arch, tuple(sorted(options.items())))
        if key not in cache:
            name = arch + "".join(f"-{k}={v}" for k, v in sorted(options.items()))
            cache[key] = make_tiny_model(arch, root / name, **options)
        return str(cache[key])

    return build


@pytest.fixture(scope="session")
def tiny_llama_server():
    """A server with default flags on the tiny Llama, started once for every module that only sends it requests."""
    from sglang.test.test_utils import kill_process_tree, popen_launch_server, tiny_model

    proc = popen_launch_server(tiny_model("llama"))
    yield proc
    kill_process_tree(proc.pid)
