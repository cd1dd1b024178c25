"""Observability through a real server: /metrics before and after known traffic, batch log lines at their
interval, request logs, and /metrics next to --api-key."""

from __future__ import annotations

import gzip
import json
import re
import time

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from sglang.srt.metrics import rfork_progress
from sglang.test.test_utils import config_only_copy, find_free_port, kill_process_tree, popen_launch_server

KEY = "observability-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
DECODE_LOG_INTERVAL = 4


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    proc = popen_launch_server(
        tiny_model_dir("llama"),
        other_args=[
            "--device",
            "cpu",
            "--max-total-tokens",
            "4096",
            "--enable-metrics",
            "--log-requests",
            "--log-requests-level",
            "3",
            "--decode-log-interval",
            str(DECODE_LOG_INTERVAL),
            "--api-key",
            KEY,
            "--served-model-name",
            "tiny-observed",
        ],
    )
    yield proc
    kill_process_tree(proc.pid)


def scrape(url: str, model_name: str = "tiny-observed") -> dict[str, float]:
    """Every sample of /metrics (histogram buckets left out) by name and its labels other than model_name,
    e.g. `sglang:rfork_seed_requests_total{status=200,step=manifest}`, parsed by prometheus_client."""
    resp = requests.get(f"{url}/metrics", timeout=10)  # no key: /metrics is open, as upstream's
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"].startswith("text/plain")
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(resp.text):
        for sample in family.samples:
            labels = dict(sample.labels)
            assert labels.pop("model_name") == model_name, sample
            if "le" in labels:
                continue
            extra = ",".join(f"{k}={v}" for k, v in sorted(labels.items()))
            samples[sample.name + (f"{{{extra}}}" if extra else "")] = sample.value
    return samples


def generate(url: str, input_ids: list[int], max_new_tokens: int, **extra) -> dict:
    body = {
        "input_ids": input_ids,
        "sampling_params": {"max_new_tokens": max_new_tokens, "temperature": 0, "ignore_eos": True},
        **extra,
    }
    resp = requests.post(f"{url}/generate", json=body, headers=AUTH, timeout=60)
    assert resp.status_code == 200, resp.text
    return resp.json()


def log_text(server) -> str:
    with open(server.log_path, errors="replace") as f:
        return f.read()


def wait_for(predicate, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.1)


def test_metrics_move_with_known_traffic(server):
    url = server.base_url
    before = scrape(url)
    prompts = [[5, 6, 7, 8, 9, 10, 11, 12], [5, 6, 7, 8, 9, 10, 11, 12, 13, 14]]
    outs = [generate(url, ids, max_new_tokens=6) for ids in prompts]
    after = wait_for(lambda: (s := scrape(url)) and s["sglang:num_running_reqs"] == 0 and s)
    delta = {name: after[name] - before.get(name, 0.0) for name in after}
    assert delta["sglang:num_requests_total"] == 2
    assert delta["sglang:prompt_tokens_total"] == 18
    assert delta["sglang:generation_tokens_total"] == 12
    # The second prompt extends the first: its cached prefix is counted, and is what the response reported.
    cached = sum(o["meta_info"]["cached_tokens"] for o in outs)
    assert cached > 0 and delta["sglang:cached_tokens_total"] == cached
    assert delta["sglang:time_to_first_token_seconds_count"] == 2
    assert delta["sglang:inter_token_latency_seconds_count"] == 10  # 5 gaps per 6-token request
    assert delta["sglang:e2e_request_latency_seconds_count"] == 2
    assert delta["sglang:e2e_request_latency_seconds_sum"] > delta["sglang:time_to_first_token_seconds_sum"] > 0
    assert delta["sglang:num_aborted_requests_total"] == 0
    # Gauges come from rank 0's scheduler: the pool size, the last prefill's hit rate, drained queues.
    assert after["sglang:max_total_num_tokens"] >= 4096
    assert 0 < after["sglang:cache_hit_rate"] <= 1
    assert after["sglang:num_queue_reqs"] == 0 and after["sglang:num_used_tokens"] == 0
    assert after["sglang:gen_throughput"] == 0  # idle again


def test_gauges_show_a_running_request(server):
    url = server.base_url
    body = {"input_ids": [3, 4, 5], "sampling_params": {"max_new_tokens": 400, "ignore_eos": True}, "stream": True}
    with requests.post(f"{url}/generate", json=body, headers=AUTH, stream=True, timeout=60) as resp:
        lines = resp.iter_lines()
        next(line for line in lines if line.startswith(b"data:"))
        # Gauges are published with each decode line: a few intervals in, the request shows.
        busy = wait_for(
            lambda: (s := scrape(url)) and s["sglang:num_running_reqs"] == 1 and s["sglang:gen_throughput"] and s
        )
        assert busy and busy["sglang:token_usage"] > 0 and busy["sglang:gen_throughput"] > 0
    # Leaving mid-stream aborts the request: it counts as aborted, and the gauges drain.
    after = wait_for(lambda: (s := scrape(url)) and s["sglang:num_running_reqs"] == 0 and s)
    assert after and after["sglang:num_aborted_requests_total"] >= 1


