"""Structured output through a real server: every answer parses against its JSON schema, regex or EBNF grammar, in
batches that mix constrained and free rows, streamed or not, on /generate and both OpenAI routes."""

from __future__ import annotations

import json
import re
from typing import Literal

import openai
import pytest
import requests
from pydantic import BaseModel, ConfigDict, Field

import sglang
from sglang.test.test_utils import kill_process_tree, popen_launch_server, tiny_model


class Pet(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # Not max_length: xgrammar 0.2.9 compiles a counted string to a character class that lets control characters
    # through, which JSON forbids unescaped (a random model finds them).
    name: str = Field(pattern=r"^[a-z]{1,6}$")
    friendly: bool
    colour: Literal["red", "green", "blue"]


SCHEMA = Pet.model_json_schema()
REGEX = r"[a-z]{3}-[0-9]{2}"
EBNF = 'root ::= "yes" | "no" | "maybe"'
PROMPTS = ["Describe a pet as JSON:", "Once upon a time there was", "Code:", "Answer:"]
GREEDY = {"temperature": 0, "max_new_tokens": 64}


@pytest.fixture(scope="module")
def model_path() -> str:
    return tiny_model("llama")


@pytest.fixture(scope="module")
def server(tiny_llama_server):
    return tiny_llama_server


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)


def _post(server, body: dict) -> requests.Response:
    return requests.post(f"{server.base_url}/generate", json=body, timeout=120)


def test_generate_batch_mixes_constrained_and_free_rows(server):
    params = [
        {**GREEDY, "json_schema": json.dumps(SCHEMA)},
        GREEDY,
        {**GREEDY, "regex": REGEX},
        {**GREEDY, "ebnf": EBNF, "temperature": 1.0, "seed": 3},
    ]
    outs = _post(server, {"text": PROMPTS, "sampling_params": params}).json()
    Pet.model_validate_json(outs[0]["text"])
    assert re.fullmatch(REGEX, outs[2]["text"]), outs[2]["text"]
    assert outs[3]["text"] in ("yes", "no", "maybe")
    for out in (outs[0], outs[2], outs[3]):
        assert out["meta_info"]["finish_reason"]["type"] == "stop"
    # The free row is what it is without constrained neighbours.
    alone = _post(server, {"text": PROMPTS[1], "sampling_params": GREEDY}).json()
    assert outs[1]["text"] == alone["text"]
    # Unconstrained, the model's own greedy answer matches none of these.
    free = _post(server, {"text": PROMPTS[2], "sampling_params": GREEDY}).json()["text"]
    assert not re.fullmatch(REGEX, free)


def test_sampled_rows_match_too(server):
    params = {"max_new_tokens": 64, "temperature": 1.0, "json_schema": json.dumps(SCHEMA), "n": 4, "seed": 11}
    for out in _post(server, {"text": PROMPTS[0], "sampling_params": params}).json():
        Pet.model_validate_json(out["text"])


def test_generate_stream_matches(server):
    body = {"text": PROMPTS[2], "sampling_params": {**GREEDY, "regex": REGEX}, "stream": True}
    with requests.post(f"{server.base_url}/generate", json=body, stream=True, timeout=120) as resp:
        events = [line[6:] for line in resp.iter_lines(decode_unicode=True) if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert re.fullmatch(REGEX, json.loads(events[-2])["text"])


def test_chat_response_format_json_schema(client, model_path):
    fmt = {"type": "json_schema", "json_schema": {"name": "pet", "schema": SCHEMA}}
    messages = [{"role": "user", "content": "Describe a pet."}]
    reply = client.chat.completions.create(model=model_path, messages=messages, temperature=0, response_format=fmt)
    Pet.model_validate_json(reply.choices[0].message.content)
    chunks = client.chat.completions.create(
        model=model_path, messages=messages, temperature=0.8, seed=5, response_format=fmt, stream=True
    )
    Pet.model_validate_json("".join(c.choices[0].delta.content or "" for c in chunks if c.choices))


def test_completions_response_format_json_object(client, model_path):
    fmt = {"type": "json_schema", "json_schema": {"name": "pet", "schema": SCHEMA}}
    out = client.completions.create(
        model=model_path, prompt=PROMPTS[0], temperature=0, max_tokens=64, extra_body={"response_format": fmt}
    )
    Pet.model_validate_json(out.choices[0].text)
    obj = client.completions.create(
        model=model_path,
        prompt=PROMPTS[0],
        temperature=0,
        max_tokens=200,
        extra_body={"response_format": {"type": "json_object"}},
    )
    assert obj.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(obj.choices[0].text), dict)


