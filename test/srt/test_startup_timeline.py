"""The start-up timeline: every phase of a launch timed from the launch itself, logged, and served."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest
import requests

from sglang.srt import startup_timeline
from sglang.test.test_utils import kill_process_tree, popen_launch_server

# Phases every start goes through, per process (the launcher is "main", rank 0 is "TP0").
MAIN_PHASES = {"interpreter start + imports", "start rank processes", "resolve arguments", "model config",
               "tokenizer manager", "wait for ranks", "HTTP server"}  # fmt: skip
RANK_PHASES = {"process start + imports", "model config", "device init", "distributed init", "weights (auto)",
               "weight checksums", "KV cache", "attention backend", "CUDA graphs"}  # fmt: skip


@pytest.fixture(scope="module")
def launched(tiny_model_dir):
    started = time.time()
    proc = popen_launch_server(tiny_model_dir("llama"), other_args=["--log-level", "info"])
    healthy = time.time()
    yield proc, started, healthy
    kill_process_tree(proc.pid)


def test_server_info_has_a_timeline_that_covers_the_launch(launched):
    proc, started, healthy = launched
    timeline = requests.get(f"{proc.base_url}/get_server_info", timeout=30).json()["startup_timeline"]
    ready = timeline["launch_to_ready_s"]
    # Counted from the OS start of the launcher, which began after `started` and was ready before /health answered.
    assert 0 < ready <= healthy - started + 0.05, (ready, healthy - started)
    assert ready > 0.5 * (healthy - started) - 0.5, "the launch instant is far later than the Popen"
    phases = timeline["phases"]
    by_process: dict[str, set[str]] = {}
    for p in phases:
        by_process.setdefault(p["process"], set()).add(p["name"])
        assert -0.05 <= p["start_s"] <= p["end_s"] <= ready + 0.05, p
        assert p["seconds"] == pytest.approx(p["end_s"] - p["start_s"], abs=1e-3)
    assert by_process["main"] >= MAIN_PHASES, by_process["main"]
    assert by_process["TP0"] >= RANK_PHASES, by_process["TP0"]
    # The rank starts before the launcher has resolved its arguments: its imports overlap the launcher's work.
    rank_start = min(p["start_s"] for p in phases if p["process"] == "TP0")
    resolved = next(p["end_s"] for p in phases if p["name"] == "resolve arguments")
    assert rank_start < resolved


def test_each_phase_is_logged_and_ready_is_summarised(launched):
    proc, _, _ = launched
    log = Path(proc.log_path).read_text()
    assert "Startup: resolve arguments took" in log
    assert "[" in log and "TP0] Startup: weights (auto) took" in log
    summary = [line for line in log.splitlines() if "Startup: ready" in line]
    assert len(summary) == 1 and "TP0: process start + imports" in summary[0], summary


def test_a_long_phase_says_it_is_still_running(monkeypatch, caplog):
    monkeypatch.setattr(startup_timeline, "HEARTBEAT_S", 1.0)
    timeline = startup_timeline.StartupTimeline("main", time.time())
    with caplog.at_level(logging.INFO, logger="sglang.startup"), timeline.phase("slow step"):
        time.sleep(2.6)
    lines = [r.getMessage() for r in caplog.records]
    assert any(line.startswith("Startup: still in slow step") for line in lines), lines
    assert lines[-1].startswith("Startup: slow step took 2.6"), lines


def test_a_failed_phase_is_recorded_as_failed():
    timeline = startup_timeline.StartupTimeline("main", time.time())
    with pytest.raises(ValueError), timeline.phase("weights"):
        raise ValueError("bad checkpoint")
    assert [p.name for p in timeline.phases] == ["weights (failed)"]


def test_process_start_time_is_this_process_start():
    import psutil

    # psutil's create_time is the same instant with the boot time rounded to whole seconds.
    ours = startup_timeline.process_start_time()
    assert ours < time.time()
    assert abs(ours - psutil.Process().create_time()) < 1.5


# What a rank does before it serves: its import stack, the model config, and a model built and loaded from disk.
_RANK_PATH = """
import sys
from sglang.srt.managers.scheduler_process import _import_stack
_import_stack(None)
import torch
from sglang.srt.configs.load_config import LoadConfig
from sglang.srt.configs.model_config import ModelConfig
from sglang.srt.model_loader import get_model_loader
for path in sys.argv[1:]:
    get_model_loader(LoadConfig()).load_model(ModelConfig.from_path(path, "float32", None, "cpu"), torch.device("cpu"))
print(sorted(m for m in sys.modules if m.split(".")[0] in ("transformers", "tokenizers")))
"""


def test_a_rank_starts_without_transformers(tiny_model_dir):
    # transformers' import was 1.2 s of a rank's 5.5 s of imports on an H200 host (the models imported it for a type
    # annotation); a rank needs its tokenizer only for stop strings and grammars, and loads it then.
    import subprocess
    import sys

    paths = [tiny_model_dir(arch) for arch in ("llama", "qwen2", "qwen3", "qwen3_moe")]
    done = subprocess.run([sys.executable, "-c", _RANK_PATH, *paths], capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "[]", done.stdout[-2000:]
