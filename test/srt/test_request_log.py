"""--log-requests-level: what each level puts in the Receive and Finish lines (real tokenizer, real logging)."""

from __future__ import annotations

import logging

import pytest
from transformers import AutoTokenizer

from sglang.srt.metrics.request_log import OUTPUT_CHARS_AT_LEVEL_2, RequestLogger
from sglang.srt.sampling.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir("llama"))


def lines(caplog, tokenizer, level: int, output_ids: list[int]) -> tuple[str, str]:
    prompt_ids = tokenizer.encode("the secret prompt")
    logger = RequestLogger(level, tokenizer)
    params = SamplingParams(max_new_tokens=7, temperature=0.5)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="sglang.requests"):
        logger.received("r1", prompt_ids, params)
        logger.finished("r1", len(prompt_ids), output_ids, 2, {"type": "stop", "matched": 2}, 0.5, 0.1)
    receive, finish = (r.getMessage() for r in caplog.records)
    return receive, finish


@pytest.mark.parametrize("level", [0, 1, 2, 3])
def test_levels(caplog, tokenizer, level):
    output_ids = tokenizer.encode("an answer", add_special_tokens=False)
    receive, finish = lines(caplog, tokenizer, level, output_ids)
    assert receive.startswith("Receive: rid=r1, prompt_tokens=")
    assert f"completion_tokens={len(output_ids)}, cached_tokens=2" in finish and "latency=0.500s, ttft=0.100s" in finish
    assert ("sampling_params={'max_new_tokens': 7, 'temperature': 0.5}" in receive) == (level >= 1)
    assert ("output=" in finish) == (level >= 2)
    assert ("secret prompt" in receive) == (level == 3)


def test_level_2_cuts_long_outputs_level_3_does_not(caplog, tokenizer):
    output_ids = tokenizer.encode("word " * 3000, add_special_tokens=False)
    _, finish = lines(caplog, tokenizer, 2, output_ids)
    assert finish.endswith("...(cut)'") and len(finish) < OUTPUT_CHARS_AT_LEVEL_2 + 400
    _, finish = lines(caplog, tokenizer, 3, output_ids)
    assert len(finish) > 3 * OUTPUT_CHARS_AT_LEVEL_2