def test_batch_log_lines_at_their_interval(server):
    url = server.base_url
    start = len(log_text(server))
    generate(url, [20, 21, 22, 23, 24, 25, 26], max_new_tokens=1 + 3 * DECODE_LOG_INTERVAL)
    text = wait_for(lambda: (t := log_text(server)[start:]) and "Finish: " in t and t)
    prefill = re.findall(
        r"Prefill batch\. #new-seq: 1, #new-token: (\d+), #cached-token: (\d+), token usage: "
        r"[\d.]+, #running-req: 1, #queue-req: 0",
        text,
    )
    assert [(int(a) + int(b)) for a, b in prefill] == [7]
    decode = re.findall(
        r"Decode batch\. #running-req: 1, #token: (\d+), token usage: [\d.]+, "
        r"gen throughput \(token/s\): ([\d.]+), #queue-req: 0",
        text,
    )
    # 12 decode steps at an interval of 4 (the step counter runs across requests, so 2 or 3 lines fall here).
    assert len(decode) in (2, 3), text
    tokens = [int(t) for t, _ in decode]
    assert tokens == sorted(tokens) and all(float(tp) > 0 for _, tp in decode)


def test_request_log_lines(server):
    url = server.base_url
    start = len(log_text(server))
    out = generate(url, [30, 31, 32, 33], max_new_tokens=3, rid="logged-request-1")
    text = wait_for(lambda: (t := log_text(server)[start:]) and "Finish: rid=logged-request-1" in t and t)
    received = re.search(r"Receive: rid=logged-request-1, prompt_tokens=4, sampling_params=(\{.*\}), prompt=", text)
    assert received and "'max_new_tokens': 3" in received.group(1) and "'ignore_eos': True" in received.group(1)
    finished = re.search(
        r"Finish: rid=logged-request-1, prompt_tokens=4, completion_tokens=3, cached_tokens=\d+, "
        r"finish_reason=\{'type': 'length'.*?\}, latency=([\d.]+)s, ttft=([\d.]+)s, output=(.*)",
        text,
    )
    assert finished, text
    assert float(finished.group(1)) >= float(finished.group(2))
    assert finished.group(3) == repr(out["text"])


def test_api_key_guards_everything_but_metrics_and_health(server):
    url = server.base_url
    assert requests.get(f"{url}/metrics", timeout=10).status_code == 200
    assert requests.get(f"{url}/health", timeout=10).status_code == 200
    assert requests.get(f"{url}/get_server_info", timeout=10).status_code == 401
    resp = requests.post(f"{url}/generate", json={"input_ids": [1, 2], "sampling_params": {}}, timeout=10)
    assert resp.status_code == 401


def read_trace(path: str) -> dict:
    with gzip.open(path, "rt") as f:
        return json.load(f)


def test_profile_start_stop_writes_a_trace(server, tmp_path):
    url = server.base_url
    resp = requests.post(f"{url}/start_profile", json={"output_dir": str(tmp_path)}, headers=AUTH, timeout=30)
    assert resp.status_code == 200 and resp.text.startswith("Start profiling."), resp.text
    again = requests.post(f"{url}/start_profile", json={"output_dir": str(tmp_path)}, headers=AUTH, timeout=30)
    assert again.status_code == 400 and "already going" in again.json()["error"]["message"]
    generate(url, [40, 41, 42], max_new_tokens=3)
    resp = requests.post(f"{url}/stop_profile", headers=AUTH, timeout=60)
    assert resp.status_code == 200 and resp.text.startswith("Stop profiling."), resp.text
    (trace,) = tmp_path.glob("*-TP-0.trace.json.gz")
    assert str(trace) in resp.text
    events = read_trace(str(trace))["traceEvents"]
    assert any("aten::" in str(e.get("name", "")) for e in events)  # the forward passes are in it
    resp = requests.post(f"{url}/stop_profile", headers=AUTH, timeout=30)
    assert resp.status_code == 400 and "no profiling run" in resp.json()["error"]["message"]


def test_profile_num_steps_stops_by_itself(server, tmp_path):
    url = server.base_url
    body = {"output_dir": str(tmp_path), "num_steps": 2, "activities": ["CPU"], "profile_id": "steps"}
    assert requests.post(f"{url}/start_profile", json=body, headers=AUTH, timeout=30).status_code == 200
    generate(url, [50, 51, 52], max_new_tokens=4)
    trace = tmp_path / "steps-TP-0.trace.json.gz"
    assert wait_for(trace.exists) and read_trace(str(trace))["traceEvents"]
    bad = requests.post(f"{url}/start_profile", json={"activities": ["RPD"]}, headers=AUTH, timeout=30)
    assert bad.status_code == 400 and "unknown profiler activities" in bad.json()["error"]["message"]


