"""Write a model directory without weights (Llama-3-8B-shaped by default), for `--load-format dummy` benchmarks.

    python benchmark/serving/make_llama3_8b_dummy.py /tmp/llama3-8b-shape
    python benchmark/serving/make_llama3_8b_dummy.py /tmp/qwen3-30b-a3b --shape qwen3-30b-a3b

The tokenizer is a word-level one with one word per id of the whole vocabulary, so whatever ids random
weights produce detokenize to text and every streamed token arrives as its own chunk.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tokenizers import Tokenizer, models, pre_tokenizers

VOCAB_SIZE = 128256
BOS, EOS, UNK = "<|begin_of_text|>", "<|end_of_text|>", "<unk>"
BOS_ID, EOS_ID = 128000, 128001

CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": VOCAB_SIZE,
    "max_position_embeddings": 8192,
    "rope_theta": 500000.0,
    "rope_scaling": None,
    "rms_norm_eps": 1e-5,
    "hidden_act": "silu",
    "attention_bias": False,
    "mlp_bias": False,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "bos_token_id": BOS_ID,
    "eos_token_id": EOS_ID,
}


def write_model_dir(out: Path, config: dict | None = None) -> Path:
    """config.json plus a tokenizer covering the whole vocabulary; returns out."""
    config = dict(config or CONFIG)
    vocab_size, bos_id, eos_id = config["vocab_size"], config["bos_token_id"], config["eos_token_id"]
    unk_id = eos_id + 1 if eos_id + 1 < vocab_size and eos_id + 1 != bos_id else 0
    out.mkdir(parents=True, exist_ok=True)
    vocab = {f"w{i}": i for i in range(vocab_size)}
    for token, token_id in ((BOS, bos_id), (EOS, eos_id), (UNK, unk_id)):
        del vocab[f"w{token_id}"]
        vocab[token] = token_id
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.add_special_tokens([BOS, EOS, UNK])
    tokenizer.save(str(out / "tokenizer.json"))
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "unk_token": UNK,
        "model_max_length": config["max_position_embeddings"],
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out


def shapes() -> dict[str, dict]:
    """The shapes this script writes, by name (the MoE one is bench_moe's Qwen3-30B-A3B config)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_moe import QWEN3_30B_A3B

    return {"llama3-8b": CONFIG, "qwen3-30b-a3b": QWEN3_30B_A3B}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--shape", default="llama3-8b", choices=["llama3-8b", "qwen3-30b-a3b"])
    args = parser.parse_args()
    print(write_model_dir(args.out_dir, shapes()[args.shape]))
