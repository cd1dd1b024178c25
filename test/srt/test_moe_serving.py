"""Qwen3-MoE through the whole stack (HTTP, OpenAI, Engine, radix cache, chunked prefill, TP 1 and 2) and
R-Fork of it over NCCL (gloo here) and Mooncake TransferEngine (TCP), checked bit-exact against the seed."""

from __future__ import annotations

import functools
from pathlib import Path

import openai
import pytest
import requests

import sglang
from sglang.srt.remote_instance.mooncake_guard import mooncake_available
from sglang.test.hf_reference import hf_greedy
from sglang.test.rfork_utils import fork_client_args, rank_checksums
from sglang.test.test_utils import config_only_copy, find_free_port, kill_process_tree, popen_launch_server

needs_mooncake = pytest.mark.skipif(not mooncake_available(), reason="mooncake-transfer-engine is not installed")
MODEL = {"num_layers": 3, "mlp_only_layers": (1,), "num_kv_heads": 1, "head_dim": 32}
ENV = {"MC_LOG_LEVEL": "WARNING"}
# A prompt longer than two prefill chunks, so chunked prefill and then the radix cache both take part.
PROMPT_IDS = [(17 * i + 5) % 480 + 10 for i in range(40)]
NEW_TOKENS = 12
GREEDY = {"temperature": 0, "max_new_tokens": NEW_TOKENS, "ignore_eos": True}
SERVE = ["--chunked-prefill-size", "16", "--max-total-tokens", "4096"]


def _te_seed_args() -> list[str]:
    if not mooncake_available():
        return []
    return ["--remote-instance-weight-loader-start-seed-via-transfer-engine", "--engine-info-bootstrap-port",
            str(find_free_port())]  # fmt: skip


def _client_args(seed_url: str, backend: str, tp: int) -> list[str]:
    args = fork_client_args(seed_url, backend, "--tp-size", str(tp), *SERVE, timeout=60)
    if backend == "nccl":
        args += ["--remote-instance-weight-loader-send-weights-group-ports", str([find_free_port() for _ in range(tp)])]
    return args


@functools.cache
def _hf_tokens(path: str) -> list[int]:
    return hf_greedy(path, [PROMPT_IDS], NEW_TOKENS)[0]


def _generate(url: str, **body: object) -> dict:
    r = requests.post(f"{url}/generate", json={"input_ids": PROMPT_IDS, "sampling_params": GREEDY, **body}, timeout=60)
    r.raise_for_status()
    return r.json()


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir) -> str:
    return tiny_model_dir("qwen3_moe", **MODEL)


@pytest.fixture(scope="module")
def seed(model_dir):
    proc = popen_launch_server(model_dir, other_args=[*SERVE, *_te_seed_args()], env=ENV)
    yield proc
    kill_process_tree(proc.pid)


def test_http_greedy_equals_hf_through_chunked_prefill_then_radix_cache(seed, model_dir):
    first = _generate(seed.base_url)
    assert first["output_ids"] == _hf_tokens(model_dir)
    again = _generate(seed.base_url)
    assert again["output_ids"] == first["output_ids"]
    assert again["meta_info"]["cached_tokens"] >= 32  # the prompt's prefix came from the radix cache


def test_openai_routes_serve_the_moe_model(seed, model_dir):
    client = openai.OpenAI(base_url=f"{seed.base_url}/v1", api_key="none")
    text = "Experts route tokens"
    native = requests.post(
        f"{seed.base_url}/generate", json={"text": text, "sampling_params": GREEDY}, timeout=60
    ).json()["text"]
    completion = client.completions.create(model=model_dir, prompt=text, temperature=0, max_tokens=NEW_TOKENS)
    assert completion.choices[0].text == native and completion.usage.completion_tokens == NEW_TOKENS
    chat = client.chat.completions.create(
        model=model_dir, messages=[{"role": "user", "content": text}], temperature=0, max_tokens=4
    )
    assert chat.usage.completion_tokens == 4 and chat.choices[0].message.content


def test_fork_tp1_over_nccl_into_an_engine(seed, model_dir, tmp_path):
    expected = rank_checksums(seed.base_url, 1)
    # One tensor per stacked expert projection: 2 MoE layers x (router, w13, w2), not 3 per expert.
    assert sum(".mlp.experts." in name for name in expected[0]) == 4
    with sglang.Engine(
        model_path=config_only_copy(model_dir, tmp_path / "engine"),
        load_format="remote_instance",
        remote_instance_weight_loader_seed_instance_ip="127.0.0.1",
        remote_instance_weight_loader_seed_instance_service_port=int(seed.base_url.rsplit(":", 1)[1]),
        remote_instance_weight_loader_send_weights_group_ports=[find_free_port()],
        max_total_tokens=4096,
    ) as engine:
        assert [m["checksums"] for m in engine.rpc("remote_instance_weight_manifest")] == expected
        assert engine.generate(input_ids=PROMPT_IDS, sampling_params=GREEDY)["output_ids"] == _hf_tokens(model_dir)


@needs_mooncake
def test_fork_tp1_over_transfer_engine(seed, model_dir, tmp_path):
    client = popen_launch_server(
        config_only_copy(model_dir, tmp_path / "c"), other_args=_client_args(seed.base_url, "transfer_engine", 1),
        env=ENV,
    )  # fmt: skip
    try:
        assert rank_checksums(client.base_url, 1) == rank_checksums(seed.base_url, 1)
        assert _generate(client.base_url)["output_ids"] == _hf_tokens(model_dir)
        log = Path(client.log_path).read_text(errors="replace")
        assert "over Mooncake tcp" in log and "verify" in log
    finally:
        kill_process_tree(client.pid)


def test_tp2_serves_and_forks_over_both_backends(model_dir, tmp_path):
    seed2 = popen_launch_server(model_dir, other_args=["--tp-size", "2", *SERVE, *_te_seed_args()], env=ENV)
    try:
        assert _generate(seed2.base_url)["output_ids"] == _hf_tokens(model_dir)
        expected = rank_checksums(seed2.base_url, 2)
        # Each rank holds its own half of every expert's intermediate channels.
        w13 = "model.layers.0.mlp.experts.w13_weight"
        assert expected[0][w13] != expected[1][w13]
        for backend in ["nccl", "transfer_engine"] if mooncake_available() else ["nccl"]:
            client = popen_launch_server(
                config_only_copy(model_dir, tmp_path / backend),
                other_args=_client_args(seed2.base_url, backend, 2),
                env=ENV,
            )
            try:
                assert rank_checksums(client.base_url, 2) == expected, backend
                assert _generate(client.base_url)["output_ids"] == _hf_tokens(model_dir), backend
                assert "verify" in Path(client.log_path).read_text(errors="replace")
            finally:
                kill_process_tree(client.pid)
    finally:
        kill_process_tree(seed2.pid)
