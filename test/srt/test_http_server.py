"""The native HTTP API of a real server process: /generate, control endpoints, API key, errors, shutdown."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlparse

import psutil
import pytest
import requests
import torch
from safetensors import safe_open
from transformers import AutoTokenizer

from sglang.test.test_utils import (
    find_free_port,
    kill_process_tree,
    popen_launch_server,
    server_log_tail,
    tiny_model,
)

API_KEY = "sk-test-0123"
GREEDY = {"temperature": 0, "max_new_tokens": 12}
DOWN_PROJ = "model.layers.0.mlp.down_proj.weight"


@pytest.fixture(scope="module")
def model_path() -> str:
    return tiny_model("llama")


@pytest.fixture(scope="module")
def server(model_path: str):
    proc = popen_launch_server(model_path, other_args=["--api-key", API_KEY])
    yield proc
    kill_process_tree(proc.pid)


@pytest.fixture(scope="module")
def http(server) -> requests.Session:
    session = requests.Session()
    session.headers["Authorization"] = f"Bearer {API_KEY}"
    session.base_url = server.base_url  # type: ignore[attr-defined]
    return session


def post(http: requests.Session, path: str, body: object, **kw) -> requests.Response:
    return http.post(http.base_url + path, json=body, timeout=120, **kw)  # type: ignore[attr-defined]


def get(http: requests.Session, path: str, **kw) -> requests.Response:
    return http.get(http.base_url + path, timeout=120, **kw)  # type: ignore[attr-defined]


def sse_events(resp: requests.Response) -> list[object]:
    """Parse a whole SSE body; asserts the stream ends with [DONE]."""
    lines = [line for line in resp.iter_lines(decode_unicode=True) if line]
    assert lines[-1] == "data: [DONE]"
    assert all(line.startswith("data: ") for line in lines)
    return [json.loads(line[len("data: ") :]) for line in lines[:-1]]


def load(http: requests.Session) -> dict:
    return get(http, "/get_server_info").json()["internal_states"][0]


# ---- API key ---------------------------------------------------------------------------------------


def test_api_key_required_everywhere_but_health(server, http):
    base = server.base_url
    assert requests.get(f"{base}/health", timeout=10).status_code == 200
    routes = [
        ("GET", "/health_generate"),
        ("GET", "/get_model_info"),
        ("GET", "/get_server_info"),
        ("GET", "/v1/models"),
        ("POST", "/generate"),
        ("POST", "/flush_cache"),
        ("POST", "/v1/completions"),
        ("POST", "/v1/chat/completions"),
        ("GET", "/get_weights_by_name"),
        ("POST", "/abort_request"),
        ("GET", "/remote_instance_weight_manifest"),  # added by the R-Fork feature, covered all the same
        ("GET", "/no_such_route"),
    ]
    for method, path in routes:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
            resp = requests.request(method, base + path, headers=headers, json={}, timeout=10)
            assert resp.status_code == 401, (method, path, headers)
            assert resp.json()["error"]["type"] == "AuthenticationError"
    assert get(http, "/get_model_info").status_code == 200
    assert get(http, "/health_generate").status_code == 200


# ---- /generate -------------------------------------------------------------------------------------


def test_generate_text_input_ids_batch_and_stream(http, model_path):
    prompts = ["The capital of France is", "Once upon a time"]
    single = [post(http, "/generate", {"text": p, "sampling_params": GREEDY}).json() for p in prompts]
    for out in single:
        assert out["meta_info"]["completion_tokens"] == len(out["output_ids"]) == GREEDY["max_new_tokens"]
        assert out["meta_info"]["finish_reason"]["type"] == "length"

    ids = [AutoTokenizer.from_pretrained(model_path).encode(p) for p in prompts]
    by_ids = post(http, "/generate", {"input_ids": ids[0], "sampling_params": GREEDY}).json()
    assert by_ids["output_ids"] == single[0]["output_ids"]
    assert by_ids["meta_info"]["prompt_tokens"] == len(ids[0]) == single[0]["meta_info"]["prompt_tokens"]

    batch = post(http, "/generate", {"text": prompts, "sampling_params": GREEDY}).json()
    assert [o["output_ids"] for o in batch] == [o["output_ids"] for o in single]
    batch_ids = post(http, "/generate", {"input_ids": ids, "sampling_params": GREEDY}).json()
    assert [o["text"] for o in batch_ids] == [o["text"] for o in single]

    resp = post(http, "/generate", {"text": prompts[1], "sampling_params": GREEDY, "stream": True}, stream=True)
    assert resp.headers["content-type"].startswith("text/event-stream")
    events = sse_events(resp)
    assert len(events) == GREEDY["max_new_tokens"]
    assert [len(e["output_ids"]) for e in events] == list(range(1, GREEDY["max_new_tokens"] + 1))
    assert events[-1]["text"] == single[1]["text"]
    assert events[-1]["output_ids"] == single[1]["output_ids"]

    resp = post(http, "/generate", {"text": prompts, "sampling_params": GREEDY, "stream": True}, stream=True)
    finals = {e["index"]: e for e in sse_events(resp) if e["meta_info"]["finish_reason"]}
    assert [finals[i]["text"] for i in range(2)] == [o["text"] for o in single]


def test_generate_logprobs(http):
    body = {"text": "Hello", "sampling_params": GREEDY, "return_logprob": True, "top_logprobs_num": 3}
    out = post(http, "/generate", body).json()
    token_logprobs = out["meta_info"]["output_token_logprobs"]
    top = out["meta_info"]["output_top_logprobs"]
    assert [t for _, t in token_logprobs] == out["output_ids"]
    assert len(top) == len(out["output_ids"]) and all(len(alts) == 3 for alts in top)
    for (logprob, token), alts in zip(token_logprobs, top):
        assert alts[0][1] == token  # greedy picks the most likely token
        assert logprob == pytest.approx(alts[0][0], abs=1e-5) and logprob <= 0


def test_concurrent_streams(http):
    prompts = [f"Request number {i} says" for i in range(32)]
    expected = [o["text"] for o in post(http, "/generate", {"text": prompts, "sampling_params": GREEDY}).json()]

    def stream(prompt: str) -> str:
        resp = post(http, "/generate", {"text": prompt, "sampling_params": GREEDY, "stream": True}, stream=True)
        events = sse_events(resp)
        assert events[-1]["meta_info"]["finish_reason"]["type"] == "length"
        return events[-1]["text"]

    with ThreadPoolExecutor(32) as pool:
        assert list(pool.map(stream, prompts)) == expected


# ---- control endpoints -----------------------------------------------------------------------------


def test_info_endpoints(http, model_path):
    info = get(http, "/get_model_info").json()
    assert info["model_path"] == model_path and info["is_generation"] is True
    server_info = get(http, "/get_server_info").json()
    assert server_info["tp_size"] == 1 and server_info["api_key"] == "<redacted>"
    state = server_info["internal_states"][0]
    for key in ("num_running_reqs", "num_waiting_reqs", "available_kv_tokens", "max_total_num_tokens"):
        assert isinstance(state[key], int)
    models = get(http, "/v1/models").json()
    assert models["data"][0]["id"] == model_path and models["data"][0]["max_model_len"] == 2048
    assert post(http, "/flush_cache", None).text.startswith("Cache flushed")


def test_get_weights_by_name_matches_checkpoint(http, model_path):
    with safe_open(os.path.join(model_path, "model.safetensors"), "pt") as f:
        expected = f.get_tensor(DOWN_PROJ)
    full = torch.tensor(get(http, "/get_weights_by_name", json={"name": DOWN_PROJ, "truncate_size": 10**6}).json())
    assert torch.equal(full, expected)
    # Upstream's default: the first 100 rows (the tiny model's down_proj has fewer, so all of them).
    embed = get(http, "/get_weights_by_name", json={"name": "model.embed_tokens.weight"}).json()
    assert len(embed) == 100
    # As upstream, truncate_size counts rows; raw counts elements of the flattened tensor (this fork's older reading).
    by_post = post(http, "/get_weights_by_name", {"name": DOWN_PROJ, "truncate_size": 5}).json()
    assert by_post == expected[:5].tolist()
    by_query = get(http, "/get_weights_by_name", params={"name": DOWN_PROJ, "truncate_size": 3}).json()
    assert by_query == expected[:3].tolist()
    raw = post(http, "/get_weights_by_name", {"name": DOWN_PROJ, "truncate_size": 5, "raw": True}).json()
    assert raw == expected.flatten()[:5].tolist()
    bad_size = get(http, "/get_weights_by_name", params={"name": DOWN_PROJ, "truncate_size": 0})
    assert bad_size.status_code == 400 and bad_size.json()["error"]["param"] == "truncate_size"
    missing = post(http, "/get_weights_by_name", {"name": "model.no_such.weight"})
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "name"


def test_abort_all(http):
    bodies = [
        {"text": f"abort all {i}", "sampling_params": {"max_new_tokens": 1500, "ignore_eos": True}} for i in (1, 2)
    ]
    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(post, http, "/generate", body) for body in bodies]
        deadline = time.monotonic() + 30
        while load(http)["num_running_reqs"] < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert get(http, "/get_load").json()[0]["num_reqs"] == 2
        assert post(http, "/abort_request", {"abort_all": True}).status_code == 200
        outs = [f.result(timeout=30).json() for f in futures]
    assert [o["meta_info"]["finish_reason"]["type"] for o in outs] == ["abort", "abort"]
    missing = post(http, "/abort_request", {})
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "rid"


def test_abort_request_by_rid(http):
    body = {
        "text": "abort me",
        "rid": "abort-me-1",
        "sampling_params": {"max_new_tokens": 1500, "ignore_eos": True},
    }
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(post, http, "/generate", body)
        deadline = time.monotonic() + 30
        while load(http)["num_running_reqs"] == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert post(http, "/abort_request", {"rid": "abort-me-1"}).status_code == 200
        out = future.result(timeout=30).json()
    assert out["meta_info"]["finish_reason"]["type"] == "abort"
    assert out["meta_info"]["completion_tokens"] < 1500


# ---- errors ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"text": "hi", "bogus": 1}, "bogus"),
        ({"text": 5}, "text"),
        ({"text": "hi", "sampling_params": {"temperature": -1}}, "sampling_params.temperature"),
        ({"text": "hi", "sampling_params": {"top_p": 1.5}}, "sampling_params.top_p"),
        ({"text": "hi", "sampling_params": {"max_new_tokens": "many"}}, "sampling_params.max_new_tokens"),
        ({"text": "hi", "sampling_params": {"not_a_param": 1}}, "sampling_params.not_a_param"),
        ({"text": "hello " * 1000}, "text"),
        ({"input_ids": [1] * 3000, "stream": True}, "input_ids"),
    ],
)
def test_generate_bad_input_is_400_naming_the_field(http, body, param):
    resp = post(http, "/generate", body)
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["param"] == param and error["type"] == "BadRequestError" and error["code"] == 400
    assert error["message"]
    if "hello" in str(body) or "input_ids" in body:
        assert "context length" in error["message"]


def test_malformed_json_is_400(http):
    resp = http.post(http.base_url + "/generate", data=b'{"text": "hi",', headers={"Content-Type": "application/json"})
    assert resp.status_code == 400
    assert "Malformed JSON" in resp.json()["error"]["message"]


def test_disconnect_mid_stream_aborts_and_frees_memory(server, http):
    assert post(http, "/flush_cache", None).status_code == 200
    idle = load(http)
    assert idle["available_kv_tokens"] == idle["max_total_num_tokens"]
    body = json.dumps(
        {
            "text": "A long story",
            "stream": True,
            "sampling_params": {"max_new_tokens": 1800, "ignore_eos": True},
        }
    )
    url = urlparse(server.base_url)
    with socket.create_connection((url.hostname, url.port), timeout=30) as sock:
        head = (
            f"POST /generate HTTP/1.1\r\nHost: {url.netloc}\r\nAuthorization: Bearer {API_KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        sock.sendall(head.encode() + body.encode())
        received = b""
        while received.count(b"data: ") < 3:
            received += sock.recv(65536)
    # 1800 tokens take well over 10 s here; an abort frees the request at once.
    deadline = time.monotonic() + 5
    while (state := load(http))["num_running_reqs"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert state["num_running_reqs"] == 0 and state["num_waiting_reqs"] == 0
    assert state["available_kv_tokens"] + state["evictable_kv_tokens"] == idle["max_total_num_tokens"]
    assert post(http, "/flush_cache", None).status_code == 200
    assert load(http)["available_kv_tokens"] == idle["available_kv_tokens"]
    assert get(http, "/health_generate").status_code == 200


# ---- launcher --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--model-path", "/no/such/model"], "/no/such/model"),
        (["--model-path", "x", "--tp-size", "0"], "--tp-size"),
    ],
)
def test_bad_arguments_fail_with_one_line(args, needle):
    command = [sys.executable, "-m", "sglang.launch_server", "--port", str(find_free_port()), *args]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    # Start-up timeline lines (one per finished phase) are progress, not part of the error.
    lines = [line for line in proc.stderr.splitlines() if line.strip() and "] Startup: " not in line]
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in proc.stderr, proc.stderr


# ---- tensor parallel server: weights of rank 0, then SIGTERM under load ----------------------------


@pytest.fixture(scope="module")
def tp2_server(model_path: str):
    proc = popen_launch_server(model_path, other_args=["--tp-size", "2"])
    yield proc
    kill_process_tree(proc.pid)


def test_get_weights_by_name_tp2_joins_row_parallel_and_raw_is_rank0_shard(tp2_server, model_path):
    with safe_open(os.path.join(model_path, "model.safetensors"), "pt") as f:
        full = f.get_tensor(DOWN_PROJ)
    url = f"{tp2_server.base_url}/get_weights_by_name"
    # down_proj is row-parallel (split along its input): upstream answers it whole, raw gives rank 0's columns.
    assert torch.equal(torch.tensor(requests.post(url, json={"name": DOWN_PROJ}).json()), full)
    raw = torch.tensor(requests.post(url, json={"name": DOWN_PROJ, "raw": True}).json())
    assert torch.equal(raw, full[:, : full.shape[1] // 2])


def test_sigterm_under_load_leaves_no_process(tp2_server):
    main = psutil.Process(tp2_server.pid)
    tree = [main, *main.children(recursive=True)]
    assert len(tree) >= 3, "expected the launcher and two scheduler processes"
    started = threading.Semaphore(0)

    def stream() -> None:
        body = {
            "text": "load",
            "stream": True,
            "sampling_params": {"max_new_tokens": 1500, "ignore_eos": True},
        }
        try:
            with requests.post(f"{tp2_server.base_url}/generate", json=body, stream=True, timeout=60) as resp:
                for _ in resp.iter_lines():
                    started.release()
        except requests.RequestException:
            pass  # the server going away mid-stream is what this test does

    threads = [threading.Thread(target=stream) for _ in range(8)]
    for t in threads:
        t.start()
    assert started.acquire(timeout=60)
    tp2_server.send_signal(signal.SIGTERM)
    assert tp2_server.wait(timeout=60) == 0, server_log_tail(tp2_server)
    _, alive = psutil.wait_procs(tree, timeout=20)
    assert not alive, f"processes left behind: {alive}"
    for t in threads:
        t.join(timeout=30)
    url = urlparse(tp2_server.base_url)
    with socket.socket() as s:
        # As a restarted server would; Linux still refuses this while anything listens on the port.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((url.hostname, url.port))
        s.listen()


def test_stream_interval_and_incremental_streaming_output(model_path):
    """--stream-interval 3 sends the first token at once and then three at a time; --incremental-streaming-output makes
    each /generate chunk hold only what is new. The OpenAI routes still stream correct deltas."""
    proc = popen_launch_server(model_path, other_args=["--stream-interval", "3", "--incremental-streaming-output"])
    try:
        url = proc.base_url
        params = {"temperature": 0, "max_new_tokens": 10, "ignore_eos": True}
        whole = requests.post(f"{url}/generate", json={"text": "Count with me", "sampling_params": params}).json()
        with requests.post(
            f"{url}/generate", json={"text": "Count with me", "sampling_params": params, "stream": True}, stream=True
        ) as r:
            chunks = sse_events(r)
        assert [t for c in chunks for t in c["output_ids"]] == whole["output_ids"]
        assert "".join(c["text"] for c in chunks) == whole["text"]
        # 1 + 3 + 3 + 3 tokens; a reader that falls behind may get two of them merged, never more chunks.
        assert all(c["output_ids"] for c in chunks) and len(chunks) <= 4
        assert len(chunks[0]["output_ids"]) in (1, 4)
        assert chunks[-1]["meta_info"]["completion_tokens"] == 10
        body = {"model": model_path, "prompt": "Count with me", "max_tokens": 10, "temperature": 0, "ignore_eos": True}
        full = requests.post(f"{url}/v1/completions", json=body).json()["choices"][0]["text"]
        with requests.post(f"{url}/v1/completions", json={**body, "stream": True}, stream=True) as r:
            pieces = [e["choices"][0]["text"] for e in sse_events(r) if e.get("choices")]
        assert "".join(pieces) == full == whole["text"]
    finally:
        kill_process_tree(proc.pid)