def test_fork_metrics_on_seed_and_client(server, tiny_model_dir, tmp_path):
    seed = server.base_url
    before = scrape(seed)
    weight_bytes = requests.get(f"{seed}/get_server_info", headers=AUTH, timeout=10).json()["weight_bytes"]
    args = [
        "--load-format",
        "remote_instance",
        "--remote-instance-weight-loader-seed-instance-ip",
        "127.0.0.1",
        "--remote-instance-weight-loader-seed-instance-service-port",
        seed.rsplit(":", 1)[1],
        "--remote-instance-weight-loader-send-weights-group-ports",
        f"[{find_free_port()}]",
        "--api-key",
        KEY,
        "--enable-metrics",
        "--served-model-name",
        "tiny-observed",
    ]
    client = popen_launch_server(config_only_copy(tiny_model_dir("llama"), tmp_path / "client"), other_args=args)
    try:
        got = scrape(client.base_url)
        log = log_text(client)
    finally:
        kill_process_tree(client.pid)
    # The client shows the numbers its fork line printed.
    line = re.search(r"TP0 R-Fork from \S+ via nccl: ([\d.]+) MB in ([\d.]+) s \(([\d.]+) GB/s\)", log)
    assert line, log[-3000:]
    assert got["sglang:rfork_forks_received_total"] == 1
    assert got["sglang:rfork_bytes_received_total{tp_rank=0}"] == weight_bytes
    assert f"{weight_bytes / 1e6:.1f}" == line.group(1)
    assert got["sglang:rfork_client_step_seconds{step=transfer,tp_rank=0}"] == pytest.approx(
        float(line.group(2)), abs=1e-3
    )
    assert got["sglang:rfork_transfer_gbps{tp_rank=0}"] == pytest.approx(float(line.group(3)), abs=0.01)
    assert {"manifest", "group setup", "verify"} <= {
        k.split("step=")[1].split(",")[0] for k in got if k.startswith("sglang:rfork_client_step_seconds")
    }
    # The seed counts the fork it served and the steps it answered; it is idle again.
    after = scrape(seed)
    assert after["sglang:rfork_forks_served_total"] - before.get("sglang:rfork_forks_served_total", 0) == 1
    assert after["sglang:rfork_bytes_served_total"] - before.get("sglang:rfork_bytes_served_total", 0) == weight_bytes
    for step in ("manifest", "lease", "init_group"):
        key = f"sglang:rfork_seed_requests_total{{status=200,step={step}}}"
        assert after[key] - before.get(key, 0) >= 1, key
        assert after[f"sglang:rfork_seed_step_seconds_count{{step={step}}}"] >= 1
    assert after["sglang:rfork_forks_in_progress"] == 0 and after["sglang:rfork_seed_lease_held"] == 0
    assert scrape(seed)["sglang:rfork_forks_received_total"] == 0  # the seed loaded from disk


def test_seed_failures_by_step_and_status(server):
    url = server.base_url
    key = "sglang:rfork_seed_failures_total{status=400,step=send_weights}"
    before = scrape(url).get(key, 0)
    body = {"master_address": "127.0.0.1", "ports": "1", "group_name": "stray"}
    resp = requests.post(f"{url}/send_weights_to_remote_instance", json=body, headers=AUTH, timeout=10)
    assert resp.status_code == 400
    assert scrape(url)[key] == before + 1
    leased = requests.post(f"{url}/remote_instance_fork_lease", json={"ports": "1,2"}, headers=AUTH, timeout=10)
    assert leased.status_code == 400  # two ports for a TP-1 seed
    assert scrape(url)["sglang:rfork_seed_failures_total{status=400,step=lease}"] >= 1


def test_fork_progress_lines(caplog):
    label = "TP0 R-Fork from seed:1 via nccl"
    with (
        caplog.at_level("INFO", logger=rfork_progress.__name__),
        rfork_progress.track(label, 4_000_000_000, interval=0.05) as progress,
    ):
        rfork_progress.advance(1_000_000_000)
        assert wait_for(lambda: any("1.00 / 4.00 GB (25%)" in r.getMessage() for r in caplog.records), 5)
        rfork_progress.advance(1_000_000_000)
        assert "2.00 / 4.00 GB (50%)" in progress.line() and "GB/s" in progress.line()
    rfork_progress.advance(1)  # after the fork: nothing tracked, nothing counted
    assert progress.done == 2_000_000_000
    count = len(caplog.records)
    time.sleep(0.2)
    assert len(caplog.records) == count  # the ticker stopped with the fork
