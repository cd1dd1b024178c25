"""What SGLang and vLLM users expect of the API, through a real server and the `openai` client: answers that run
to a stop condition or the context limit, sampling defaults from generation_config.json, requests with the fields
clients routinely send, --chat-template."""

from __future__ import annotations

import re
from pathlib import Path

import openai
import pytest
import requests
from transformers import AutoTokenizer

import sglang
from sglang.test.test_utils import kill_process_tree, popen_launch_server
from sglang.tools.make_tiny_model import ensure_tiny_model

CONTEXT = 160
# top_k 1 makes the model's default sampling greedy, which a test can see; Qwen3 ships temperature/top_p too.
GENERATION_DEFAULTS = {"temperature": 0.6, "top_p": 0.95, "top_k": 1}
MESSAGES = [{"role": "user", "content": "Tell me a long story."}]
PROMPT = "Once upon a time there was"
# A Qwen3-style template: enable_thinking=False (through chat_template_kwargs) adds an empty think block.
THINKING_TEMPLATE = (
    "{%- for m in messages %}{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and not enable_thinking %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    out = tmp_path_factory.mktemp("compat") / "llama-defaults"
    return str(ensure_tiny_model("llama", out, generation_config=GENERATION_DEFAULTS))


@pytest.fixture(scope="module")
def template_file(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("templates") / "thinking.jinja"
    path.write_text(THINKING_TEMPLATE)
    return str(path)


@pytest.fixture(scope="module")
def server(model_path: str, template_file: str):
    args = ["--context-length", str(CONTEXT), "--chat-template", template_file]
    proc = popen_launch_server(model_path, other_args=args)
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


def _chat(client, model_path: str, **kwargs):
    return client.chat.completions.create(model=model_path, messages=MESSAGES, temperature=0, max_tokens=6, **kwargs)


def test_chat_template_file_and_kwargs(client, model_path):
    plain = _chat(client, model_path)
    no_think = _chat(client, model_path, extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    think_block = len(tokenizer.encode("<think>\n\n</think>\n\n", add_special_tokens=False))
    assert no_think.usage.prompt_tokens == plain.usage.prompt_tokens + think_block
    with pytest.raises(openai.BadRequestError) as e:
        _chat(client, model_path, extra_body={"chat_template_kwargs": {"tokenize": True}})
    assert e.value.body["param"] == "chat_template_kwargs"


def test_routine_fields_are_accepted_and_change_nothing(client, model_path):
    plain = _chat(client, model_path).choices[0].message.content
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}
    busy = _chat(
        client,
        model_path,
        user="u-1",
        metadata={"k": "v"},
        store=False,
        tools=[tool],
        tool_choice="none",
        parallel_tool_calls=False,
        response_format={"type": "text"},
    )
    assert busy.choices[0].message.content == plain


@pytest.mark.parametrize(
    "extra, param",
    [
        ({"tool_choice": "required", "tools": [{"type": "function", "function": {"name": "f"}}]}, "tool_choice"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ({"tool_choice": {"type": "function", "function": {"name": "f"}}}, "tool_choice"),
        ({"modalities": ["text", "audio"]}, "modalities"),
    ],
)
def test_fields_that_cannot_be_honoured_are_a_400_naming_them(client, model_path, extra, param):
    with pytest.raises(openai.BadRequestError) as e:
        _chat(client, model_path, extra_body=extra)
    assert e.value.body["param"] == param and param in e.value.body["message"]


def test_unknown_fields_are_ignored_with_one_warning(server, client, model_path):
    plain = _chat(client, model_path).choices[0].message.content
    for _ in range(2):
        reply = _chat(client, model_path, extra_body={"frobnicate_level": 3, "stream_options": None})
        assert reply.choices[0].message.content == plain
    log = Path(server.log_path).read_text()
    assert len(re.findall(r"unknown request field 'frobnicate_level'", log)) == 1, log[-2000:]


def test_logit_bias(server, client, model_path):
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    forced = tokenizer.encode(" story", add_special_tokens=False)[0]
    out = client.completions.create(
        model=model_path, prompt=PROMPT, temperature=0, max_tokens=4, logit_bias={str(forced): 100}
    )
    assert tokenizer.encode(out.choices[0].text, add_special_tokens=False) == [forced] * 4
    greedy = _generate(server, PROMPT, {"temperature": 0, "max_new_tokens": 1})["output_ids"][0]
    banned = _generate(server, PROMPT, {"temperature": 0, "max_new_tokens": 1, "logit_bias": {str(greedy): -100}})
    assert banned["output_ids"][0] != greedy
    resp = requests.post(
        f"{server.base_url}/generate",
        json={"text": PROMPT, "sampling_params": {"logit_bias": {"999999": 5}}},
        timeout=30,
    )
    assert resp.status_code == 400 and "logit_bias" in resp.json()["error"]["message"]


def test_echo(client, model_path):
    kwargs = dict(model=model_path, prompt=PROMPT, temperature=0, max_tokens=5)
    plain = client.completions.create(**kwargs).choices[0].text
    echoed = client.completions.create(echo=True, **kwargs).choices[0].text
    assert echoed == PROMPT + plain
    streamed = "".join(c.choices[0].text for c in client.completions.create(echo=True, stream=True, **kwargs))
    assert streamed == PROMPT + plain
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(echo=True, logprobs=1, **kwargs)
    assert e.value.body["param"] == "echo"


def test_model_card_by_id(server, client, model_path):
    assert client.models.retrieve(model_path).id == model_path
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


def test_tokenize_and_detokenize(server, model_path):
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    url = server.base_url
    one = requests.post(f"{url}/tokenize", json={"prompt": PROMPT}, timeout=10).json()
    assert one == {"tokens": tokenizer.encode(PROMPT), "count": len(tokenizer.encode(PROMPT)), "max_model_len": CONTEXT}
    many = requests.post(f"{url}/tokenize", json={"prompt": [PROMPT, "Hi"], "add_special_tokens": False}, timeout=10)
    ids = [tokenizer.encode(t, add_special_tokens=False) for t in (PROMPT, "Hi")]
    assert many.json()["tokens"] == ids
    text = requests.post(f"{url}/detokenize", json={"tokens": ids[0]}, timeout=10).json()["text"]
    assert text == tokenizer.decode(ids[0]) and PROMPT in text
    assert requests.post(f"{url}/detokenize", json={"tokens": ids}, timeout=10).json()["text"][1] == "Hi"
    bad = requests.post(f"{url}/detokenize", json={"tokens": [10**9]}, timeout=10)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"


def test_get_load(server):
    load = requests.get(f"{server.base_url}/get_load", timeout=10).json()
    assert len(load) == 1 and load[0]["num_reqs"] == 0 and load[0]["max_total_num_tokens"] > 0


def test_chat_template_names(model_path):
    from sglang.srt.server_args import ServerArgs, ServerArgsError

    assert ServerArgs(model_path=model_path, chat_template="chatml", device="cpu").chat_template == "chatml"
    with pytest.raises(ServerArgsError, match="neither a file nor a built-in template"):
        ServerArgs(model_path=model_path, chat_template="no-such-template", device="cpu")
