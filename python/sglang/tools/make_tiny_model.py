"""Build a tiny, randomly initialised Hugging Face causal LM directory (llama / qwen2 / qwen3 / qwen3_moe).

Usage: ``python -m sglang.tools.make_tiny_model --arch qwen3 --out /tmp/tiny-qwen3``.

The output is byte-for-byte deterministic for a given set of options, needs no network access, and loads
with ``transformers.AutoModelForCausalLM`` / ``AutoTokenizer`` without missing or unexpected weights.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from sglang.tools.tiny_moe import MoeOptions
from sglang.tools.tiny_tokenizer import (
    BOS_TOKEN_ID,
    EOS_TOKEN_ID,
    PAD_TOKEN_ID,
    SPECIAL_TOKENS,
    make_tokenizer_config,
    train_tokenizer,
)

ARCHITECTURES: dict[str, str] = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
}
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}

# Init scales (float32, before casting). Projections use std 1/sqrt(fan_in) so activations stay O(1); the
# residual-writing projections get a larger gain so every layer visibly changes the hidden state (otherwise
# greedy decoding mostly echoes the input token); lm_head gives logits a std of a few units so that greedy
# argmax ties (which would make engine-vs-HF comparisons flaky) are unlikely.
EMBED_STD = 1.0
RESIDUAL_GAIN = 2.0
LOGIT_STD = 6.0
NORM_NOISE_STD = 0.1
BIAS_STD = 0.1
# Output rows of special tokens are damped so random greedy decoding practically never emits eos mid-test.
SPECIAL_TOKEN_LOGIT_SCALE = 0.1
VOCAB_PAD_MULTIPLE = 8

_SIZE_UNITS: dict[str, int] = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
}


@dataclass(frozen=True)
class TinyModelSummary:
    """What a build wrote: the directory, the parameter count and the file names."""

    path: Path
    num_parameters: int
    files: tuple[str, ...]

    def describe(self) -> str:
        """One-line human-readable summary."""
        return f"{self.path}: {self.num_parameters:,} parameters, files: {', '.join(self.files)}"


def parse_size(size: int | str) -> int:
    """Parse a byte size such as ``100KB``, ``2MB``, ``1GiB`` or ``4096`` (decimal units are powers of 10)."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", size)
    if match is None or match.group(2).upper() not in _SIZE_UNITS:
        raise ValueError(f"invalid size {size!r}; expected e.g. 4096, 100KB, 2MB, 1GiB")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2).upper()])


