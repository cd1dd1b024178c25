"""The OpenAI-compatible API of a real server, driven by the official `openai` client."""

from __future__ import annotations

import openai
import pytest
import requests
from transformers import AutoTokenizer

import sglang
from sglang.test.test_utils import kill_process_tree, popen_launch_server, tiny_model

PROMPTS = ["The capital of France is", "Once upon a time there was"]
MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."}]
MAX_TOKENS = 16
GREEDY = {"temperature": 0, "max_new_tokens": MAX_TOKENS}


@pytest.fixture(scope="module")
def model_path() -> str:
    return tiny_model("llama")


@pytest.fixture(scope="module")
def chat_ids(model_path: str) -> list[int]:
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    return tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True, return_dict=False)


@pytest.fixture(scope="module")
def reference(model_path: str, chat_ids: list[int]) -> dict:
    """Greedy outputs of the offline Engine, computed before the server starts (the CPU has 2 cores)."""
    with sglang.Engine(model_path=model_path) as engine:
        return {
            "completions": [engine.generate(p, GREEDY) for p in PROMPTS],
            "chat": engine.generate(input_ids=chat_ids, sampling_params=GREEDY),
        }


@pytest.fixture(scope="module")
def server(model_path: str, reference: dict):
    proc = popen_launch_server(model_path)
    yield proc
    kill_process_tree(proc.pid)


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)


def test_models(client, model_path):
    models = client.models.list().data
    assert [m.id for m in models] == [model_path]


def test_completions_match_engine(client, model_path, reference):
    for prompt, ref in zip(PROMPTS, reference["completions"]):
        resp = client.completions.create(model=model_path, prompt=prompt, temperature=0, max_tokens=MAX_TOKENS)
        choice = resp.choices[0]
        assert choice.text == ref["text"] and choice.finish_reason == "length"
        assert resp.usage.prompt_tokens == ref["meta_info"]["prompt_tokens"]
        assert resp.usage.completion_tokens == ref["meta_info"]["completion_tokens"] == MAX_TOKENS
        assert resp.usage.total_tokens == resp.usage.prompt_tokens + MAX_TOKENS
    batch = client.completions.create(model=model_path, prompt=PROMPTS, temperature=0, max_tokens=MAX_TOKENS)
    assert [c.text for c in batch.choices] == [r["text"] for r in reference["completions"]]
    assert [c.index for c in batch.choices] == [0, 1]


