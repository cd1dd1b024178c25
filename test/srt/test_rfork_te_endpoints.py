"""TransferEngine R-Fork endpoints: the bootstrap server, the main server's info endpoints, flags and auth."""

from __future__ import annotations

import logging
import math
import re

import pytest
import requests

import sglang
from sglang.srt.remote_instance.bootstrap_server import start_bootstrap_server
from sglang.srt.remote_instance.mooncake_guard import mooncake_available
from sglang.srt.server_args import ServerArgs, ServerArgsError
from sglang.test.rfork_utils import bootstrap_server
from sglang.test.test_utils import config_only_copy, find_free_port, kill_process_tree, popen_launch_server

KEY = "rfork-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
BAD_RANK = {"error": {"message": "Missing or invalid rank parameter"}}
ENV = {"MC_LOG_LEVEL": "WARNING"}
INFO = "/remote_instance_transfer_engine_info"


def failed(rank: int) -> dict:
    return {"error": {"message": f"Failed to get transfer engine info for rank {rank}"}}


needs_mooncake = pytest.mark.skipif(not mooncake_available(), reason="mooncake-transfer-engine is not installed")


@pytest.fixture
def bootstrap():
    with bootstrap_server(KEY) as served:
        yield served


def _register(url: str, body: object, headers: dict | None = None) -> requests.Response:
    return requests.put(f"{url}/register_transfer_engine_info", json=body, headers=headers or AUTH, timeout=5)


def test_bootstrap_register_and_get(bootstrap):
    url, _ = bootstrap
    assert requests.get(f"{url}/health", timeout=5).text == "OK"  # open without the key
    info = {"session_id": "127.0.0.1:15000", "weights_info_dict": {"w": [4096, 8, 4]}}
    assert _register(url, {"tp_rank": 0, "transfer_engine_info": info}).text == "OK"
    assert _register(url, {"rank": 1, "tp_rank": 0, "transfer_engine_info": info}).status_code == 200  # rank wins
    for rank in (0, 1):
        got = requests.get(f"{url}/get_transfer_engine_info", params={"rank": rank}, headers=AUTH, timeout=5)
        expected = ["127.0.0.1:15000", {"w": [4096, 8, 4]}]
        assert got.json() == {"rank": rank, "remote_instance_transfer_engine_info": expected}


def test_bootstrap_rejects_bad_requests(bootstrap):
    url, _ = bootstrap
    get = lambda **p: requests.get(f"{url}/get_transfer_engine_info", params=p, headers=AUTH, timeout=5)  # noqa: E731
    assert (get().status_code, get().text) == (400, "Missing or invalid rank parameter")
    assert get(rank="x").status_code == 400
    assert (get(rank=-1).status_code, get(rank=-1).text) == (400, "Invalid rank parameter")
    assert (get(rank=7).status_code, get(rank=7).text) == (404, "No transfer engine info for rank 7")
    assert _register(url, {"rank": 0}).status_code == 400
    negative = {"rank": -2, "transfer_engine_info": {"session_id": "a", "weights_info_dict": {}}}
    assert _register(url, negative).status_code == 400
    assert _register(url, {"rank": 0, "transfer_engine_info": {"session_id": 5}}).status_code == 400
    bad_json = requests.put(f"{url}/register_transfer_engine_info", data=b"{", headers=AUTH, timeout=5)
    assert bad_json.status_code == 400 and "not JSON" in bad_json.text
    assert requests.get(f"{url}/get_transfer_engine_info", params={"rank": 0}, timeout=5).status_code == 401
    assert _register(url, {"rank": 0}, headers={"Authorization": "Bearer wrong"}).status_code == 401


def test_bootstrap_port_taken_is_a_clear_error(bootstrap):
    _, server = bootstrap
    with pytest.raises(RuntimeError, match="--engine-info-bootstrap-port"):
        start_bootstrap_server("127.0.0.1", server.server_address[1])


@needs_mooncake
def test_incomplete_flags_fall_back_loudly_or_refuse(tiny_model_dir, tmp_path, caplog):
    model_dir = tiny_model_dir("llama")
    flags = {
        "load_format": "remote_instance",
        "remote_instance_weight_loader_backend": "transfer_engine",
        "remote_instance_weight_loader_seed_instance_ip": "127.0.0.1",
        "device": "cpu",
    }
    with caplog.at_level(logging.WARNING):
        args = ServerArgs(model_path=model_dir, **flags)
    assert args.load_format == "auto"
    assert "--remote-instance-weight-loader-seed-instance-service-port" in caplog.text
    with pytest.raises(ServerArgsError, match="no weight files"):
        ServerArgs(model_path=config_only_copy(model_dir, tmp_path / "nw"), **flags)


