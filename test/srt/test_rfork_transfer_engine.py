"""Tensor R-Fork over a real Mooncake TransferEngine (TCP on CPU): seed and client servers on loopback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest
import requests

import sglang
from sglang.srt.remote_instance.mooncake_guard import mooncake_available
from sglang.test.rfork_utils import greedy_ids, te_client_args, weights_by_name
from sglang.test.rfork_utils import rank_checksums as checksums
from sglang.test.test_utils import config_only_copy, find_free_port, kill_process_tree, popen_launch_server

pytestmark = pytest.mark.skipif(not mooncake_available(), reason="mooncake-transfer-engine is not installed")

GREEDY = {"temperature": 0, "max_new_tokens": 16, "ignore_eos": True}
PROMPT = "The seed and the client should agree on"
ENV = {"MC_LOG_LEVEL": "WARNING"}
SMALL_KV = ["--max-total-tokens", "4096"]


def seed_args(*extra: str) -> list[str]:
    """Flags of a TransferEngine seed with its own bootstrap port."""
    return [
        "--remote-instance-weight-loader-start-seed-via-transfer-engine",
        "--engine-info-bootstrap-port",
        str(find_free_port()),
        *SMALL_KV,
        *extra,
    ]


def client_args(seed_url: str, *extra: str) -> list[str]:
    """Flags of a TransferEngine client of the seed at seed_url."""
    return te_client_args(seed_url, *SMALL_KV, *extra)


def all_weights(url: str) -> dict[str, list]:
    """Every parameter of rank 0, as values."""
    return weights_by_name(url)


def greedy(url: str) -> list[int]:
    return greedy_ids(url, PROMPT, GREEDY)


def log_of(proc) -> str:
    return Path(proc.log_path).read_text(errors="replace")


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    return tiny_model_dir("llama")


@pytest.fixture(scope="module")
def seed(model_dir):
    proc = popen_launch_server(model_dir, other_args=seed_args(), env=ENV)
    yield proc
    kill_process_tree(proc.pid)


def test_seed_logs_ports_and_registration(seed):
    log = log_of(seed)
    assert "TransferEngine (tcp) opened ports" in log and "all interfaces" in log
    assert "registration took" in log and "published to http://127.0.0.1:" in log


def test_tp1_server_bitwise_greedy_then_chain_in_engine_mode(seed, model_dir, tmp_path):
    client1 = popen_launch_server(
        config_only_copy(model_dir, tmp_path / "c1"), other_args=client_args(seed.base_url, *seed_args()), env=ENV
    )
    try:
        expected = checksums(seed.base_url, 1)
        assert checksums(client1.base_url, 1) == expected
        assert all_weights(client1.base_url) == all_weights(seed.base_url)
        assert greedy(client1.base_url) == greedy(seed.base_url)
        log = log_of(client1)
        assert "over Mooncake tcp" in log and "via transfer_engine" in log and "verify" in log
        # client1 forked, and now serves as a seed: seed -> client1 -> client2 (offline Engine).
        assert "published to http://127.0.0.1:" in log
        with sglang.Engine(
            model_path=config_only_copy(model_dir, tmp_path / "c2"),
            load_format="remote_instance",
            remote_instance_weight_loader_backend="transfer_engine",
            remote_instance_weight_loader_seed_instance_ip="127.0.0.1",
            remote_instance_weight_loader_seed_instance_service_port=int(client1.base_url.rsplit(":", 1)[1]),
            remote_instance_weight_loader_start_seed_via_transfer_engine=True,
            engine_info_bootstrap_port=find_free_port(),
            remote_instance_weight_loader_timeout=30,
            max_total_tokens=4096,
        ) as engine:
            assert [m["checksums"] for m in engine.rpc("remote_instance_weight_manifest")] == expected
            out = engine.generate(PROMPT, GREEDY)["output_ids"]
            assert out == greedy(seed.base_url)
            info = engine.rpc("transfer_engine_seed_info")[0]
            assert info["session_id"].startswith("127.0.0.1:") and info["register_seconds"] >= 0
    finally:
        kill_process_tree(client1.pid)


def test_tp2_server(tiny_model_dir, tmp_path):
    model_dir = tiny_model_dir("qwen2")
    seed2 = popen_launch_server(model_dir, other_args=seed_args("--tp-size", "2"), env=ENV)
    try:
        client = popen_launch_server(
            config_only_copy(model_dir, tmp_path / "c"),
            other_args=client_args(seed2.base_url, "--tp-size", "2"),
            env=ENV,
        )
        try:
            expected = checksums(seed2.base_url, 2)
            assert expected[0] != expected[1]  # the ranks hold different shards
            assert checksums(client.base_url, 2) == expected
            assert greedy(client.base_url) == greedy(seed2.base_url)
        finally:
            kill_process_tree(client.pid)
    finally:
        kill_process_tree(seed2.pid)


class Streamer(threading.Thread):
    """Streams greedy generations from a server back to back until stopped; records every outcome."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url, self.stop, self.outputs, self.errors, self.spans = url, threading.Event(), [], [], []

    def run(self) -> None:
        params = {"temperature": 0, "max_new_tokens": 64, "ignore_eos": True}
        while not self.stop.is_set():
            start, chunks = time.monotonic(), []
            try:
                with requests.post(
                    f"{self.url}/generate",
                    json={"text": PROMPT, "sampling_params": params, "stream": True},
                    stream=True,
                    timeout=60,
                ) as r:
                    r.raise_for_status()
                    for line in r.iter_lines():
                        if line.startswith(b"data: ") and line != b"data: [DONE]":
                            chunks.append(json.loads(line[6:]))
            except Exception as e:  # recorded, asserted on by the test
                self.errors.append(repr(e))
                return
            self.outputs.append(chunks[-1]["output_ids"])
            self.spans.append((start, time.monotonic()))


