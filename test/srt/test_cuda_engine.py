"""CUDA runs of the Engine (skipped without a GPU): HF-equal float32 greedy output, an 8B-shaped bf16 model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import sglang
from sglang.test.hf_reference import hf_greedy
from sglang.test.test_utils import LLAMA3_8B_SHAPE

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_cuda_float32_greedy_matches_hf(tiny_model_dir, arch):
    path = tiny_model_dir(arch)
    prompts = [[5, 6, 7], list(range(10, 60)), [100, 200, 300, 400, 5, 6], list(range(300, 420))]
    expected = hf_greedy(path, prompts, 32)
    with sglang.Engine(model_path=path, device="cuda", dtype="float32", attention_backend="torch_native") as engine:
        outs = engine.generate(
            input_ids=prompts, sampling_params={"temperature": 0, "max_new_tokens": 32, "ignore_eos": True}
        )
    assert [o["output_ids"] for o in outs] == expected


def test_llama3_8b_shaped_dummy_generates(tiny_model_dir, tmp_path):
    src = tiny_model_dir("llama")
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(f"{src}/{name}", tmp_path / name)
    config = json.loads(Path(src, "config.json").read_text())
    config.update(LLAMA3_8B_SHAPE)
    (tmp_path / "config.json").write_text(json.dumps(config))
    with sglang.Engine(
        model_path=str(tmp_path), load_format="dummy", dtype="bfloat16", max_total_tokens=32768
    ) as engine:
        out = engine.generate(
            ["Hello, my name is", "The capital of France is"],
            {"temperature": 0, "max_new_tokens": 16, "ignore_eos": True},
        )
        info = engine.get_server_info()
    assert all(len(o["output_ids"]) == 16 for o in out)
    assert info["weight_bytes"] > 15e9


def test_cuda_graph_server_start_and_structured_output(tmp_path):
    """bf16 + FlashInfer + CUDA graphs: the start-up timeline's GPU phases, and grammar masks applied on the GPU."""
    import re

    from sglang.test.test_utils import TINY_BF16_LLAMA, tiny_model

    schema = {
        "type": "object",
        "properties": {"name": {"type": "string", "pattern": "^[a-z]{1,6}$"}, "ok": {"type": "boolean"}},
        "required": ["name", "ok"],
        "additionalProperties": False,
    }
    regex = r"[a-z]{3}-[0-9]{2}"
    greedy = {"temperature": 0, "max_new_tokens": 48}
    with sglang.Engine(model_path=tiny_model("llama", **TINY_BF16_LLAMA), max_total_tokens=8192) as engine:
        names = {p["name"] for p in engine.startup_timeline["phases"] if p["process"] == "TP0"}
        outs = engine.generate(
            ["JSON:", "Free text", "Code:", "Batch row"],
            [{**greedy, "json_schema": json.dumps(schema)}, greedy, {**greedy, "regex": regex}, greedy],
        )
    assert {"FlashInfer kernels (wait for build)", "CUDA graphs", "weights (auto)"} <= names, names
    parsed = json.loads(outs[0]["text"])
    assert set(parsed) == {"name", "ok"} and re.fullmatch("[a-z]{1,6}", parsed["name"]), outs[0]["text"]
    assert re.fullmatch(regex, outs[2]["text"]), outs[2]["text"]
