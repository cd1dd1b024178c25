"""Incremental detokenization and stop-string tails against decoding everything, on real tokenizers built here:
a byte-level BPE (GPT-2 / Llama-3 style, where one character can take several tokens) and a Metaspace one
(SentencePiece style, where a sequence's first word loses its leading space)."""

from __future__ import annotations

import random

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from sglang.srt.managers.detokenizer import IncrementalDetokenizer, tail_text

CORPUS = [
    "The seed keeps serving while the client forks its weights.",
    "Les poids arrivent déjà: très rapide, naïve façon, garçon.",
    "权重从正在服务的实例直接复制到新的实例。",
    "Emoji too: 🚀🔥🙂 and mixed ünïcödé with ß and Ω.",
    "Numbers 12345 and symbols #$%&*()[]{} <> ~ end.",
]


def _byte_level() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def _metaspace() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>"])
    tok.train_from_iterator(CORPUS * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")


TOKENIZERS = {"byte_level": _byte_level, "metaspace": _metaspace}


@pytest.fixture(scope="module", params=sorted(TOKENIZERS))
def tokenizer(request):
    return TOKENIZERS[request.param]()


def _stream(tokenizer, ids: list[int], rng: random.Random) -> list[str]:
    """Feed ids in random-sized pieces, as a stream read at varying speed sees them; every answer, final last."""
    detok = IncrementalDetokenizer(tokenizer, skip_special_tokens=True)
    answers, n = [], 0
    while n < len(ids):
        n = min(len(ids), n + rng.choice([1, 1, 1, 2, 3, 7]))
        answers.append(detok.text(ids[:n], final=n == len(ids)))
    return answers


def _check_stream(tokenizer, ids: list[int], rng: random.Random) -> None:
    answers = _stream(tokenizer, ids, rng)
    assert answers[-1] == tokenizer.decode(ids, skip_special_tokens=True)
    for earlier, later in zip(answers, answers[1:]):
        assert later.startswith(earlier), (earlier, later)  # a stream only ever appends
    assert not any(a.endswith("\ufffd") for a in answers[:-1])


def test_real_text_streams_to_the_same_text(tokenizer):
    rng = random.Random(0)
    for text in CORPUS + [" ".join(CORPUS)]:
        _check_stream(tokenizer, tokenizer.encode(text), rng)


def test_random_ids_stream_to_the_same_text(tokenizer):
    # Random ids include lone bytes of multi-byte characters, which decode to U+FFFD in the middle of the text.
    rng = random.Random(1)
    for _ in range(200):
        ids = [rng.randrange(tokenizer.vocab_size) for _ in range(rng.randrange(1, 60))]
        _check_stream(tokenizer, ids, rng)


def test_stop_string_found_at_the_same_token_as_with_the_whole_text(tokenizer):
    """The scheduler checks stop strings in the decoded end of the output only; it must stop at the same token as a
    check of the whole text would."""
    rng = random.Random(2)
    checked = 0
    for _ in range(150):
        text = rng.choice(CORPUS)
        ids = tokenizer.encode(text)
        full = tokenizer.decode(ids, skip_special_tokens=True)
        start = rng.randrange(len(full))
        stop = full[start : start + rng.randrange(1, 9)]
        if not stop.strip():
            continue

        whole = _first_stop(ids, stop, lambda prefix: tokenizer.decode(prefix, skip_special_tokens=True))
        width = len(stop)
        tail = _first_stop(ids, stop, lambda prefix, width=width: tail_text(tokenizer, prefix, width, True))
        assert tail == whole, (text, stop)
        checked += 1
    assert checked > 100


def _first_stop(ids: list[int], stop: str, check) -> int | None:
    """The shortest prefix of ids (at least 2 tokens) whose text, as check decodes it, contains stop."""
    return next((k for k in range(2, len(ids) + 1) if stop in check(ids[:k])), None)
