"""R-Fork against peers that act on the wire as upstream SGLang does (rfork_upstream_peer.py), both directions, both
backends (gloo and Mooncake TCP on CPU): every tensor must arrive bit-identical (checksums of the received bytes)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import requests

from sglang.srt.remote_instance.mooncake_guard import mooncake_available
from sglang.test.rfork_utils import fork_client_args
from sglang.test.test_utils import config_only_copy, find_free_port, kill_process_tree, popen_launch_server

PEER = str(Path(__file__).with_name("rfork_upstream_peer.py"))
needs_mooncake = pytest.mark.skipif(not mooncake_available(), reason="mooncake-transfer-engine is not installed")
ENV = {"MC_LOG_LEVEL": "WARNING"}

# named_parameters() order of upstream SGLang's model classes (models/llama.py, qwen2.py, qwen3.py: attention
# registers qkv_proj, o_proj, Qwen3 q_norm and k_norm first; then the MLP, then the two layer norms), per layer.
UPSTREAM_LAYER_ORDER = {
    "llama": ["self_attn.qkv_proj.weight", "self_attn.o_proj.weight"],
    "qwen2": ["self_attn.qkv_proj.weight", "self_attn.qkv_proj.bias", "self_attn.o_proj.weight"],
    "qwen3": [
        "self_attn.q_norm.weight",
        "self_attn.k_norm.weight",
        "self_attn.qkv_proj.weight",
        "self_attn.o_proj.weight",
    ],
}
LAYER_TAIL = [
    "mlp.gate_up_proj.weight",
    "mlp.down_proj.weight",
    "input_layernorm.weight",
    "post_attention_layernorm.weight",
]


def upstream_order(arch: str, layers: int) -> list[str]:
    """The broadcast order an upstream peer of this architecture uses (untied lm_head, as the tiny models)."""
    per_layer = UPSTREAM_LAYER_ORDER[arch] + LAYER_TAIL
    body = [f"model.layers.{i}.{name}" for i in range(layers) for name in per_layer]
    return ["model.embed_tokens.weight", *body, "model.norm.weight", "lm_head.weight"]


def manifest(url: str, rank: int) -> dict:
    return requests.get(f"{url}/remote_instance_weight_manifest", params={"rank": rank}, timeout=30).json()


def run_peer(*args: str, timeout: float = 120) -> list[dict]:
    out = subprocess.run(
        [sys.executable, PEER, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **ENV},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


@pytest.fixture(scope="module", params=[("llama", 2), ("qwen2", 1), ("qwen3", 2)], ids=lambda p: f"{p[0]}-tp{p[1]}")
def seed(request, tiny_model_dir):
    """Our seed (NCCL and, where Mooncake imports, TransferEngine) of one architecture and TP size."""
    arch, tp = request.param
    args = ["--tp-size", str(tp), "--max-total-tokens", "2048", "--remote-instance-weight-loader-timeout", "30"]
    if mooncake_available():
        args += ["--remote-instance-weight-loader-start-seed-via-transfer-engine"]
        args += ["--engine-info-bootstrap-port", str(find_free_port())]
    proc = popen_launch_server(tiny_model_dir(arch), other_args=args, env=ENV)
    proc.arch, proc.tp = arch, tp
    yield proc
    kill_process_tree(proc.pid)


def test_parameter_order_is_upstreams(seed):
    for rank in range(seed.tp):
        names = [t["name"] for t in manifest(seed.base_url, rank)["tensors"]]
        assert names == upstream_order(seed.arch, 2)


def test_upstream_nccl_client_forks_from_our_seed(seed):
    ports = ",".join(str(find_free_port()) for _ in range(seed.tp))
    # Rank 1 joins 2 s late: upstream's send then reaches a seed rank whose group is still forming (it must wait,
    # not fail while the other ranks defer: that mix stopped the seed before).
    received = run_peer("nccl-client", seed.base_url, ports, str(seed.tp), "2" if seed.tp > 1 else "0")
    assert received == [manifest(seed.base_url, r)["checksums"] for r in range(seed.tp)]
    r = requests.post(f"{seed.base_url}/generate", json={"text": "hi", "sampling_params": {"max_new_tokens": 2}})
    assert r.status_code == 200


@needs_mooncake
def test_upstream_te_client_forks_from_our_seed(seed):
    received = run_peer("te-client", seed.base_url, str(seed.tp))
    assert received == [manifest(seed.base_url, r)["checksums"] for r in range(seed.tp)]


def _upstream_seed(kind: str, model_dir: str, tp: int = 1):
    port = find_free_port()
    proc = subprocess.Popen(
        [sys.executable, PEER, kind, model_dir, str(port), str(tp)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, **ENV},
    )
    line = proc.stdout.readline()
    assert line.startswith("{"), "upstream seed peer did not start"
    return proc, port, json.loads(line)["ready"]


def _fork_args(port: int, backend: str, *extra: str, tp: int = 1) -> list[str]:
    args = fork_client_args(port, backend, "--max-total-tokens", "2048", "--tp-size", str(tp))
    if backend == "nccl":
        ports = ",".join(str(find_free_port()) for _ in range(tp))
        args += ["--remote-instance-weight-loader-send-weights-group-ports", f"[{ports}]"]
    return [*args, *extra]


@pytest.mark.parametrize(
    "backend,arch,tp",
    [
        ("nccl", "qwen3", 1),
        ("nccl", "llama", 2),
        pytest.param("transfer_engine", "llama", 1, marks=needs_mooncake),
        pytest.param("transfer_engine", "qwen3", 2, marks=needs_mooncake),
    ],
)
def test_our_client_forks_from_upstream_seed(backend, arch, tp, tiny_model_dir, tmp_path):
    model_dir = tiny_model_dir(arch)
    peer, port, expected = _upstream_seed("nccl-seed" if backend == "nccl" else "te-seed", model_dir, tp)
    try:
        args = _fork_args(port, backend, tp=tp)
        client = popen_launch_server(config_only_copy(model_dir, tmp_path / "c"), other_args=args, env=ENV)
        try:
            assert [manifest(client.base_url, r)["checksums"] for r in range(tp)] == expected
        finally:
            kill_process_tree(client.pid)
    finally:
        peer.kill()


def test_refuse_unverified_stops_before_the_transfer(tiny_model_dir, tmp_path):
    model_dir = tiny_model_dir("llama")
    peer, port, _ = _upstream_seed("nccl-seed", model_dir)
    try:
        args = _fork_args(port, "nccl", "--remote-instance-weight-loader-refuse-unverified")
        client_dir = str(config_only_copy(model_dir, tmp_path / "c"))
        launch = [
            sys.executable,
            "-m",
            "sglang.launch_server",
            "--model-path",
            client_dir,
            "--port",
            str(find_free_port()),
        ]
        proc = subprocess.run([*launch, *args], capture_output=True, text=True, timeout=120)
        assert proc.returncode != 0
        assert "refuse-unverified" in proc.stderr and "/remote_instance_weight_manifest" in proc.stderr
    finally:
        peer.kill()


@pytest.fixture(scope="module")
def loopback_seed(tiny_model_dir):
    proc = popen_launch_server(
        tiny_model_dir("llama"), other_args=["--host", "127.0.0.1", "--remote-instance-weight-loader-timeout", "8"]
    )
    yield proc
    kill_process_tree(proc.pid)


@pytest.mark.parametrize("ports", ["99999", "-5", "abc"])
def test_lease_rejects_bad_ports(loopback_seed, ports):
    r = requests.post(f"{loopback_seed.base_url}/remote_instance_fork_lease", json={"ports": ports}, timeout=10)
    assert r.status_code == 400 and "ports" in r.json()["message"]


@pytest.mark.parametrize(
    "address,expected", [("10.255.1.2", "not where this seed serves"), ("no-such.invalid", "resolve")]
)
def test_master_address_must_be_the_seed(loopback_seed, address, expected):
    body = {"master_address": address, "ports": str(find_free_port()), "group_name": "send_weights_x"}
    start = time.monotonic()
    r = requests.post(f"{loopback_seed.base_url}/init_weights_send_group_for_remote_instance", json=body, timeout=30)
    assert r.status_code == 400 and expected in r.json()["message"]
    assert time.monotonic() - start < 10


def test_group_port_listens_where_the_seed_serves_and_admits_only_the_caller(loopback_seed):
    port = find_free_port()
    body = {"master_address": "127.0.0.1", "ports": str(port), "group_name": "send_weights_127.0.0.1"}
    url = f"{loopback_seed.base_url}/init_weights_send_group_for_remote_instance"
    answer: list = []
    threading.Thread(target=lambda: answer.append(requests.post(url, json=body, timeout=30)), daemon=True).start()
    deadline = time.monotonic() + 10
    server = psutil.Process(loopback_seed.pid)
    listening: list = []
    while not listening and time.monotonic() < deadline:
        procs = [server, *server.children(recursive=True)]
        listening = [
            c.laddr.ip for p in procs for c in p.net_connections() if c.status == "LISTEN" and c.laddr.port == port
        ]
        time.sleep(0.1)
    assert listening == ["127.0.0.1"]
    # Another address (127.0.0.2 is loopback too) is cut off at once: it never reaches the store.
    with socket.socket() as s:
        s.bind(("127.0.0.2", 0))
        s.settimeout(5)
        s.connect(("127.0.0.1", port))
        assert s.recv(1) == b""
    # The caller never joins: the seed gives the slot and the port back after its timeout (8 s).
    while not answer and time.monotonic() < deadline + 20:
        time.sleep(0.2)
    assert answer and answer[0].status_code == 400
    procs = [server, *server.children(recursive=True)]
    assert not [c for p in procs for c in p.net_connections() if c.status == "LISTEN" and c.laddr.port == port]
    lease = requests.post(f"{loopback_seed.base_url}/remote_instance_fork_lease", json={"ports": str(port)}, timeout=10)
    assert lease.status_code == 200
    requests.post(
        f"{loopback_seed.base_url}/remote_instance_fork_lease/release", json={"lease_id": lease.json()["lease_id"]}
    )


@needs_mooncake
def test_other_tp_from_upstream_te_seed_is_refused_by_name(tiny_model_dir, tmp_path):
    """An upstream seed publishes no shard layout: a client of another --tp-size is told to use the seed's."""
    model_dir = tiny_model_dir("llama")
    peer, port, _ = _upstream_seed("te-seed", model_dir)
    try:
        args = _fork_args(port, "transfer_engine", "--tp-size", "2")
        client_dir = str(config_only_copy(model_dir, tmp_path / "c"))
        launch = [sys.executable, "-m", "sglang.launch_server", "--model-path", client_dir]
        proc = subprocess.run(
            [*launch, "--port", str(find_free_port()), *args], capture_output=True, text=True, timeout=120
        )
        assert proc.returncode != 0
        # The peer answers /get_server_info with its tp_size, so the client names the layout it lacks and the fix.
        assert "publishes no shard layout" in proc.stderr and "start the client with --tp-size 1" in proc.stderr
    finally:
        peer.kill()