def _pad_vocab(size: int) -> int:
    return -(-size // VOCAB_PAD_MULTIPLE) * VOCAB_PAD_MULTIPLE


def _output_rows(gen: torch.Generator, padded_vocab: int, real_vocab: int, hidden: int, std: float) -> torch.Tensor:
    """Rows of an (un)embedding matrix: random for real tokens, damped for specials, zero for padding."""
    weight = torch.randn(padded_vocab, hidden, generator=gen) * std
    weight[: len(SPECIAL_TOKENS)] *= SPECIAL_TOKEN_LOGIT_SCALE
    # Padding ids never come out of the tokenizer; zero rows keep them from ever winning the argmax.
    weight[real_vocab:] = 0.0
    return weight


def _linear(gen: torch.Generator, out_features: int, in_features: int, gain: float = 1.0) -> torch.Tensor:
    return torch.randn(out_features, in_features, generator=gen) * (gain / math.sqrt(in_features))


def _norm(gen: torch.Generator, size: int) -> torch.Tensor:
    # 1 + noise rather than all-ones, so that a loader swapping or skipping norm weights changes outputs.
    return 1.0 + NORM_NOISE_STD * torch.randn(size, generator=gen)


def make_weights(
    arch: str,
    *,
    num_layers: int,
    hidden_size: int,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    intermediate_size: int,
    padded_vocab: int,
    real_vocab: int,
    tie_word_embeddings: bool,
    seed: int,
    moe: MoeOptions | None = None,
) -> dict[str, torch.Tensor]:
    """Generate float32 weights with HF checkpoint names, in HF's parameter order."""
    gen = torch.Generator().manual_seed(seed)
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    embed = _output_rows(gen, padded_vocab, real_vocab, hidden_size, EMBED_STD)
    weights: dict[str, torch.Tensor] = {"model.embed_tokens.weight": embed}
    for layer in range(num_layers):
        prefix = f"model.layers.{layer}."
        weights[prefix + "self_attn.q_proj.weight"] = _linear(gen, q_size, hidden_size)
        if arch == "qwen2":
            weights[prefix + "self_attn.q_proj.bias"] = BIAS_STD * torch.randn(q_size, generator=gen)
        weights[prefix + "self_attn.k_proj.weight"] = _linear(gen, kv_size, hidden_size)
        if arch == "qwen2":
            weights[prefix + "self_attn.k_proj.bias"] = BIAS_STD * torch.randn(kv_size, generator=gen)
        weights[prefix + "self_attn.v_proj.weight"] = _linear(gen, kv_size, hidden_size)
        if arch == "qwen2":
            weights[prefix + "self_attn.v_proj.bias"] = BIAS_STD * torch.randn(kv_size, generator=gen)
        weights[prefix + "self_attn.o_proj.weight"] = _linear(gen, hidden_size, q_size, RESIDUAL_GAIN)
        if arch in ("qwen3", "qwen3_moe"):
            weights[prefix + "self_attn.q_norm.weight"] = _norm(gen, head_dim)
            weights[prefix + "self_attn.k_norm.weight"] = _norm(gen, head_dim)
        if moe is not None and moe.is_sparse(layer):
            weights.update(moe.weights(gen, prefix, hidden_size, RESIDUAL_GAIN))
        else:
            weights[prefix + "mlp.gate_proj.weight"] = _linear(gen, intermediate_size, hidden_size)
            weights[prefix + "mlp.up_proj.weight"] = _linear(gen, intermediate_size, hidden_size)
            weights[prefix + "mlp.down_proj.weight"] = _linear(gen, hidden_size, intermediate_size, RESIDUAL_GAIN)
        weights[prefix + "input_layernorm.weight"] = _norm(gen, hidden_size)
        weights[prefix + "post_attention_layernorm.weight"] = _norm(gen, hidden_size)
    final_norm = _norm(gen, hidden_size)
    if tie_word_embeddings:
        # With lm_head == embed_tokens, logit_t contains e_t . e_t > 0 for the current token t, so greedy
        # decoding would mostly echo its input; random signs on the final norm remove that self-bias.
        final_norm *= torch.randint(0, 2, (hidden_size,), generator=gen) * 2.0 - 1.0
    weights["model.norm.weight"] = final_norm
    if not tie_word_embeddings:
        lm_head_std = LOGIT_STD / math.sqrt(hidden_size)
        weights["lm_head.weight"] = _output_rows(gen, padded_vocab, real_vocab, hidden_size, lm_head_std)
    return weights


def make_config(
    arch: str,
    *,
    num_layers: int,
    hidden_size: int,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    intermediate_size: int,
    vocab_size: int,
    dtype: str,
    tie_word_embeddings: bool,
    max_position_embeddings: int,
    rope_theta: float,
    moe: MoeOptions | None = None,
) -> dict[str, Any]:
    """The ``config.json`` contents for ``arch``, in the classic (rope_theta / torch_dtype) hub layout."""
    config: dict[str, Any] = {
        "architectures": [ARCHITECTURES[arch]],
        "attention_dropout": 0.0,
        "bos_token_id": BOS_TOKEN_ID,
        "eos_token_id": EOS_TOKEN_ID,
        "hidden_act": "silu",
        "hidden_size": hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": intermediate_size,
        "max_position_embeddings": max_position_embeddings,
        "model_type": arch,
        "num_attention_heads": num_heads,
        "num_hidden_layers": num_layers,
        "num_key_value_heads": num_kv_heads,
        "rms_norm_eps": 1e-5 if arch == "llama" else 1e-6,
        "rope_scaling": None,
        "rope_theta": rope_theta,
        "tie_word_embeddings": tie_word_embeddings,
        "torch_dtype": dtype,
        "use_cache": True,
        "vocab_size": vocab_size,
    }
    if arch == "llama":
        config.update(attention_bias=False, head_dim=head_dim, mlp_bias=False, pretraining_tp=1)
    else:
        # Qwen2 q/k/v biases are implied by the architecture (there is no config switch for them).
        config.update(max_window_layers=num_layers, sliding_window=None, use_sliding_window=False)
    if arch in ("qwen3", "qwen3_moe"):
        config.update(attention_bias=False, head_dim=head_dim)
    if moe is not None:
        config.update(moe.config_entries())
    elif arch == "qwen2" and head_dim != hidden_size // num_heads:
        config["head_dim"] = head_dim
    return config


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    # Sorted keys + fixed formatting (as HF's save_pretrained does) keep the bytes stable across runs.
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _shard(tensors: dict[str, torch.Tensor], max_bytes: int | None) -> list[dict[str, torch.Tensor]]:
    """Split tensors in order into shards of at most ``max_bytes`` (a lone larger tensor gets its own)."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    shard_bytes = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if max_bytes is not None and shards[-1] and shard_bytes + nbytes > max_bytes:
            shards.append({})
            shard_bytes = 0
        shards[-1][name] = tensor
        shard_bytes += nbytes
    return shards


def write_weights(out: Path, tensors: dict[str, torch.Tensor], max_shard_size: int | str | None) -> list[str]:
    """Write safetensors file(s) (+ HF index json when sharded); returns the written file names."""
    for stale in [*out.glob("model*.safetensors"), out / "model.safetensors.index.json"]:
        # A previous build with other sharding would leave files HF might pick up instead of ours.
        stale.unlink(missing_ok=True)
    max_bytes = None if max_shard_size is None else parse_size(max_shard_size)
    shards = _shard(tensors, max_bytes)
    if len(shards) == 1:
        save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
        return ["model.safetensors"]
    names = [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    weight_map: dict[str, str] = {}
    for name, shard in zip(names, shards):
        save_file(shard, str(out / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    index = {
        "metadata": {
            "total_parameters": sum(t.numel() for t in tensors.values()),
            "total_size": sum(t.numel() * t.element_size() for t in tensors.values()),
        },
        "weight_map": weight_map,
    }
    _write_json(out / "model.safetensors.index.json", index)
    return [*names, "model.safetensors.index.json"]


def build_tiny_model(
    arch: str,
    out: str | Path,
    *,
    num_layers: int = 2,
    hidden_size: int = 64,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    head_dim: int | None = None,
    intermediate_size: int = 128,
    vocab_size: int = 512,
    dtype: str = "float32",
    seed: int = 0,
    tie_word_embeddings: bool = False,
    max_shard_size: int | str | None = None,
    max_position_embeddings: int = 2048,
    rope_theta: float = 10000.0,
    generation_config: dict[str, Any] | None = None,
    num_experts: int = 8,
    num_experts_per_tok: int = 2,
    moe_intermediate_size: int = 32,
    norm_topk_prob: bool = True,
    decoder_sparse_step: int = 1,
    mlp_only_layers: tuple[int, ...] = (),
) -> TinyModelSummary:
    """Like :func:`make_tiny_model`, but return a :class:`TinyModelSummary` of what was written."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown arch {arch!r}; choose one of {sorted(ARCHITECTURES)}")
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}")
    if num_heads % num_kv_heads != 0:
        raise ValueError("num_heads must be a multiple of num_kv_heads")
    if head_dim is None:
        if hidden_size % num_heads != 0:
            raise ValueError("hidden_size must be divisible by num_heads unless head_dim is given")
        head_dim = hidden_size // num_heads
    if head_dim % 2 != 0:
        raise ValueError("head_dim must be even for rotary embeddings")
    moe = None
    if arch == "qwen3_moe":
        moe = MoeOptions(
            num_experts,
            num_experts_per_tok,
            moe_intermediate_size,
            norm_topk_prob,
            decoder_sparse_step,
            tuple(mlp_only_layers),
        )
        moe.validate()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)

    tokenizer = train_tokenizer(vocab_size)
    real_vocab = tokenizer.get_vocab_size()
    # A small corpus may not support the requested number of merges; pad from whichever is larger so
    # the embedding always covers the requested size and every real token id.
    padded_vocab = _pad_vocab(max(vocab_size, real_vocab))
    shapes = dict(
        num_layers=num_layers,
        hidden_size=hidden_size,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        intermediate_size=intermediate_size,
    )
    weights = make_weights(
        arch,
        **shapes,
        padded_vocab=padded_vocab,
        real_vocab=real_vocab,
        tie_word_embeddings=tie_word_embeddings,
        seed=seed,
        moe=moe,
    )
    torch_dtype = DTYPES[dtype]
    tensors = {name: w.to(torch_dtype).contiguous() for name, w in weights.items()}
    files = write_weights(out, tensors, max_shard_size)

    tokenizer.save(str(out / "tokenizer.json"), pretty=True)
    _write_json(out / "tokenizer_config.json", make_tokenizer_config(max_position_embeddings))
    generation = {
        "bos_token_id": BOS_TOKEN_ID,
        "eos_token_id": EOS_TOKEN_ID,
        "pad_token_id": PAD_TOKEN_ID,
        **(generation_config or {}),  # e.g. sampling defaults, as Qwen3 ships temperature/top_p/top_k
    }
    _write_json(out / "generation_config.json", generation)
    config = make_config(
        arch,
        **shapes,
        vocab_size=padded_vocab,
        dtype=dtype,
        tie_word_embeddings=tie_word_embeddings,
        max_position_embeddings=max_position_embeddings,
        rope_theta=rope_theta,
        moe=moe,
    )
    # config.json goes last: its presence marks a complete directory (see ensure_tiny_model).
    _write_json(out / "config.json", config)
    files += ["tokenizer.json", "tokenizer_config.json", "generation_config.json", "config.json"]
    num_parameters = sum(t.numel() for t in tensors.values())
    return TinyModelSummary(path=out, num_parameters=num_parameters, files=tuple(sorted(files)))


