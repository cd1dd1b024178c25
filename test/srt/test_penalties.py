"""Repetition, frequency and presence penalties and min_new_tokens through a real server, against HF transformers
decoding greedily with the same rules: HF's repetition-penalty processor (prompt and output tokens), OpenAI's
frequency/presence definition (output tokens), and stop tokens forbidden until min_new_tokens. Rows with different
penalties and free rows share one batch; the OpenAI completions route gives what /generate gives."""

from __future__ import annotations

import openai
import pytest
import requests
import torch
from transformers import RepetitionPenaltyLogitsProcessor

from sglang.test.hf_reference import hf_model
from sglang.test.test_utils import tiny_model

PROMPTS = [[7, 8, 7, 9], [3, 141, 59, 26, 5, 141], list(range(100, 120)), [271, 82, 81, 8, 28, 18, 28, 4]]
NEW_TOKENS = 24


@pytest.fixture(scope="module")
def model_path() -> str:
    return tiny_model("llama")


@pytest.fixture(scope="module")
def server(tiny_llama_server):
    return tiny_llama_server


def hf_penalised_greedy(model_path: str, prompt: list[int], params: dict) -> list[int]:
    """Greedy decoding with HF's model and the penalties params names, stopping at a stop token once allowed."""
    model = hf_model(model_path)
    repetition = RepetitionPenaltyLogitsProcessor(params.get("repetition_penalty", 1.0))
    stop = set(params.get("stop_token_ids", []))
    ids = torch.tensor([prompt])
    out: list[int] = []
    with torch.inference_mode():
        for _ in range(params["max_new_tokens"]):
            scores = model(ids).logits[:, -1].float()
            scores = repetition(ids, scores)
            counts = torch.bincount(torch.tensor(out, dtype=torch.int64), minlength=scores.shape[-1]).float()
            scores = scores - params.get("frequency_penalty", 0) * counts
            scores = scores - params.get("presence_penalty", 0) * (counts > 0).float()
            if len(out) < params.get("min_new_tokens", 0):
                scores[:, sorted(stop)] = float("-inf")
            nxt = int(scores[0].argmax())
            out.append(nxt)
            if nxt in stop:
                break
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return out


def _generate(server, input_ids: list[list[int]], params: list[dict]) -> list[list[int]]:
    body = {"input_ids": input_ids, "sampling_params": params}
    resp = requests.post(f"{server.base_url}/generate", json=body, timeout=120)
    assert resp.status_code == 200, resp.text
    return [item["output_ids"] for item in resp.json()]


def test_one_batch_of_different_penalties_matches_hf(server, model_path):
    base = {"temperature": 0, "max_new_tokens": NEW_TOKENS, "ignore_eos": True}
    free = _generate(server, PROMPTS, [base] * len(PROMPTS))
    params = [
        {**base, "repetition_penalty": 1.6},
        {**base, "frequency_penalty": -1.5, "presence_penalty": 0.5},  # (this random model seldom repeats itself)
        base,
        {**base, "repetition_penalty": 0.8, "presence_penalty": -0.7},
        # Its greedy choices stop at once without min_new_tokens: the penalty-free first token is a stop token.
        {**base, "ignore_eos": False, "min_new_tokens": 5, "stop_token_ids": [free[0][0], free[0][2]]},
    ]
    prompts = [*PROMPTS, PROMPTS[0]]
    got = _generate(server, prompts, params)
    want = [hf_penalised_greedy(model_path, p, q) for p, q in zip(prompts, params)]
    assert got == want
    assert got[2] == free[2] and all(got[i] != free[i] for i in (0, 1, 3))  # penalties changed the greedy picks
    assert len(got[4]) >= 5 and got[4][:5] != free[0][:5]


def test_openai_completions_penalties_mean_the_same_as_on_generate(server):
    client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)
    prompt = "A list of colours: red, green, red, blue, red,"
    kwargs = {"temperature": 0, "max_tokens": 20, "frequency_penalty": -2.0, "presence_penalty": -1.5}
    completion = client.completions.create(model="default", prompt=prompt, **kwargs)
    params = {"temperature": 0, "max_new_tokens": 20, "frequency_penalty": -2.0, "presence_penalty": -1.5}
    resp = requests.post(f"{server.base_url}/generate", json={"text": prompt, "sampling_params": params}, timeout=60)
    assert completion.choices[0].text == resp.json()["text"]
    plain = client.completions.create(model="default", prompt=prompt, temperature=0, max_tokens=20)
    assert plain.choices[0].text != completion.choices[0].text  # negative penalties: it repeats itself
