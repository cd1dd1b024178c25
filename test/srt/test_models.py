"""Llama / Qwen2 / Qwen3 against HF transformers: prefill logits, greedy decoding, TP=2, parameter names, loaders."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from sglang.srt.configs.load_config import LoadConfig, LoadFormat
from sglang.srt.configs.model_config import ModelConfig, ModelConfigError
from sglang.srt.model_loader import get_model_loader
from sglang.srt.model_loader.weight_utils import WeightFilesNotFoundError, WeightLoadingError
from sglang.test.hf_reference import assert_close_to_hf
from sglang.test.model_harness import ModelHarness, run_tp_ranks

PROMPTS = [[7], [3, 141, 59, 26, 5], [271, 82, 81, 8, 28, 18, 28, 4, 59, 0, 45, 23], list(range(100, 123))]
NEW_TOKENS = 32
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 128,
}
# make_tiny_model options per test model; qwen3's vocabulary (300 -> 304) is not a multiple of 64, so vocab
# padding and trimming are exercised, and its single KV head is replicated at TP=2.
MODEL_OPTIONS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("llama", {}),
    "llama_tied": ("llama", {"tie_word_embeddings": True, "num_kv_heads": 4}),
    "qwen2": ("qwen2", {}),
    "qwen3": ("qwen3", {"num_kv_heads": 1, "head_dim": 32, "vocab_size": 300}),
    "llama_sharded": ("llama", {"max_shard_size": "40KB"}),
}


@pytest.fixture(scope="module")
def models(tiny_model_dir: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    paths = {name: tiny_model_dir(arch, **options) for name, (arch, options) in MODEL_OPTIONS.items()}
    # The llama weights again, read with Llama 3.1 rope scaling.
    llama3 = tmp_path_factory.mktemp("llama3_rope")
    shutil.copytree(paths["llama"], llama3, dirs_exist_ok=True)
    config = json.loads((llama3 / "config.json").read_text())
    config["rope_scaling"] = LLAMA3_ROPE
    (llama3 / "config.json").write_text(json.dumps(config))
    paths["llama3_rope"] = str(llama3)
    return paths


def _assert_close_to_hf(path: str, logits: list[Any], tokens: list[list[int]]) -> None:
    assert_close_to_hf(path, PROMPTS, NEW_TOKENS, logits, tokens)


@pytest.mark.parametrize("name", ["llama", "llama3_rope", "llama_tied", "qwen2", "qwen3", "llama_sharded"])
def test_prefill_and_greedy_match_hf(models: dict[str, str], name: str) -> None:
    harness = ModelHarness(models[name])
    logits = harness.prefill_logits(PROMPTS)
    vocab = harness.model_config.vocab_size
    assert [tuple(x.shape) for x in logits] == [(len(p), vocab) for p in PROMPTS]
    _assert_close_to_hf(models[name], logits, harness.greedy_generate(PROMPTS, NEW_TOKENS))
    # Everything was released: the whole pool is free again for the next request.
    assert harness.allocator.available_size() == harness.allocator.size


def test_sharded_checkpoint_has_several_files(models: dict[str, str]) -> None:
    index = json.loads((Path(models["llama_sharded"]) / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1


def _upstream_names(num_layers: int, qkv_bias: bool = False, qk_norm: bool = False, tied: bool = False) -> set[str]:
    names = {"model.embed_tokens.weight", "model.norm.weight"} | (set() if tied else {"lm_head.weight"})
    for i in range(num_layers):
        p = f"model.layers.{i}."
        names |= {
            p + "self_attn.qkv_proj.weight",
            p + "self_attn.o_proj.weight",
            p + "mlp.gate_up_proj.weight",
            p + "mlp.down_proj.weight",
            p + "input_layernorm.weight",
            p + "post_attention_layernorm.weight",
        }
        names |= {p + "self_attn.qkv_proj.bias"} if qkv_bias else set()
        names |= {p + "self_attn.q_norm.weight", p + "self_attn.k_norm.weight"} if qk_norm else set()
    return names


EXPECTED_NAMES = {
    "llama": _upstream_names(2),
    "llama_tied": _upstream_names(2, tied=True),
    "qwen2": _upstream_names(2, qkv_bias=True),
    "qwen3": _upstream_names(2, qk_norm=True),
}


@pytest.mark.parametrize("name", list(EXPECTED_NAMES))
def test_named_parameters_are_upstream_names(models: dict[str, str], name: str) -> None:
    model = ModelHarness(models[name]).model
    assert {n for n, _ in model.named_parameters()} == EXPECTED_NAMES[name]
    # Only the derived rotary table is a buffer, and it is not part of the state dict.
    assert [n.rsplit(".", 1)[-1] for n, _ in model.named_buffers()] == ["cos_sin_cache"]
    assert not any("cos_sin_cache" in n for n in model.state_dict())


def test_tensor_parallel_2_matches_hf(models: dict[str, str]) -> None:
    names = ["llama", "llama_tied", "qwen2", "qwen3"]
    ranks = run_tp_ranks([models[n] for n in names], PROMPTS, tp_size=2, max_new_tokens=NEW_TOKENS)
    for name in names:
        path = models[name]
        _assert_close_to_hf(path, ranks[0][path]["logits"], ranks[0][path]["tokens"])
        assert ranks[1][path]["tokens"] == ranks[0][path]["tokens"]
        assert set(ranks[1][path]["param_shapes"]) == EXPECTED_NAMES[name]
    # Heads are split and KV heads split or replicated; qwen3's vocab 304 pads to 320, 160 rows per rank.
    llama = ranks[1][models["llama"]]["param_shapes"]
    assert llama["model.layers.0.self_attn.qkv_proj.weight"] == ((2 + 1 + 1) * 16, 64)
    assert llama["model.layers.0.self_attn.o_proj.weight"] == (64, 32)
    assert llama["model.layers.0.mlp.gate_up_proj.weight"] == (128, 64)
    assert llama["model.layers.0.mlp.down_proj.weight"] == (64, 64)
    assert llama["model.embed_tokens.weight"] == llama["lm_head.weight"] == (256, 64)
    qwen3 = ranks[1][models["qwen3"]]["param_shapes"]
    assert qwen3["model.embed_tokens.weight"] == (160, 64)
    assert qwen3["model.layers.1.self_attn.qkv_proj.weight"] == ((2 + 1 + 1) * 32, 64)  # 1 KV head, replicated
    assert qwen3["model.layers.1.self_attn.q_norm.weight"] == (32,)
    assert ranks[0][models["qwen2"]]["param_shapes"]["model.layers.0.self_attn.qkv_proj.bias"] == (64,)


def test_pt_checkpoint_loads_like_safetensors(models: dict[str, str], tmp_path: Path) -> None:
    from safetensors.torch import load_file

    src = Path(models["qwen2"])
    shutil.copy(src / "config.json", tmp_path / "config.json")
    torch.save(load_file(src / "model.safetensors"), tmp_path / "pytorch_model.bin")
    pt_logits = ModelHarness(str(tmp_path)).prefill_logits(PROMPTS)
    st_logits = ModelHarness(models["qwen2"], load_format="safetensors").prefill_logits(PROMPTS)
    for a, b in zip(pt_logits, st_logits):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_dummy_loader_is_deterministic(models: dict[str, str]) -> None:
    first = ModelHarness(models["qwen3"], load_format="dummy")
    second = ModelHarness(models["qwen3"], load_format="dummy")
    params = dict(second.model.named_parameters())
    for name, p in first.model.named_parameters():
        assert torch.equal(p, params[name]), name
    logits = first.prefill_logits(PROMPTS)
    assert all(torch.isfinite(x).all() for x in logits)
    # Random but not degenerate: activations neither vanish nor explode.
    assert 0.1 < float(logits[-1].std()) < 100


def _config(path: str) -> ModelConfig:
    return ModelConfig.from_path(path, "float32", None, "cpu")


def test_empty_model_dir_gives_clear_error(models: dict[str, str], tmp_path: Path) -> None:
    shutil.copy(Path(models["llama"]) / "config.json", tmp_path / "config.json")
    with pytest.raises(WeightFilesNotFoundError, match=r"no \*\.safetensors or \*\.bin weights in .*dummy"):
        get_model_loader(LoadConfig(load_format=LoadFormat.AUTO)).load_model(
            _config(str(tmp_path)), torch.device("cpu")
        )


def test_unknown_architecture_is_named(models: dict[str, str], tmp_path: Path) -> None:
    config = json.loads((Path(models["llama"]) / "config.json").read_text())
    config["architectures"] = ["FancyNewForCausalLM"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelConfigError, match="FancyNewForCausalLM"):
        _config(str(tmp_path))


def test_checkpoint_mismatches_are_named(models: dict[str, str], tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    src = Path(models["llama"])
    shutil.copy(src / "config.json", tmp_path / "config.json")
    weights = load_file(src / "model.safetensors")
    loader = get_model_loader(LoadConfig())
    weights["model.layers.0.mlp.extra.weight"] = torch.zeros(2)
    save_file(weights, tmp_path / "model.safetensors")
    with pytest.raises(WeightLoadingError, match=r"model\.layers\.0\.mlp\.extra\.weight"):
        loader.load_model(_config(str(tmp_path)), torch.device("cpu"))
    del weights["model.layers.0.mlp.extra.weight"], weights["model.layers.1.self_attn.k_proj.weight"]
    save_file(weights, tmp_path / "model.safetensors")
    with pytest.raises(WeightLoadingError, match=r"model\.layers\.1\.self_attn\.qkv_proj\.weight"):
        loader.load_model(_config(str(tmp_path)), torch.device("cpu"))
    weights["model.layers.1.self_attn.k_proj.weight"] = torch.zeros(3, 64)
    save_file(weights, tmp_path / "model.safetensors")
    with pytest.raises(WeightLoadingError, match=r"k_proj.*qkv_proj"):
        loader.load_model(_config(str(tmp_path)), torch.device("cpu"))


def test_unsupported_rope_scaling_is_refused(models: dict[str, str], tmp_path: Path) -> None:
    config = json.loads((Path(models["llama"]) / "config.json").read_text())
    config["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128}
    (tmp_path / "config.json").write_text(json.dumps(config))
    os.symlink(Path(models["llama"]) / "model.safetensors", tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="'yarn' is not supported"):
        get_model_loader(LoadConfig()).load_model(_config(str(tmp_path)), torch.device("cpu"))