@pytest.fixture(scope="module")
def keyed_seed(tiny_model_dir):
    """A TransferEngine seed that requires an API key."""
    args = [
        "--remote-instance-weight-loader-start-seed-via-transfer-engine",
        "--engine-info-bootstrap-port",
        str(find_free_port()),
        "--api-key",
        KEY,
        "--max-total-tokens",
        "4096",
    ]
    proc = popen_launch_server(tiny_model_dir("llama"), other_args=args, env=ENV)  # /health needs no key
    yield proc
    kill_process_tree(proc.pid)


@needs_mooncake
def test_info_endpoint_shape_and_auth(keyed_seed):
    url = keyed_seed.base_url
    assert requests.get(f"{url}{INFO}", params={"rank": 0}, timeout=10).status_code == 401
    body = requests.get(f"{url}{INFO}", params={"rank": 0}, headers=AUTH, timeout=10).json()
    assert set(body) == {
        "rank",
        "remote_instance_transfer_engine_info",
        "transfer_engine_endpoints",
        "weights_meta",
        "instance",
        "shard_layout",
    }
    assert body["instance"] == {"http_port": int(url.rsplit(":", 1)[1])}
    layout = body["shard_layout"]  # for clients of another --tp-size
    assert (layout["tp_size"], layout["tp_rank"]) == (1, 0)
    assert body["rank"] == 0
    session_id, weights = body["remote_instance_transfer_engine_info"]
    assert re.fullmatch(r"127\.0\.0\.1:\d+", session_id)
    manifest = requests.get(f"{url}/remote_instance_weight_manifest", params={"rank": 0}, headers=AUTH, timeout=10)
    assert list(weights) == [t["name"] for t in manifest.json()["tensors"]]
    assert list(body["weights_meta"]) == list(weights) == list(layout["tensors"])
    for name, (ptr, numel, esize) in weights.items():  # exactly three values, as upstream's clients unpack
        meta = body["weights_meta"][name]
        assert ptr > 0 and numel == math.prod(meta["shape"]) and esize == 4 and meta["dtype"] == "float32"
        assert re.fullmatch(r"[0-9a-f]{16}", meta["checksum"])
    assert body["transfer_engine_endpoints"][0]["protocol"] == "tcp"
    old = requests.get(f"{url}/get_remote_instance_transfer_engine_info", params={"rank": 0}, headers=AUTH, timeout=10)
    assert old.json() == body


@needs_mooncake
@pytest.mark.parametrize("query", [{}, {"rank": "abc"}, {"rank": "-1"}])
def test_info_endpoint_bad_rank(keyed_seed, query):
    resp = requests.get(f"{keyed_seed.base_url}{INFO}", params=query, headers=AUTH, timeout=10)
    assert (resp.status_code, resp.json()) == (400, BAD_RANK)


@needs_mooncake
def test_info_endpoint_unknown_rank(keyed_seed):
    resp = requests.get(f"{keyed_seed.base_url}{INFO}", params={"rank": 3}, headers=AUTH, timeout=10)
    assert (resp.status_code, resp.json()) == (400, failed(3))


def _engine_client(model_dir: str, seed_url: str, **extra):
    return sglang.Engine(
        model_path=model_dir,
        load_format="remote_instance",
        remote_instance_weight_loader_backend="transfer_engine",
        remote_instance_weight_loader_seed_instance_ip="127.0.0.1",
        remote_instance_weight_loader_seed_instance_service_port=int(seed_url.rsplit(":", 1)[1]),
        remote_instance_weight_loader_timeout=30,
        max_total_tokens=4096,
        **extra,
    )


@needs_mooncake
def test_client_sends_the_seed_key(keyed_seed, tiny_model_dir, tmp_path):
    model_dir = tiny_model_dir("llama")
    expected = requests.get(
        f"{keyed_seed.base_url}/remote_instance_weight_manifest", params={"rank": 0}, headers=AUTH, timeout=10
    ).json()["checksums"]
    with _engine_client(
        config_only_copy(model_dir, tmp_path / "c"), keyed_seed.base_url, remote_instance_weight_loader_seed_api_key=KEY
    ) as engine:
        assert engine.rpc("remote_instance_weight_manifest")[0]["checksums"] == expected


@needs_mooncake
def test_seed_without_the_seed_flag(tiny_model_dir, tmp_path):
    model_dir = tiny_model_dir("llama")
    plain = popen_launch_server(model_dir, other_args=["--max-total-tokens", "4096"], env=ENV)
    try:
        # Whatever answers on its bootstrap port (another instance's, default 6789), it says it does not publish.
        resp = requests.get(f"{plain.base_url}{INFO}", params={"rank": 0}, timeout=10)
        assert resp.status_code == 400
        assert resp.json()["error"]["message"].startswith("This instance does not publish TransferEngine info")
        with pytest.raises(RuntimeError, match="not started with --remote-instance-weight-loader-start-seed-via-tr"):
            _engine_client(config_only_copy(model_dir, tmp_path / "c"), plain.base_url)
    finally:
        kill_process_tree(plain.pid)
