"""The offline Engine end to end: HF-equal greedy output at TP 1 and 2, batching, radix cache, sampling."""

from __future__ import annotations

import os
import signal
import time

import pytest

import sglang
from sglang.test.hf_reference import hf_greedy

PROMPTS = [
    "Hello",
    "The quick brown fox jumps over the lazy dog.",
    "Once upon a time, in a land far away, there lived a",
    "1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23 24 25 26 27 28 29 30",
]
GREEDY = {"temperature": 0, "max_new_tokens": 32, "ignore_eos": True}


def _token_prompts(model_path: str) -> list[list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    return [tok.encode(p) for p in PROMPTS]


@pytest.mark.parametrize(
    "arch,tp,options",
    [
        ("llama", 1, {}),
        ("qwen2", 1, {}),
        ("qwen3", 1, {}),
        ("llama", 2, {}),
        ("qwen2", 2, {}),
        ("qwen3", 2, {"tie_word_embeddings": True}),
    ],
)
def test_greedy_matches_hf(tiny_model_dir, arch, tp, options):
    path = tiny_model_dir(arch, **options)
    prompts = _token_prompts(path)
    expected = hf_greedy(path, prompts, 32)
    with sglang.Engine(model_path=path, tp_size=tp) as engine:
        outs = engine.generate(input_ids=prompts, sampling_params=GREEDY)
    assert [o["output_ids"] for o in outs] == expected
    assert all(o["meta_info"]["completion_tokens"] == 32 for o in outs)


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    with sglang.Engine(model_path=tiny_model_dir("llama"), chunked_prefill_size=64) as eng:
        yield eng


def test_concurrent_requests_equal_solo_runs(engine):
    prompts = [f"Request {i}: " + "word " * (3 * i) for i in range(16)]
    params = {"temperature": 0, "max_new_tokens": 12, "ignore_eos": True}
    engine.flush_cache()
    solo = [engine.generate(p, params)["output_ids"] for p in prompts]
    engine.flush_cache()
    batched = [o["output_ids"] for o in engine.generate(prompts, params)]
    assert batched == solo


def test_chunked_prefill_of_long_prompt_matches_hf(engine, tiny_model_dir):
    # 64-token chunks: a ~200-token prompt is prefilled in several passes.
    prompt = list(range(5, 205))
    expected = hf_greedy(tiny_model_dir("llama"), [prompt], 8)[0]
    engine.flush_cache()
    out = engine.generate(input_ids=prompt, sampling_params={**GREEDY, "max_new_tokens": 8})
    assert out["output_ids"] == expected


def test_radix_cache_reuses_prefix(engine):
    prefix = "This is a long shared system prompt that many requests repeat verbatim. " * 3
    params = {"temperature": 0, "max_new_tokens": 8, "ignore_eos": True}
    assert engine.flush_cache()
    first = engine.generate(prefix + "Question one?", params)
    before = engine.get_server_info()["cached_tokens_total"]
    second = engine.generate(prefix + "Question one?", params)
    third = engine.generate(prefix + "Another question?", params)
    assert first["meta_info"]["cached_tokens"] == 0
    assert second["meta_info"]["cached_tokens"] > 20
    assert third["meta_info"]["cached_tokens"] > 20
    assert engine.get_server_info()["cached_tokens_total"] > before
    assert second["output_ids"] == first["output_ids"]


def test_radix_cache_disabled_counts_nothing(tiny_model_dir):
    prompt = "Shared prefix shared prefix shared prefix shared prefix."
    params = {"temperature": 0, "max_new_tokens": 8, "ignore_eos": True}
    with sglang.Engine(model_path=tiny_model_dir("llama"), disable_radix_cache=True) as eng:
        a = eng.generate(prompt, params)
        b = eng.generate(prompt, params)
        assert b["meta_info"]["cached_tokens"] == 0
        assert eng.get_server_info()["cached_tokens_total"] == 0
        assert a["output_ids"] == b["output_ids"]


def test_seeded_sampling_is_reproducible(engine):
    params = {"temperature": 1.0, "top_p": 0.9, "top_k": 50, "max_new_tokens": 16, "ignore_eos": True}
    a = engine.generate("Sample me", {**params, "seed": 7})["output_ids"]
    b = engine.generate("Sample me", {**params, "seed": 7})["output_ids"]
    c = engine.generate("Sample me", {**params, "seed": 8})["output_ids"]
    assert a == b
    assert a != c
    # A seeded request gives the same tokens whatever else shares its batch.
    batch = engine.generate(["Sample me", "Other prompt", "Sample me"], [{**params, "seed": 7}, params, params])
    assert batch[0]["output_ids"] == a


def test_sampling_controls(engine):
    base = {"temperature": 0, "max_new_tokens": 16, "ignore_eos": True}
    greedy = engine.generate("Stop control", base)["output_ids"]
    stop_id = greedy[5]
    stopped = engine.generate("Stop control", {**base, "stop_token_ids": [stop_id]})
    assert stopped["output_ids"] == greedy[: greedy.index(stop_id) + 1]
    assert stopped["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop_id}
    penalized = engine.generate("Stop control", {**base, "repetition_penalty": 1.9, "frequency_penalty": 1.5})
    assert penalized["output_ids"] != greedy
    assert len(set(penalized["output_ids"])) >= len(set(greedy))
    text = engine.generate("Stop control", base)["text"]
    needle = text[3:6]
    cut = engine.generate("Stop control", {**base, "stop": [needle]})
    assert cut["meta_info"]["finish_reason"]["matched"] == needle
    assert needle not in cut["text"] and text.startswith(cut["text"])
    zero = engine.generate("Stop control", {**base, "max_new_tokens": 0})
    assert zero["output_ids"] == []


def test_streaming_is_cumulative(engine):
    params = {"temperature": 0, "max_new_tokens": 10, "ignore_eos": True}
    final = engine.generate("Stream this", params)
    chunks = list(engine.generate("Stream this", params, stream=True))
    assert chunks[-1]["output_ids"] == final["output_ids"]
    lengths = [len(c["output_ids"]) for c in chunks]
    assert lengths == sorted(lengths) and len(chunks) > 1


def test_slow_stream_consumer_gets_every_token(engine):
    # Outputs that arrive while the consumer holds a chunk must still be delivered, the last one included.
    params = {"temperature": 0, "max_new_tokens": 24, "ignore_eos": True}
    final = engine.generate("Slow reader", params)
    chunks = []
    for chunk in engine.generate("Slow reader", params, stream=True):
        chunks.append(chunk)
        time.sleep(0.05)
    assert chunks[-1]["output_ids"] == final["output_ids"]
    assert chunks[-1]["meta_info"]["finish_reason"] is not None


def test_bad_requests_name_the_problem(engine):
    with pytest.raises(ValueError, match="temperature"):
        engine.generate("x", {"temperature": -1})
    with pytest.raises(ValueError, match="top_p"):
        engine.generate("x", {"top_p": 0})
    with pytest.raises(ValueError, match="unknown sampling parameter"):
        engine.generate("x", {"temprature": 0.5})
    with pytest.raises(ValueError, match="context length"):
        engine.generate(input_ids=[1] * 5000, sampling_params={"max_new_tokens": 1})
    with pytest.raises(ValueError, match="vocabulary"):
        engine.generate(input_ids=[10**9], sampling_params={"max_new_tokens": 1})


def test_huge_weight_reads_need_truncate_size(tiny_model_dir):
    from sglang.srt.model_executor.weights_by_name import MAX_WEIGHT_ELEMENTS

    # A 270k-row embedding (17M elements) is past the limit; a whole-tensor read of it is refused, not served.
    path = tiny_model_dir("llama", vocab_size=270_000, tie_word_embeddings=True, num_layers=1)
    with sglang.Engine(model_path=path, max_total_tokens=1024) as eng:
        assert MAX_WEIGHT_ELEMENTS < 270_000 * 64
        # Without truncate_size, upstream's first 100 rows; with raw (the whole tensor) it is refused.
        assert len(eng.get_weights_by_name("model.embed_tokens.weight")) == 100
        with pytest.raises(RuntimeError, match="pass truncate_size"):
            eng.get_weights_by_name("model.embed_tokens.weight", raw=True)
        # A truncate_size above the tensor's size asks for all of it: refused the same (it used to be served).
        with pytest.raises(RuntimeError, match="pass truncate_size"):
            eng.get_weights_by_name("model.embed_tokens.weight", truncate_size=10**12)
        assert len(eng.get_weights_by_name("model.embed_tokens.weight", truncate_size=7)) == 7
        assert eng.generate("still serving", {"max_new_tokens": 2})["meta_info"]["completion_tokens"] == 2


@pytest.mark.timeout(120)
@pytest.mark.parametrize("page_size", [1, 16])
def test_request_longer_than_the_kv_pool_stops_with_a_reason(tiny_model_dir, page_size):
    """A generation that outgrows the whole KV cache ends with an abort that says why, instead of being retracted
    and prefilled again forever; the engine keeps serving."""
    with sglang.Engine(model_path=tiny_model_dir("llama"), max_total_tokens=64, page_size=page_size) as eng:
        out = eng.generate(input_ids=list(range(3, 33)), sampling_params={**GREEDY, "max_new_tokens": 200})
        reason = out["meta_info"]["finish_reason"]
        assert reason["type"] == "abort" and "raise --max-total-tokens" in reason["message"], reason
        # It ran until the pool was full: 30 prompt tokens plus outputs fill the 64 (or 4 x 16) slots.
        assert 30 + out["meta_info"]["completion_tokens"] >= 62
        assert eng.generate("still serving", {"max_new_tokens": 2})["meta_info"]["completion_tokens"] == 2


def test_n_choices_per_prompt(engine):
    params = {"temperature": 1.0, "max_new_tokens": 8, "ignore_eos": True, "seed": 3, "n": 3}
    outs = engine.generate("Many choices", params)
    assert isinstance(outs, list) and len(outs) == 3
    assert len({tuple(o["output_ids"]) for o in outs}) > 1  # seed + j per choice
    assert [o["output_ids"] for o in engine.generate("Many choices", params)] == [o["output_ids"] for o in outs]
    single = engine.generate("Many choices", {**params, "n": 1, "seed": 4})
    assert single["output_ids"] == outs[1]["output_ids"]
    batch = engine.generate(["a", "b"], {**params, "n": 2})
    assert len(batch) == 4
    with pytest.raises(ValueError, match="sampling_params.n"):
        engine.generate("x", {"n": 65})


def test_scheduler_death_is_an_error_not_an_empty_answer(tiny_model_dir):
    engine = sglang.Engine(model_path=tiny_model_dir("llama"), disable_radix_cache=True)
    try:
        proc = engine.handle.procs[0]
        long = {"max_new_tokens": 20000, "temperature": 0, "ignore_eos": True}
        # Killed once the generation is known to run (a timer raced it: the tiny model can finish its whole
        # context in under two seconds).
        with pytest.raises(RuntimeError, match=r"stopped serving: scheduler process TP0 exited with code -9"):
            for i, _ in enumerate(engine.generate("a long story", long, stream=True)):
                if i == 0:
                    os.kill(proc.pid, signal.SIGKILL)
        with pytest.raises(RuntimeError, match="TP0 exited"):
            engine.generate("and another", {"max_new_tokens": 2})
    finally:
        engine.shutdown()