def test_completions_stream(client, model_path, reference):
    ref = reference["completions"][0]
    chunks = list(
        client.completions.create(
            model=model_path,
            prompt=PROMPTS[0],
            temperature=0,
            max_tokens=MAX_TOKENS,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == ref["text"]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage.prompt_tokens == ref["meta_info"]["prompt_tokens"]
    assert usage.completion_tokens == MAX_TOKENS


def test_chat_matches_engine(client, model_path, reference, chat_ids):
    ref = reference["chat"]
    resp = client.chat.completions.create(model=model_path, messages=MESSAGES, temperature=0, max_tokens=MAX_TOKENS)
    assert resp.object == "chat.completion"
    assert resp.choices[0].message.role == "assistant"
    assert resp.choices[0].message.content == ref["text"]
    assert resp.usage.prompt_tokens == len(chat_ids) == ref["meta_info"]["prompt_tokens"]
    assert resp.usage.completion_tokens == MAX_TOKENS

    stream = client.chat.completions.create(
        model=model_path,
        messages=MESSAGES,
        temperature=0,
        max_tokens=MAX_TOKENS,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ref["text"]
    assert chunks[-1].usage.prompt_tokens == len(chat_ids)
    assert chunks[-1].usage.completion_tokens == MAX_TOKENS


def test_n_choices_with_seed(client, model_path, chat_ids):
    kwargs = dict(model=model_path, messages=MESSAGES, temperature=1.0, max_tokens=8, n=3, seed=7)
    resp = client.chat.completions.create(**kwargs, extra_body={"ignore_eos": True})
    assert [c.index for c in resp.choices] == [0, 1, 2]
    texts = [c.message.content for c in resp.choices]
    assert len(set(texts)) > 1  # each choice samples on its own
    assert resp.usage.prompt_tokens == len(chat_ids) and resp.usage.completion_tokens == 24
    again = client.chat.completions.create(**kwargs, extra_body={"ignore_eos": True})
    assert [c.message.content for c in again.choices] == texts  # the seed makes sampling reproducible

    streamed = ["", "", ""]
    for chunk in client.chat.completions.create(**kwargs, stream=True, extra_body={"ignore_eos": True}):
        for choice in chunk.choices:
            streamed[choice.index] += choice.delta.content or ""
    assert streamed == texts

    completions = client.completions.create(
        model=model_path, prompt=PROMPTS, max_tokens=4, n=2, seed=1, extra_body={"ignore_eos": True}
    )
    assert [c.index for c in completions.choices] == [0, 1, 2, 3]
    assert completions.usage.completion_tokens == 16


def test_stop_strings(client, model_path, reference):
    ref = reference["completions"][1]["text"]
    # A stop string from the middle of the greedy output, free of replacement characters.
    start = next(i for i in range(3, len(ref) - 2) if "\ufffd" not in ref[i : i + 2] and ref[i : i + 2].strip())
    stop = ref[start : start + 2]
    expected = ref[: ref.index(stop)]
    kwargs = dict(model=model_path, prompt=PROMPTS[1], temperature=0, max_tokens=MAX_TOKENS)
    resp = client.completions.create(**kwargs, stop=[stop, "never-produced"])
    assert resp.choices[0].text == expected and resp.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in client.completions.create(**kwargs, stop=stop, stream=True))
    assert streamed == expected


def test_logprobs(client, model_path):
    resp = client.completions.create(model=model_path, prompt=PROMPTS[0], temperature=0, max_tokens=4, logprobs=2)
    logprobs = resp.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == 4
    for logprob, top in zip(logprobs.token_logprobs, logprobs.top_logprobs):
        assert len(top) <= 2 and logprob <= 0 and max(top.values()) == pytest.approx(logprob, abs=1e-5)
    chat = client.chat.completions.create(
        model=model_path, messages=MESSAGES, temperature=0, max_tokens=4, logprobs=True, top_logprobs=2
    )
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens == 4
    for item in content:
        assert len(item.top_logprobs) == 2 and item.logprob == pytest.approx(item.top_logprobs[0].logprob, abs=1e-5)
        assert item.bytes == list(item.token.encode())


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"temperature": -1}, "temperature"),
        ({"top_p": 2}, "top_p"),
        ({"max_tokens": -5}, "max_tokens"),
        ({"n": 0}, "n"),
        ({"temperature": "hot"}, "temperature"),
        # Unknown fields are ignored (test_openai_compat.py); one whose meaning cannot be honoured is a 400.
        ({"extra_body": {"suffix": "and so on"}}, "suffix"),
        ({"extra_body": {"top_k": 0}}, "top_k"),
    ],
)
def test_bad_requests_are_400(client, model_path, kwargs, param):
    for create, prompt in (
        (client.completions.create, {"prompt": "hi"}),
        (client.chat.completions.create, {"messages": MESSAGES}),
    ):
        with pytest.raises(openai.BadRequestError) as info:
            create(model=model_path, **prompt, **kwargs)
        assert info.value.param == param and info.value.type == "BadRequestError" and info.value.code == "400"


def test_prompt_longer_than_context_is_400(client, model_path):
    long_text = "hello " * 1000
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=model_path, prompt=long_text, max_tokens=4)
    assert info.value.param == "prompt" and "context length" in info.value.message
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=model_path, messages=[{"role": "user", "content": long_text}], stream=True)
    assert info.value.param == "messages" and "context length" in info.value.message


def test_malformed_json_and_missing_fields_are_400(server):
    url = f"{server.base_url}/v1/chat/completions"
    resp = requests.post(url, data=b"{not json", headers={"Content-Type": "application/json"}, timeout=30)
    assert resp.status_code == 400 and "Malformed JSON" in resp.json()["error"]["message"]
    resp = requests.post(url, json={"model": "x"}, timeout=30)
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "messages"
    resp = requests.post(url, json={"messages": [{"role": "wizard", "content": "hi"}]}, timeout=30)
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "messages"
