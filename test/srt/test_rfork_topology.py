"""Tensor R-Fork into another TP size over a real Mooncake TransferEngine (TCP on CPU): seed TP2 -> client TP1
and seed TP1 -> client TP2, each client checked against the disk-loaded seed of its own TP size."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from sglang.srt.remote_instance.mooncake_guard import mooncake_available
from sglang.test.rfork_utils import greedy_ids, te_client_args, weights_by_name
from sglang.test.rfork_utils import rank_checksums as checksums
from sglang.test.test_utils import config_only_copy, find_free_port, kill_process_tree, popen_launch_server

pytestmark = pytest.mark.skipif(not mooncake_available(), reason="mooncake-transfer-engine is not installed")

GREEDY = {"temperature": 0, "max_new_tokens": 12, "ignore_eos": True}
PROMPT = "A fork into another layout should still say"
SMALL_KV = ["--max-total-tokens", "2048"]
# Qwen3 seeds publish many small blocks, so its clients read in place as well as through scratch; Llama's
# publish the default (one block per segment at this size), so every piece of theirs is staged.
ENVS = {
    "llama": {"MC_LOG_LEVEL": "WARNING"},
    "qwen3": {"MC_LOG_LEVEL": "WARNING", "SGLANG_RFORK_MIN_BLOCK_BYTES": "64"},
}


def seed_args(tp: int) -> list[str]:
    """A disk-loaded TransferEngine seed of TP size tp."""
    return [
        "--tp-size",
        str(tp),
        "--remote-instance-weight-loader-start-seed-via-transfer-engine",
        "--engine-info-bootstrap-port",
        str(find_free_port()),
        *SMALL_KV,
    ]


def client_args(seed_url: str, tp: int) -> list[str]:
    """A TransferEngine client of TP size tp forking from seed_url."""
    return te_client_args(seed_url, "--tp-size", str(tp), *SMALL_KV, timeout=60)


def all_weights(url: str) -> dict[str, list]:
    """Every parameter's values as /get_weights_by_name gives them (all ranks' shards joined)."""
    return weights_by_name(url)


def greedy(url: str) -> list[int]:
    return greedy_ids(url, PROMPT, GREEDY)


@pytest.fixture(scope="module", params=["llama", "qwen3"])
def seeds(request, tiny_model_dir):
    """(arch, model dir, {tp: disk-loaded seed}) with a TP1 and a TP2 seed of one tiny model, started together."""
    arch = request.param
    model_dir = tiny_model_dir(arch, num_heads=4, num_kv_heads=2)
    with ThreadPoolExecutor(2) as pool:
        futures = {
            tp: pool.submit(popen_launch_server, model_dir, other_args=seed_args(tp), env=ENVS[arch]) for tp in (1, 2)
        }
        procs = {tp: f.result() for tp, f in futures.items()}
    yield arch, model_dir, procs
    for proc in procs.values():
        kill_process_tree(proc.pid)


@pytest.mark.parametrize("seed_tp,client_tp", [(2, 1), (1, 2)])
def test_fork_into_other_tp_matches_disk_load(seeds, seed_tp, client_tp, tmp_path):
    arch, model_dir, procs = seeds
    seed, reference = procs[seed_tp], procs[client_tp]
    client = popen_launch_server(
        config_only_copy(model_dir, tmp_path / "c"), other_args=client_args(seed.base_url, client_tp), env=ENVS[arch]
    )
    try:
        # Bit-equal, rank by rank, to the instance that loaded the target layout from disk; same greedy answer.
        assert checksums(client.base_url, client_tp) == checksums(reference.base_url, client_tp)
        assert all_weights(client.base_url) == all_weights(reference.base_url)
        assert greedy(client.base_url) == greedy(reference.base_url)
        log = Path(client.log_path).read_text(errors="replace")
        assert f"forked from a TP{seed_tp} seed" in log
        assert f"read from the TP{seed_tp} seed, against its per-block checksums" in log
        if arch == "qwen3":
            assert "0 in-place" not in log
        assert greedy(seed.base_url)  # the seed still serves
    finally:
        kill_process_tree(client.pid)