def test_bad_grammars_are_a_400_naming_the_field(server, client, model_path):
    resp = _post(server, {"text": "x", "sampling_params": {"regex": "[a-"}})
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "sampling_params.regex"
    resp = _post(server, {"text": "x", "sampling_params": {"regex": "a", "ebnf": EBNF}})
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "sampling_params.ebnf"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model=model_path,
            messages=[{"role": "user", "content": "x"}],
            response_format={"type": "json_schema", "json_schema": {"name": "bad", "schema": {"type": "nope"}}},
        )
    assert e.value.body["param"] == "response_format"


def test_grammar_backend_none_refuses(model_path):
    with sglang.Engine(model_path=model_path, grammar_backend="none") as engine:
        with pytest.raises(ValueError, match="--grammar-backend none"):
            engine.generate("x", {"json_schema": json.dumps(SCHEMA)})
        assert engine.generate("x", {"max_new_tokens": 2})["meta_info"]["completion_tokens"] == 2


def test_forked_client_gives_the_seeds_constrained_answers(server, model_path, tmp_path):
    """A client that took its weights from this server over R-Fork (NCCL; gloo on CPU) applies grammars the same."""
    from sglang.test.test_utils import config_only_copy, find_free_port

    seed_port = server.base_url.rsplit(":", 1)[1]
    client = popen_launch_server(
        config_only_copy(model_path, tmp_path / "client"),
        other_args=[
            "--load-format", "remote_instance",
            "--remote-instance-weight-loader-seed-instance-ip", "127.0.0.1",
            "--remote-instance-weight-loader-seed-instance-service-port", seed_port,
            "--remote-instance-weight-loader-send-weights-group-ports", f"[{find_free_port()}]",
        ],
    )  # fmt: skip
    try:
        body = {
            "text": PROMPTS[:3],
            "sampling_params": [{**GREEDY, "json_schema": json.dumps(SCHEMA)}, GREEDY, {**GREEDY, "regex": REGEX}],
        }
        forked = _post(client, body).json()
        assert [o["text"] for o in forked] == [o["text"] for o in _post(server, body).json()]
        Pet.model_validate_json(forked[0]["text"])
        assert re.fullmatch(REGEX, forked[2]["text"]), forked[2]["text"]
    finally:
        kill_process_tree(client.pid)


def _word_level_model(path) -> str:
    """A tiny random Llama (--load-format dummy) whose tokenizer has only the words w0..w299: no token holds an
    uppercase letter, so a grammar that needs one can never continue."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(300)}
    vocab["<unk>"] = vocab.pop("w299")
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    path.mkdir()
    tokenizer.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 300,
        "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "eos_token_id": 298, "torch_dtype": "float32",
    }  # fmt: skip
    (path / "config.json").write_text(json.dumps(config))
    return str(path)


def test_grammar_no_token_can_continue_ends_with_a_clear_reason(tmp_path):
    """A grammar that no token of the vocabulary fits ends its request with a message that says so (the row's
    mask allows nothing), not as a grammar that 'rejected token 0', and the engine goes on serving."""
    with sglang.Engine(model_path=_word_level_model(tmp_path / "m"), load_format="dummy", max_total_tokens=512) as e:
        out = e.generate("w1 w2", {"temperature": 0, "max_new_tokens": 4, "regex": "[A-Z]+"})
        reason = out["meta_info"]["finish_reason"]
        assert reason["type"] == "abort" and "no token of this model's vocabulary" in reason["message"], reason
        fits = e.generate("w1 w2", {"temperature": 0, "max_new_tokens": 4, "regex": "[a-z0-9]+"})
        assert fits["meta_info"]["completion_tokens"] == 4