def test_two_clients_at_once_while_seed_streams(seed, model_dir, tmp_path):
    streamer = Streamer(seed.base_url)
    streamer.start()
    while not streamer.outputs and not streamer.errors:
        time.sleep(0.05)
    started = time.monotonic()
    dirs = [config_only_copy(model_dir, tmp_path / f"c{i}") for i in range(2)]
    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(popen_launch_server, d, None, 300, client_args(seed.base_url), ENV) for d in dirs]
        clients = [f.result() for f in futures]
    ready = time.monotonic()
    try:
        streamer.stop.set()
        streamer.join(60)
        assert not streamer.errors
        assert len({tuple(o) for o in streamer.outputs}) == 1 and len(streamer.outputs[0]) == 64
        # Streams were running from before the clients started until after both had forked.
        assert streamer.spans[0][0] < started and streamer.spans[-1][1] > ready
        expected = checksums(seed.base_url, 1)
        for client in clients:
            assert checksums(client.base_url, 1) == expected
            assert greedy(client.base_url) == greedy(seed.base_url)
    finally:
        for client in clients:
            kill_process_tree(client.pid)


def fork_failure(model_dir: str, seed_url: str, *extra: str) -> tuple[str, float]:
    """Start a client that must fail; returns (its error report, seconds until it exited)."""
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=r"exited with code [1-9]") as failure:
        popen_launch_server(model_dir, other_args=client_args(seed_url, *extra), env=ENV, timeout=120)
    return str(failure.value), time.monotonic() - start


def test_unreachable_seed(model_dir, tmp_path):
    dead = f"http://127.0.0.1:{find_free_port()}"
    report, seconds = fork_failure(config_only_copy(model_dir, tmp_path / "c"), dead)
    assert f"R-Fork from seed {dead[7:]} failed at step 'manifest'" in report
    assert "cannot reach the seed's HTTP server" in report and seconds < 60


def test_mismatched_model(seed, tiny_model_dir, tmp_path):
    other = config_only_copy(tiny_model_dir("llama", hidden_size=32), tmp_path / "c")
    report, seconds = fork_failure(other, seed.base_url)
    assert "failed at step 'manifest'" in report and "holds a different model" in report
    assert "shape" in report and seconds < 60


def test_seed_hung_then_killed_during_transfer(model_dir, tmp_path):
    victim = popen_launch_server(model_dir, other_args=seed_args(), env=ENV)
    try:
        # Freeze the TP process that owns the TransferEngine; the HTTP server still hands out the info.
        ranks = psutil.Process(victim.pid).children(recursive=True)
        for proc in ranks:
            proc.suspend()
        # Hung seed: the client's Mooncake handshake stalls (Mooncake's own limit is ~60 s); ours is 5 s.
        report, seconds = fork_failure(
            config_only_copy(model_dir, tmp_path / "c1"),
            victim.base_url,
            "--remote-instance-weight-loader-timeout",
            "5",
        )
        assert "failed at step 'transfer'" in report and "hung or unreachable" in report and seconds < 45
        # Killed seed: kill it once the next client is inside its transfer step.
        log = tmp_path / "client.log"
        client = spawn_server(config_only_copy(model_dir, tmp_path / "c2"), client_args(victim.base_url), log)
        deadline = time.monotonic() + 120
        while "reading 15 tensors" not in log.read_text(errors="replace") and client.poll() is None:
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.01)
        for proc in [psutil.Process(victim.pid), *ranks]:
            proc.kill()
        started = time.monotonic()
        assert client.wait(timeout=60) != 0
        text = log.read_text(errors="replace")
        assert f"R-Fork from seed {victim.base_url[7:]} failed at step 'transfer'" in text
        assert time.monotonic() - started < 30
    finally:
        kill_process_tree(victim.pid)


def spawn_server(model_dir: str, args: list[str], log: Path) -> subprocess.Popen:
    """A server process writing to log, not waited for."""
    command = [
        sys.executable,
        "-m",
        "sglang.launch_server",
        "--model-path",
        model_dir,
        "--port",
        str(find_free_port()),
        *args,
    ]
    with open(log, "w") as f:
        return subprocess.Popen(command, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, **ENV})
