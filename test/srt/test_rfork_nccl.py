"""Tensor R-Fork over the NCCL backend (gloo on CPU): real seed and client servers on loopback."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests

import sglang
from sglang.test.test_utils import config_only_copy, find_free_port, kill_process_tree, popen_launch_server

GREEDY = {"temperature": 0, "max_new_tokens": 16, "ignore_eos": True}
PROMPT = "The seed and the client should agree on"


def _fork_args(seed_url: str, ports: list[int], *extra: str) -> list[str]:
    port = seed_url.rsplit(":", 1)[1]
    return [
        "--load-format",
        "remote_instance",
        "--remote-instance-weight-loader-seed-instance-ip",
        "127.0.0.1",
        "--remote-instance-weight-loader-seed-instance-service-port",
        port,
        "--remote-instance-weight-loader-send-weights-group-ports",
        str(ports),
        "--remote-instance-weight-loader-timeout",
        "60",
        *extra,
    ]


def _all_weights(url: str, tp_size: int = 1) -> dict[str, list]:
    names = [
        t["name"] for t in requests.get(f"{url}/remote_instance_weight_manifest", params={"rank": 0}).json()["tensors"]
    ]
    whole = {"truncate_size": 10**6}  # more rows than any tiny weight has
    return {n: requests.post(f"{url}/get_weights_by_name", json={"name": n, **whole}).json() for n in names}


def _greedy(url: str) -> list[int]:
    r = requests.post(f"{url}/generate", json={"text": PROMPT, "sampling_params": GREEDY})
    r.raise_for_status()
    return r.json()["output_ids"]


def _free_ports(n: int) -> list[int]:
    return [find_free_port() for _ in range(n)]


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    return tiny_model_dir("llama")


@pytest.fixture(scope="module")
def seed(model_dir):
    proc = popen_launch_server(model_dir, other_args=["--remote-instance-weight-loader-timeout", "20"])
    yield proc
    kill_process_tree(proc.pid)


def _launch_client(model_dir: str, tmp_path: Path, seed_url: str, *extra: str, tp: int = 1):
    client_dir = config_only_copy(model_dir, tmp_path / "client_model")
    return popen_launch_server(
        client_dir, other_args=[*_fork_args(seed_url, _free_ports(tp)), "--tp-size", str(tp), *extra]
    )


def test_fork_tp1_bitwise_then_chain(seed, model_dir, tmp_path):
    client = _launch_client(model_dir, tmp_path / "c1", seed.base_url)
    try:
        seed_weights = _all_weights(seed.base_url)
        assert _all_weights(client.base_url) == seed_weights
        assert _greedy(client.base_url) == _greedy(seed.base_url)
        log = Path(client.log_path).read_text()
        assert "R-Fork from 127.0.0.1" in log and "GB/s" in log and "verify" in log
        # The forked client serves forks itself: seed -> client -> client2.
        client2 = _launch_client(model_dir, tmp_path / "c2", client.base_url)
        try:
            assert _all_weights(client2.base_url) == seed_weights
            assert _greedy(client2.base_url) == _greedy(seed.base_url)
        finally:
            kill_process_tree(client2.pid)
    finally:
        kill_process_tree(client.pid)


def test_fork_tp2_server_mode(tiny_model_dir, tmp_path):
    model_dir = tiny_model_dir("qwen2")
    seed = popen_launch_server(model_dir, other_args=["--tp-size", "2"])
    try:
        client = _launch_client(model_dir, tmp_path, seed.base_url, tp=2)
        try:
            for rank in range(2):
                a = requests.get(f"{seed.base_url}/remote_instance_weight_manifest", params={"rank": rank}).json()
                b = requests.get(f"{client.base_url}/remote_instance_weight_manifest", params={"rank": rank}).json()
                assert a["tensors"] == b["tensors"] and a["checksums"] == b["checksums"]
            assert _all_weights(client.base_url) == _all_weights(seed.base_url)
            assert _greedy(client.base_url) == _greedy(seed.base_url)
        finally:
            kill_process_tree(client.pid)
    finally:
        kill_process_tree(seed.pid)


def test_fork_engine_mode(seed, model_dir, tmp_path):
    client_dir = config_only_copy(model_dir, tmp_path / "engine_client")
    with sglang.Engine(
        model_path=client_dir,
        load_format="remote_instance",
        remote_instance_weight_loader_seed_instance_ip="127.0.0.1",
        remote_instance_weight_loader_seed_instance_service_port=int(seed.base_url.rsplit(":", 1)[1]),
        remote_instance_weight_loader_send_weights_group_ports=_free_ports(1),
    ) as engine:
        for name, values in _all_weights(seed.base_url).items():
            assert engine.get_weights_by_name(name, truncate_size=10**6) == values, name
        out = engine.generate(PROMPT, GREEDY)
    assert out["output_ids"] == _greedy(seed.base_url)


def _launch_expect_failure(args: list[str], timeout: float = 90) -> tuple[int, str, float]:
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "sglang.launch_server", "--port", str(find_free_port()), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return proc.returncode, proc.stdout + proc.stderr, time.monotonic() - start


def test_unreachable_seed_fails_fast(model_dir, tmp_path):
    client_dir = config_only_copy(model_dir, tmp_path / "m")
    dead = f"http://127.0.0.1:{find_free_port()}"
    code, out, _ = _launch_expect_failure(["--model-path", client_dir, *_fork_args(dead, [find_free_port()])])
    assert code != 0
    assert "cannot reach the seed" in out and "manifest" in out


@pytest.mark.parametrize(
    "options,extra,expected",
    [({"num_layers": 3}, [], "missing on the seed"), ({}, ["--dtype", "bfloat16"], "dtype float32 on the seed")],
)
def test_mismatched_client_is_refused_before_any_group(seed, tiny_model_dir, tmp_path, options, extra, expected):
    client_dir = config_only_copy(tiny_model_dir("llama", **options), tmp_path / "m")
    code, out, _ = _launch_expect_failure(
        ["--model-path", client_dir, *_fork_args(seed.base_url, [find_free_port()]), *extra]
    )
    assert code != 0
    assert "holds a different model" in out and expected in out
    assert _greedy(seed.base_url)  # the seed still serves


def test_other_tp_size_is_refused_before_any_group(seed, model_dir, tmp_path):
    client_dir = config_only_copy(model_dir, tmp_path / "m")
    code, out, _ = _launch_expect_failure(
        ["--model-path", client_dir, "--tp-size", "2", *_fork_args(seed.base_url, _free_ports(2))]
    )
    assert code != 0
    assert "the seed runs --tp-size 1 and this client 2: the NCCL backend needs equal TP sizes" in out
    assert "failed at step 'manifest'" in out  # refused before the lease, the group and any byte
    assert _greedy(seed.base_url)  # the seed still serves


def test_ports_of_wrong_length_are_rejected(model_dir, tmp_path):
    client_dir = config_only_copy(model_dir, tmp_path / "m")
    code, out, elapsed = _launch_expect_failure(
        ["--model-path", client_dir, *_fork_args("http://127.0.0.1:1", [find_free_port(), find_free_port()])]
    )
    assert code != 0 and "one port per TP rank" in out
    assert elapsed < 30


def test_busy_seed_answers_409_then_client_succeeds(seed, model_dir, tmp_path):
    # Hold the seed's fork slot the way a first client does, then let a second client wait its turn.
    lease = requests.post(f"{seed.base_url}/remote_instance_fork_lease", json={"ports": str(find_free_port())})
    assert lease.status_code == 200
    again = requests.post(f"{seed.base_url}/remote_instance_fork_lease", json={"ports": str(find_free_port())})
    assert again.status_code == 409 and "in progress" in again.json()["message"]
    client_dir = config_only_copy(model_dir, tmp_path / "m")
    port = find_free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "sglang.launch_server",
            "--model-path",
            client_dir,
            "--port",
            str(port),
            *_fork_args(seed.base_url, [find_free_port()]),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        time.sleep(8)
        assert proc.poll() is None  # still waiting for the slot, not failed
        requests.post(
            f"{seed.base_url}/remote_instance_fork_lease/release", json={"lease_id": lease.json()["lease_id"]}
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if requests.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            time.sleep(0.5)
        assert _greedy(f"http://127.0.0.1:{port}") == _greedy(seed.base_url)
    finally:
        kill_process_tree(proc.pid)


def test_busy_group_port_is_reported(seed):
    import socket

    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        s.listen()
        taken = s.getsockname()[1]
        r = requests.post(f"{seed.base_url}/remote_instance_fork_lease", json={"ports": str(taken)})
    assert r.status_code == 400 and str(taken) in r.json()["message"]


def test_client_dying_mid_transfer_leaves_seed_serving(seed, model_dir, tmp_path):
    script = Path(__file__).with_name("rfork_misbehaving_peer.py")
    proc = subprocess.run(
        [sys.executable, str(script), "client", seed.base_url, str(find_free_port())],
        timeout=120,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 3, proc.stdout + proc.stderr  # it died on purpose after the send started
    assert _greedy(seed.base_url)
    client = _launch_client(model_dir, tmp_path, seed.base_url)
    try:
        assert _greedy(client.base_url) == _greedy(seed.base_url)
    finally:
        kill_process_tree(client.pid)


@pytest.mark.parametrize(
    "role,expected,max_seconds",
    [("seed", "failed at step 'transfer'", 25), ("refuse", "simulated refusal", 25)],
)
def test_misbehaving_seed_fails_client_quickly(model_dir, tmp_path, role, expected, max_seconds):
    fake_port = find_free_port()
    fake = subprocess.Popen(
        [sys.executable, str(Path(__file__).with_name("rfork_misbehaving_peer.py")), role, model_dir, str(fake_port)],
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                requests.get(f"http://127.0.0.1:{fake_port}/health", timeout=1)
                break
            except requests.ConnectionError:
                time.sleep(0.3)
        client_dir = config_only_copy(model_dir, tmp_path / "m")
        args = _fork_args(f"http://127.0.0.1:{fake_port}", [find_free_port()])
        args[args.index("--remote-instance-weight-loader-timeout") + 1] = "30"
        code, out, elapsed = _launch_expect_failure(["--model-path", client_dir, *args])
        assert code != 0
        assert expected in out
        assert elapsed < max_seconds  # the fork timeout is 30 s: a refusal must not wait for it
    finally:
        kill_process_tree(fake.pid)


def test_keyed_seed_requires_the_key(model_dir, tmp_path):
    seed = popen_launch_server(model_dir, other_args=["--api-key", "seed-secret"])
    try:
        client_dir = config_only_copy(model_dir, tmp_path / "m")
        fork = _fork_args(seed.base_url, [find_free_port()])
        code, out, _ = _launch_expect_failure(
            ["--model-path", client_dir, *fork, "--remote-instance-weight-loader-seed-api-key", "wrong"]
        )
        assert code != 0 and "rejected the API key" in out
        # The client's own --api-key is what it sends by default.
        client = popen_launch_server(client_dir, other_args=[*fork, "--api-key", "seed-secret"])
        try:
            headers = {"Authorization": "Bearer seed-secret"}
            r = requests.post(
                f"{client.base_url}/generate", headers=headers, json={"text": PROMPT, "sampling_params": GREEDY}
            )
            s = requests.post(
                f"{seed.base_url}/generate", headers=headers, json={"text": PROMPT, "sampling_params": GREEDY}
            )
            assert r.json()["output_ids"] == s.json()["output_ids"]
        finally:
            kill_process_tree(client.pid)
    finally:
        kill_process_tree(seed.pid)


def test_stray_send_does_not_end_someone_elses_fork(seed):
    lease = requests.post(f"{seed.base_url}/remote_instance_fork_lease", json={"ports": str(find_free_port())})
    assert lease.status_code == 200
    try:
        stray = requests.post(
            f"{seed.base_url}/send_weights_to_remote_instance",
            json={"master_address": "127.0.0.1", "ports": "1", "group_name": "send_weights_10.9.9.9"},
        )
        assert stray.status_code == 400 and "no fork in progress" in stray.json()["message"]
        again = requests.post(f"{seed.base_url}/remote_instance_fork_lease", json={"ports": str(find_free_port())})
        assert again.status_code == 409  # the first client's slot survived
    finally:
        requests.post(
            f"{seed.base_url}/remote_instance_fork_lease/release", json={"lease_id": lease.json()["lease_id"]}
        )


def test_client_that_never_joins_does_not_stall_seed(seed):
    """The seed waits for a client's group on a thread of its own: a client that asks for a fork and then never
    joins costs the seed nothing while it waits, and the call fails with the seed's timeout (20 s here)."""
    port = find_free_port()
    lease = requests.post(f"{seed.base_url}/remote_instance_fork_lease", json={"ports": str(port)}).json()["lease_id"]
    body = {
        "master_address": "127.0.0.1",
        "ports": str(port),
        "group_name": "send_weights_127.0.0.9",
        "lease_id": lease,
        "send_weights": True,
    }
    answer: dict = {}
    started = time.monotonic()

    def ask() -> None:
        r = requests.post(f"{seed.base_url}/init_weights_send_group_for_remote_instance", json=body, timeout=60)
        answer.update(status=r.status_code, body=r.json(), seconds=time.monotonic() - started)

    asker = threading.Thread(target=ask)
    asker.start()
    time.sleep(1.0)  # the seed is now listening for a client that will never come
    latencies = []
    for _ in range(3):
        t0 = time.monotonic()
        assert len(_greedy(seed.base_url)) == GREEDY["max_new_tokens"]
        latencies.append(time.monotonic() - t0)
    assert "status" not in answer, "the fork call ended before the seed's timeout"
    assert max(latencies) < 5.0, latencies  # before, the first of these waited out the 20 s timeout
    asker.join(60)
    assert answer["status"] == 400 and "Failed to init group and send weights" in answer["body"]["message"]
    assert 15 < answer["seconds"] < 40, answer
    # The slot is free again for the next client.
    again = requests.post(f"{seed.base_url}/remote_instance_fork_lease", json={"ports": str(find_free_port())})
    assert again.status_code == 200
    requests.post(f"{seed.base_url}/remote_instance_fork_lease/release", json={"lease_id": again.json()["lease_id"]})
