"""Qwen3-MoE against HF transformers (prefill logits, greedy tokens, TP=2), stacked expert loading, routing."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from sglang.srt.configs.load_config import LoadConfig
from sglang.srt.configs.model_config import ModelConfig
from sglang.srt.layers.moe.topk import select_experts
from sglang.srt.layers.moe.torch_experts import torch_experts
from sglang.srt.model_loader import get_model_loader
from sglang.srt.model_loader.weight_utils import WeightLoadingError
from sglang.test.hf_reference import assert_close_to_hf
from sglang.test.model_harness import ModelHarness, run_tp_ranks

PROMPTS = [[7], [3, 141, 59, 26, 5], [271, 82, 81, 8, 28, 18, 28, 4, 59, 0, 45, 23], list(range(100, 123))]
NEW_TOKENS = 24
# "moe": every layer sparse, renormalised top-2 of 8. "moe_mixed": dense layer 0 (mlp_only_layers), sparse
# only every 2nd layer after that (decoder_sparse_step), un-normalised top-3 of 6, tied embeddings.
MODEL_OPTIONS: dict[str, dict[str, Any]] = {
    "moe": {"num_kv_heads": 1, "head_dim": 32},
    "moe_mixed": {
        "num_layers": 4,
        "num_experts": 6,
        "num_experts_per_tok": 3,
        "norm_topk_prob": False,
        "decoder_sparse_step": 2,
        "mlp_only_layers": (0,),
        "tie_word_embeddings": True,
    },
}


@pytest.fixture(scope="module")
def models(tiny_model_dir: Any) -> dict[str, str]:
    return {name: tiny_model_dir("qwen3_moe", **options) for name, options in MODEL_OPTIONS.items()}


def _assert_close_to_hf(path: str, logits: list[Any], tokens: list[list[int]]) -> None:
    assert_close_to_hf(path, PROMPTS, NEW_TOKENS, logits, tokens)


@pytest.mark.parametrize("name", list(MODEL_OPTIONS))
def test_prefill_and_greedy_match_hf(models: dict[str, str], name: str) -> None:
    harness = ModelHarness(models[name])
    logits = harness.prefill_logits(PROMPTS)
    _assert_close_to_hf(models[name], logits, harness.greedy_generate(PROMPTS, NEW_TOKENS))
    assert harness.allocator.available_size() == harness.allocator.size


def test_parameters_are_upstream_stacked_names(models: dict[str, str]) -> None:
    model = ModelHarness(models["moe_mixed"]).model
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    # Layer 0 is dense (mlp_only_layers), 1 and 3 are sparse (step 2), 2 is dense; hidden 64, 6 experts of 32.
    assert shapes["model.layers.0.mlp.gate_up_proj.weight"] == (256, 64)
    assert shapes["model.layers.2.mlp.down_proj.weight"] == (64, 128)
    for layer in (1, 3):
        p = f"model.layers.{layer}.mlp."
        assert shapes[p + "gate.weight"] == (6, 64)
        assert shapes[p + "experts.w13_weight"] == (6, 64, 64)
        assert shapes[p + "experts.w2_weight"] == (6, 64, 32)
        assert not any(n.startswith(p) and "proj" in n for n in shapes)
    assert "lm_head.weight" not in shapes  # tied
    # Sparse layers: router + 2 stacked tensors, not 3 tensors per expert.
    assert sum(".experts." in n for n in shapes) == 4


def test_experts_hold_checkpoint_tensors_in_gate_up_order(models: dict[str, str]) -> None:
    from safetensors.torch import load_file

    path = models["moe"]
    ckpt = load_file(Path(path) / "model.safetensors")
    params = dict(ModelHarness(path).model.named_parameters())
    w13, w2 = params["model.layers.1.mlp.experts.w13_weight"], params["model.layers.1.mlp.experts.w2_weight"]
    expert = "model.layers.1.mlp.experts.5."
    assert torch.equal(w13[5, :32], ckpt[expert + "gate_proj.weight"])
    assert torch.equal(w13[5, 32:], ckpt[expert + "up_proj.weight"])
    assert torch.equal(w2[5], ckpt[expert + "down_proj.weight"])


def test_tensor_parallel_2_matches_hf(models: dict[str, str]) -> None:
    names = list(MODEL_OPTIONS)
    ranks = run_tp_ranks([models[n] for n in names], PROMPTS, tp_size=2, max_new_tokens=NEW_TOKENS)
    for name in names:
        path = models[name]
        _assert_close_to_hf(path, ranks[0][path]["logits"], ranks[0][path]["tokens"])
        assert ranks[1][path]["tokens"] == ranks[0][path]["tokens"]
    # Experts split along the intermediate dimension: each rank holds 16 of 32 channels of all 8 experts.
    shapes = ranks[1][models["moe"]]["param_shapes"]
    assert shapes["model.layers.0.mlp.experts.w13_weight"] == (8, 32, 64)
    assert shapes["model.layers.0.mlp.experts.w2_weight"] == (8, 64, 16)
    assert shapes["model.layers.0.mlp.gate.weight"] == (8, 64)


def _copy_with(path: str, dest: Path, edit: Any) -> str:
    from safetensors.torch import load_file, save_file

    shutil.copy(Path(path) / "config.json", dest / "config.json")
    weights = load_file(Path(path) / "model.safetensors")
    edit(weights)
    save_file(weights, dest / "model.safetensors")
    return str(dest)


def _load(path: str) -> None:
    get_model_loader(LoadConfig()).load_model(ModelConfig.from_path(path, "float32", None, "cpu"), torch.device("cpu"))


def test_missing_or_misshapen_expert_is_named(models: dict[str, str], tmp_path: Path) -> None:
    missing = _copy_with(models["moe"], tmp_path, lambda w: w.pop("model.layers.1.mlp.experts.3.up_proj.weight"))
    with pytest.raises(WeightLoadingError, match=r"model\.layers\.1\.mlp\.experts\.w13_weight"):
        _load(missing)

    def shrink(weights: dict[str, torch.Tensor]) -> None:
        weights["model.layers.0.mlp.experts.2.down_proj.weight"] = torch.zeros(64, 16)

    with pytest.raises(WeightLoadingError, match=r"experts\.2\.down_proj.*32 intermediate channels"):
        _load(_copy_with(models["moe"], tmp_path, shrink))

    def extra_expert(weights: dict[str, torch.Tensor]) -> None:
        weights["model.layers.0.mlp.experts.8.gate_proj.weight"] = torch.zeros(32, 64)

    with pytest.raises(WeightLoadingError, match="expert 8 is out of range: the model has 8 experts"):
        _load(_copy_with(models["moe"], tmp_path, extra_expert))


def test_select_experts_softmax_topk_and_renormalisation() -> None:
    logits = torch.tensor([[0.0, 2.0, 1.0, -1.0], [3.0, 3.5, -2.0, 0.0]])
    probs = torch.softmax(logits, dim=-1)
    weights, ids = select_experts(logits, 2, renormalize=False)
    assert ids.tolist() == [[1, 2], [1, 0]] and ids.dtype == torch.int32
    torch.testing.assert_close(weights, torch.stack([probs[0, [1, 2]], probs[1, [1, 0]]]))
    weights, _ = select_experts(logits, 2, renormalize=True)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2))
    # A bfloat16 router still chooses in float32.
    assert select_experts(logits.bfloat16(), 2, True)[0].dtype == torch.float32


def dense_reference(x, w13, w2, weights, ids) -> torch.Tensor:
    """Every expert on every token, masked by the routing: slow, obviously right."""
    out = torch.zeros_like(x)
    for e in range(w13.shape[0]):
        gate, up = (x @ w13[e].T).chunk(2, dim=-1)
        y = (torch.nn.functional.silu(gate) * up) @ w2[e].T
        out += y * (weights * (ids == e)).sum(-1, keepdim=True).to(x.dtype)
    return out


def test_torch_experts_equal_dense_reference() -> None:
    gen = torch.Generator().manual_seed(0)
    tokens, hidden, inter, experts = 37, 48, 24, 9
    x = torch.randn(tokens, hidden, generator=gen)
    w13 = torch.randn(experts, 2 * inter, hidden, generator=gen) / hidden**0.5
    w2 = torch.randn(experts, hidden, inter, generator=gen) / inter**0.5
    weights, ids = select_experts(torch.randn(tokens, experts, generator=gen), 3, True)
    torch.testing.assert_close(torch_experts(x, w13, w2, weights, ids), dense_reference(x, w13, w2, weights, ids))


TRITON_CHECK = """
import torch
from sglang.srt.layers.moe.fused_moe_triton import triton_experts
from sglang.srt.layers.moe.topk import select_experts
from sglang.srt.layers.moe.torch_experts import torch_experts
gen = torch.Generator().manual_seed(0)
# (1, 16, 4) and (8, 4, 4) take the per-route GEMV kernel (up to 32 routes), the others the sorted grouped GEMM.
for tokens, experts, top_k, hidden, inter in [(1, 16, 4, 64, 48), (8, 4, 4, 32, 32), (9, 16, 4, 64, 48),
                                              (37, 8, 2, 96, 40)]:
    x = torch.randn(tokens, hidden, generator=gen)
    w13 = torch.randn(experts, 2 * inter, hidden, generator=gen) / hidden**0.5
    w2 = torch.randn(experts, hidden, inter, generator=gen) / inter**0.5
    weights, ids = select_experts(torch.randn(tokens, experts, generator=gen), top_k, True)
    torch.testing.assert_close(triton_experts(x, w13, w2, weights, ids), torch_experts(x, w13, w2, weights, ids))
print("fused == torch")
"""


def test_triton_kernels_in_the_interpreter_equal_torch() -> None:
    # Triton's interpreter runs the real kernel source on the CPU: both kernels, routing alignment, padding
    # blocks, masks and the route weights are checked here; tile shapes and speed only on the GPU (test_moe_cuda.py).
    import subprocess
    import sys

    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run([sys.executable, "-c", TRITON_CHECK], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "fused == torch" in result.stdout, result.stderr[-3000:]


def test_tp_size_must_divide_the_expert_intermediate_size(models: dict[str, str], tmp_path: Path) -> None:
    import json

    from sglang.srt.configs.model_config import ModelConfigError

    config = json.loads((Path(models["moe"]) / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "moe_intermediate_size": 33}))
    model_config = ModelConfig.from_path(str(tmp_path), "float32", None, "cpu")
    model_config.check_tp(1)
    with pytest.raises(ModelConfigError, match="--tp-size 2 does not divide the model's moe_intermediate_size 33"):
        model_config.check_tp(2)