def make_tiny_model(arch: str, out: str | Path, **options: Any) -> Path:
    """Write a tiny random ``arch`` model directory to ``out`` and return its path.

    ``options`` are the keyword arguments of :func:`build_tiny_model` (the CLI flags in snake_case).
    """
    return build_tiny_model(arch, out, **options).path


def ensure_tiny_model(arch: str, out: str | Path, **options: Any) -> Path:
    """Build the model into ``out`` unless ``out/config.json`` already exists; return ``out``."""
    out = Path(out)
    if (out / "config.json").exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename into place, so concurrent callers (e.g. pytest-xdist workers)
    # never observe a half-written directory.
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp's 0700 would otherwise survive the rename
    try:
        make_tiny_model(arch, tmp, **options)
        try:
            # Replaces `out` only if it is missing or an empty directory.
            os.rename(tmp, out)
        except OSError:
            if not (out / "config.json").exists():
                # `out` is a non-empty directory without a model: build in place.
                make_tiny_model(arch, out, **options)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m sglang.tools.make_tiny_model",
        description="Build a tiny, deterministic, randomly initialised HF model directory for tests.",
    )
    parser.add_argument("--arch", required=True, choices=sorted(ARCHITECTURES))
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    parser.add_argument("--num-layers", type=int, default=2)
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--num-heads", type=int, default=4)
    parser.add_argument("--num-kv-heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=None, help="default: hidden-size / num-heads")
    parser.add_argument("--intermediate-size", type=int, default=128)
    parser.add_argument(
        "--vocab-size",
        type=int,
        default=512,
        help="trained BPE vocab size incl. special tokens; config.vocab_size is padded to a multiple of 8",
    )
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tie-word-embeddings", action="store_true")
    parser.add_argument(
        "--max-shard-size",
        default=None,
        help="e.g. 100KB or 2MB; larger weights are split into HF-style shards (default: one file)",
    )
    parser.add_argument("--max-position-embeddings", type=int, default=2048)
    parser.add_argument("--rope-theta", type=float, default=10000.0)
    parser.add_argument(
        "--generation-config",
        type=json.loads,
        default=None,
        help='JSON object of extra generation_config.json keys, e.g. \'{"temperature": 0.6, "top_k": 20}\'',
    )
    moe = parser.add_argument_group("qwen3_moe only")
    moe.add_argument("--num-experts", type=int, default=8)
    moe.add_argument("--num-experts-per-tok", type=int, default=2)
    moe.add_argument("--moe-intermediate-size", type=int, default=32)
    moe.add_argument("--no-norm-topk-prob", dest="norm_topk_prob", action="store_false")
    moe.add_argument("--decoder-sparse-step", type=int, default=1)
    moe.add_argument(
        "--mlp-only-layers", type=lambda s: tuple(int(x) for x in s.split(",") if x), default=(), help="e.g. 0,3"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """CLI entry point."""
    args = vars(_parse_args(argv))
    summary = build_tiny_model(args.pop("arch"), args.pop("out"), **args)
    print(summary.describe())


if __name__ == "__main__":
    main()
