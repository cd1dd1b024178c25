"""What SGLang and vLLM users expect of the API, through a real server and the `openai` client: answers that run
to a stop condition or the context limit, sampling defaults from generation_config.json."""

from __future__ import annotations

import openai
import pytest
import requests

import sglang
from sglang.test.test_utils import kill_process_tree, popen_launch_server
from sglang.tools.make_tiny_model import ensure_tiny_model

CONTEXT = 160
# top_k 1 makes the model's default sampling greedy, which a test can see; Qwen3 ships temperature/top_p too.
GENERATION_DEFAULTS = {"temperature": 0.6, "top_p": 0.95, "top_k": 1}
MESSAGES = [{"role": "user", "content": "Tell me a long story."}]
PROMPT = "Once upon a time there was"


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    out = tmp_path_factory.mktemp("compat") / "llama-defaults"
    return str(ensure_tiny_model("llama", out, generation_config=GENERATION_DEFAULTS))


@pytest.fixture(scope="module")
def server(model_path: str):
    proc = popen_launch_server(model_path, other_args=["--context-length", str(CONTEXT)])
    yield proc
    kill_process_tree(proc.pid)


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)


def _generate(server, text: str, params: dict) -> dict:
    resp = requests.post(f"{server.base_url}/generate", json={"text": text, "sampling_params": params}, timeout=120)
    assert resp.status_code == 200, resp.text
    return resp.json()


def test_chat_without_max_tokens_runs_to_the_context_limit(client, model_path):
    resp = client.chat.completions.create(model=model_path, messages=MESSAGES, temperature=0)
    choice = resp.choices[0]
    # Before, the server's own default of 128 new tokens cut the answer short.
    assert choice.finish_reason == "length"
    assert resp.usage.prompt_tokens + resp.usage.completion_tokens == CONTEXT
    assert resp.usage.completion_tokens > 128
    capped = client.chat.completions.create(model=model_path, messages=MESSAGES, temperature=0, max_tokens=5)
    assert capped.usage.completion_tokens == 5
    newer = client.chat.completions.create(
        model=model_path, messages=MESSAGES, temperature=0, max_tokens=50, max_completion_tokens=3
    )
    assert newer.usage.completion_tokens == 3


def test_generate_null_max_new_tokens_is_unlimited_and_defaults_stay(server, client, model_path):
    out = _generate(server, PROMPT, {"temperature": 0, "max_new_tokens": None, "ignore_eos": True})
    meta = out["meta_info"]
    assert meta["prompt_tokens"] + meta["completion_tokens"] == CONTEXT
    assert meta["finish_reason"]["type"] == "length"
    default = _generate(server, PROMPT, {"temperature": 0, "ignore_eos": True})
    assert default["meta_info"]["completion_tokens"] == 128
    completion = client.completions.create(model=model_path, prompt=PROMPT, extra_body={"ignore_eos": True})
    assert completion.usage.completion_tokens == 16


def test_sampling_defaults_come_from_generation_config(server):
    greedy = _generate(server, PROMPT, {"temperature": 0, "max_new_tokens": 24, "ignore_eos": True})["text"]
    # No sampling values: generation_config.json's top_k 1 applies, so any seed gives the greedy text.
    for seed in (1, 2):
        out = _generate(server, PROMPT, {"max_new_tokens": 24, "ignore_eos": True, "seed": seed})
        assert out["text"] == greedy
    # The request's own value wins over the model's.
    own = _generate(server, PROMPT, {"max_new_tokens": 24, "ignore_eos": True, "seed": 1, "top_k": -1})
    assert own["text"] != greedy


def test_sampling_defaults_openai_ignores_generation_config(model_path):
    with sglang.Engine(model_path=model_path, sampling_defaults="openai") as engine:
        greedy = engine.generate(PROMPT, {"temperature": 0, "max_new_tokens": 24, "ignore_eos": True})["text"]
        out = engine.generate(PROMPT, {"max_new_tokens": 24, "ignore_eos": True, "seed": 1})["text"]
    assert out != greedy
