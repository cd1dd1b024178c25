"""The tiny models' tokenizer: a deterministic byte-level BPE trained on a bundled text, ChatML template."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE
from tokenizers.trainers import BpeTrainer

# Special tokens take the first ids, in this order (the BPE trainer assigns them before the byte alphabet).
ENDOFTEXT_TOKEN = "<|endoftext|>"
IM_START_TOKEN = "<|im_start|>"
IM_END_TOKEN = "<|im_end|>"
SPECIAL_TOKENS: tuple[str, ...] = (ENDOFTEXT_TOKEN, IM_START_TOKEN, IM_END_TOKEN)
ENDOFTEXT_ID, IM_START_ID, IM_END_ID = 0, 1, 2
# Qwen-style ids: <|endoftext|> doubles as bos and pad, the chat turn terminator <|im_end|> is eos.
BOS_TOKEN_ID = ENDOFTEXT_ID
EOS_TOKEN_ID = IM_END_ID
PAD_TOKEN_ID = ENDOFTEXT_ID

# ChatML; list-valued contents (OpenAI multi-part messages) contribute their text parts.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string %}"
    "{{- message['content'] }}"
    "{%- else %}"
    "{%- for part in message['content'] %}"
    "{%- if part['type'] == 'text' %}{{- part['text'] }}{%- endif %}"
    "{%- endfor %}"
    "{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# transformers>=5 rebuilds qwen2/qwen3 tokenizers with this exact normalizer + pre-tokenizer (ignoring the
# ones in tokenizer.json), so tokenizer.json uses the same pipeline for every arch: then HF's tokenizer and a
# plain `tokenizers.Tokenizer.from_file` always agree.
PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
CORPUS_PATH = Path(__file__).with_name("tiny_corpus.txt")


def train_tokenizer(vocab_size: int) -> Tokenizer:
    """Train a deterministic byte-level BPE tokenizer of (at most) ``vocab_size`` tokens on the bundled corpus."""
    min_size = len(SPECIAL_TOKENS) + len(pre_tokenizers.ByteLevel.alphabet())
    if vocab_size < min_size:
        raise ValueError(f"vocab_size must be >= {min_size} (special tokens + 256 byte symbols)")
    tokenizer = Tokenizer(BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    trainer = BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS_PATH.read_text(encoding="utf-8").splitlines(keepends=True), trainer)
    for token_id, token in enumerate(SPECIAL_TOKENS):
        assert tokenizer.token_to_id(token) == token_id, "special token ids must be 0..2"
    return tokenizer


def make_tokenizer_config(model_max_length: int) -> dict[str, Any]:
    """The ``tokenizer_config.json`` contents (ChatML template, eos = ``<|im_end|>``, no bos prepended)."""
    added_tokens = {
        str(token_id): {
            "content": token,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for token_id, token in enumerate(SPECIAL_TOKENS)
    }
    return {
        "add_prefix_space": False,
        "added_tokens_decoder": added_tokens,
        "bos_token": None,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": IM_END_TOKEN,
        "errors": "replace",
        "model_max_length": model_max_length,
        "pad_token": ENDOFTEXT_TOKEN,
        "split_special_tokens": False,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": None,
    }
