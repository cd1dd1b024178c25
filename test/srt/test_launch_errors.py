"""The launcher refuses bad input with one clear line naming the problem and a non-zero exit."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sglang.test.test_utils import find_free_port


def _launch(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "sglang.launch_server", "--port", str(find_free_port()), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


def _unknown_arch(model_dir: str, dest: Path) -> str:
    shutil.copytree(model_dir, dest)
    config = json.loads((dest / "config.json").read_text())
    config["architectures"] = ["FancyNewForCausalLM"]
    (dest / "config.json").write_text(json.dumps(config))
    return str(dest)


@pytest.mark.parametrize(
    ("case", "needle"),
    [
        ("no-model", "--model-path is required"),
        ("unknown-arch", "FancyNewForCausalLM"),
        ("bad-dtype", "--dtype"),
        ("tp-not-dividing-heads", "does not divide"),
        ("no-weights", "no *.safetensors"),
        ("unknown-flag", "--no-such-flag"),
    ],
)
def test_bad_input_fails_with_one_line(tiny_model_dir, tmp_path, case, needle):
    model = tiny_model_dir("llama")
    args = {
        "no-model": [],
        "unknown-arch": ["--model-path", _unknown_arch(model, tmp_path / "m")],
        "bad-dtype": ["--model-path", model, "--dtype", "int3"],
        "tp-not-dividing-heads": ["--model-path", model, "--tp-size", "3"],
        "no-weights": ["--model-path", str(tmp_path)],
        "unknown-flag": ["--model-path", model, "--no-such-flag"],
    }[case]
    if case == "no-weights":
        for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
            shutil.copy(Path(model, name), tmp_path / name)
    proc = _launch(*args)
    assert proc.returncode != 0
    # The start-up timeline (one INFO line per finished phase) is progress, not part of the error.
    lines = [
        line
        for line in proc.stderr.splitlines()
        if line.strip() and "[transformers]" not in line and "] Startup: " not in line
    ]
    assert "Traceback" not in proc.stderr, proc.stderr
    assert any(needle in line for line in lines), proc.stderr
    assert len(lines) <= 2, proc.stderr
