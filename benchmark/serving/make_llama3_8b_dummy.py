"""Write a Llama-3-8B-shaped model directory without weights, for `--load-format dummy` benchmarks.

    python benchmark/serving/make_llama3_8b_dummy.py /tmp/llama3-8b-shape

The tokenizer is a word-level one with one word per id of the 128256-token vocabulary, so whatever ids random
weights produce detokenize to text and every streamed token arrives as its own chunk.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tokenizers import Tokenizer, models, pre_tokenizers

VOCAB_SIZE = 128256
BOS, EOS, UNK = "<|begin_of_text|>", "<|end_of_text|>", "<unk>"
BOS_ID, EOS_ID, UNK_ID = 128000, 128001, 128002

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


def write_model_dir(out: Path) -> Path:
    """config.json plus a tokenizer covering the whole vocabulary; returns out."""
    out.mkdir(parents=True, exist_ok=True)
    vocab = {f"w{i}": i for i in range(VOCAB_SIZE)}
    for token, token_id in ((BOS, BOS_ID), (EOS, EOS_ID), (UNK, UNK_ID)):
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
        "model_max_length": CONFIG["max_position_embeddings"],
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    (out / "config.json").write_text(json.dumps(CONFIG, indent=2) + "\n")
    return out


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: make_llama3_8b_dummy.py OUT_DIR")
    print(write_model_dir(Path(sys.argv[1])))
