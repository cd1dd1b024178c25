"""Tests for ``sglang.tools.make_tiny_model`` (tiny random HF model directories for tests)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
import transformers
from safetensors import safe_open
from tokenizers import Tokenizer

from sglang.tools.make_tiny_model import (
    EOS_TOKEN_ID,
    SPECIAL_TOKENS,
    ensure_tiny_model,
    main,
    make_tiny_model,
    parse_size,
)

ARCHES = ("llama", "qwen2", "qwen3", "qwen3_moe")
UNICODE_TEXT = "Hello, wörld! naïve café — 你好, мир 🙂\n\tdef f(x):  return x ** 2"


def _hashes(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


def _read_tensors_from(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as f:
        names = list(f.keys())  # safe_open handles are not iterable
        return {name: f.get_tensor(name) for name in names}


def _read_tensors(directory: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(directory.glob("*.safetensors")):
        tensors.update(_read_tensors_from(path))
    return tensors


def _load_model(directory: Path) -> torch.nn.Module:
    model, info = transformers.AutoModelForCausalLM.from_pretrained(directory, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


@pytest.mark.parametrize("arch", ARCHES)
def test_arch_loads_in_transformers(arch: str, tmp_path: Path) -> None:
    out = make_tiny_model(arch, tmp_path / arch)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == arch
    assert config["architectures"] == [
        {
            "llama": "LlamaForCausalLM",
            "qwen2": "Qwen2ForCausalLM",
            "qwen3": "Qwen3ForCausalLM",
            "qwen3_moe": "Qwen3MoeForCausalLM",
        }[arch]
    ]
    assert config["eos_token_id"] == EOS_TOKEN_ID and config["tie_word_embeddings"] is False
    assert config["torch_dtype"] == "float32" and config["vocab_size"] == 512
    generation_config = json.loads((out / "generation_config.json").read_text())
    assert generation_config["eos_token_id"] == config["eos_token_id"]

    names = set(_read_tensors(out))
    assert "lm_head.weight" in names and "model.norm.weight" in names
    assert ("model.layers.1.self_attn.k_proj.bias" in names) == (arch == "qwen2")
    assert ("model.layers.1.self_attn.q_norm.weight" in names) == arch.startswith("qwen3")
    if arch.startswith("qwen3"):
        assert config["head_dim"] == 16 and config["attention_bias"] is False
    # MoE: HF's per-expert checkpoint names (transformers stacks them itself on load) and a router per layer.
    assert ("model.layers.1.mlp.experts.7.down_proj.weight" in names) == (arch == "qwen3_moe")
    assert ("model.layers.1.mlp.gate.weight" in names) == (arch == "qwen3_moe")
    if arch == "qwen3_moe":
        assert config["num_experts"] == 8 and config["num_experts_per_tok"] == 2

    model = _load_model(out)
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id == EOS_TOKEN_ID
    ids = tokenizer(UNICODE_TEXT)["input_ids"]
    assert tokenizer.decode(ids) == UNICODE_TEXT
    # HF's tokenizer (rebuilt per model type in transformers 5) must agree with the raw tokenizer.json.
    assert Tokenizer.from_file(str(out / "tokenizer.json")).encode(UNICODE_TEXT).ids == ids

    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), config["vocab_size"]) and torch.isfinite(logits).all()
    assert logits.std() > 1.0  # a wide logit spread makes greedy near-ties unlikely

    prompt = tokenizer("The little lighthouse", return_tensors="pt")["input_ids"]
    generated = model.generate(prompt, max_new_tokens=32, do_sample=False)[0, prompt.shape[1] :]
    assert len(generated) == 32 and len(set(generated.tolist())) >= 8


def test_deterministic_and_seeded(tmp_path: Path) -> None:
    first = make_tiny_model("qwen3", tmp_path / "a", max_shard_size="100KB")
    second = make_tiny_model("qwen3", tmp_path / "b", max_shard_size="100KB")
    assert _hashes(first) == _hashes(second)

    other_seed = make_tiny_model("qwen3", tmp_path / "c", seed=1)
    same_seed = make_tiny_model("qwen3", tmp_path / "d", seed=0)
    assert _hashes(other_seed)["tokenizer.json"] == _hashes(same_seed)["tokenizer.json"]
    reseeded, original = _read_tensors(other_seed), _read_tensors(same_seed)
    assert reseeded.keys() == original.keys()
    assert all(not torch.equal(reseeded[name], original[name]) for name in original)


def test_sharded_index_matches_hf_format(tmp_path: Path) -> None:
    out = make_tiny_model("qwen2", tmp_path / "sharded", max_shard_size="100KB")
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 1 and not (out / "model.safetensors").exists()
    assert shards == [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    tensors = _read_tensors(out)
    assert index["weight_map"].keys() == tensors.keys()
    for name, shard in index["weight_map"].items():
        assert name in _read_tensors_from(out / shard)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    for shard in shards:
        shard_tensors = _read_tensors_from(out / shard)
        nbytes = sum(t.numel() * t.element_size() for t in shard_tensors.values())
        assert nbytes <= 100_000 or len(shard_tensors) == 1  # only a lone oversized tensor may exceed

    single = make_tiny_model("qwen2", tmp_path / "single")
    assert [p.name for p in single.glob("*.safetensors")] == ["model.safetensors"]
    ids = torch.tensor([[5, 100, 200, 300]])
    with torch.no_grad():
        torch.testing.assert_close(_load_model(out)(ids).logits, _load_model(single)(ids).logits)


def test_tied_word_embeddings(tmp_path: Path) -> None:
    out = make_tiny_model("llama", tmp_path / "tied", tie_word_embeddings=True)
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    tensors = _read_tensors(out)
    assert "lm_head.weight" not in tensors
    model = _load_model(out)
    assert torch.equal(model.lm_head.weight, tensors["model.embed_tokens.weight"])
    prompt = torch.tensor([[40, 80, 120]])
    generated = model.generate(prompt, max_new_tokens=32, do_sample=False)[0, 3:]
    assert len(set(generated.tolist())) >= 8  # tied heads must not just echo the input token


def test_bfloat16_and_vocab_padding(tmp_path: Path) -> None:
    out = make_tiny_model("qwen3", tmp_path / "bf16", dtype="bfloat16", vocab_size=500)
    config = json.loads((out / "config.json").read_text())
    assert config["torch_dtype"] == "bfloat16" and config["vocab_size"] == 504
    tensors = _read_tensors(out)
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    assert tensors["model.embed_tokens.weight"].shape[0] == 504
    tokenizer = Tokenizer.from_file(str(out / "tokenizer.json"))
    assert tokenizer.get_vocab_size() == 500
    assert [tokenizer.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2]
    model = _load_model(out)
    assert model.dtype == torch.bfloat16
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[3, 499]])).logits).all()


def test_chat_template(tmp_path: Path) -> None:
    tokenizer = transformers.AutoTokenizer.from_pretrained(make_tiny_model("llama", tmp_path / "m"))
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Hi there"}]},
    ]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"
    )
    no_prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    assert no_prompt == rendered.removesuffix("<|im_start|>assistant\n")
    ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
    assert ids[0] == 1 and ids.count(2) == 2  # <|im_start|>, <|im_end|> stay single special tokens


def test_ensure_and_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "ensured"
    assert ensure_tiny_model("qwen2", out, num_layers=1) == out
    mtime = (out / "config.json").stat().st_mtime_ns
    ensure_tiny_model("qwen2", out, num_layers=1)
    assert (out / "config.json").stat().st_mtime_ns == mtime
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # temp build dir cleaned up

    cli_out = tmp_path / "cli"
    main(["--arch", "qwen2", "--out", str(cli_out), "--num-layers", "1", "--head-dim", "32"])
    line = capsys.readouterr().out.strip()
    assert str(cli_out) in line and "parameters" in line and "model.safetensors" in line
    config = json.loads((cli_out / "config.json").read_text())
    assert config["num_hidden_layers"] == 1 and config["head_dim"] == 32
    assert _hashes(cli_out) == _hashes(make_tiny_model("qwen2", tmp_path / "api", num_layers=1, head_dim=32))
    _load_model(cli_out)


def test_parse_size() -> None:
    assert parse_size("100KB") == 100_000 and parse_size("2MB") == 2_000_000
    assert parse_size("1GiB") == 2**30 and parse_size(4096) == 4096 and parse_size("512") == 512
    with pytest.raises(ValueError):
        parse_size("ten megabytes")
