"""A client that joins the seed's NCCL pair group and dies (or never speaks) leaves nothing behind on the seed.

After a bounded time (the fork slot's lease: twice the seed's timeout plus 5 s) the seed's processes run no more
threads than after a normal fork, nothing listens on the group port, and the slot takes the next fork.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import requests

from sglang.test.test_utils import find_free_port, kill_process_tree, popen_launch_server

PEER = str(Path(__file__).with_name("rfork_upstream_peer.py"))
SEED_TIMEOUT_S = 4
# The slot's lease (2 * timeout + 5) plus slack for the teardown threads on a busy 2-core machine.
BOUND_S = 2 * SEED_TIMEOUT_S + 5 + 10


@pytest.fixture(scope="module")
def seed(tiny_model_dir):
    args = ["--host", "127.0.0.1", "--remote-instance-weight-loader-timeout", str(SEED_TIMEOUT_S)]
    proc = popen_launch_server(tiny_model_dir("llama"), other_args=args)
    # A normal fork first: whatever a fork starts once and keeps (thread pools, ...) is in the baseline.
    ports = str(find_free_port())
    out = subprocess.run(
        [sys.executable, PEER, "nccl-client", proc.base_url, ports, "1"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-3000:]
    yield proc
    kill_process_tree(proc.pid)


def tree(seed) -> list[psutil.Process]:
    main = psutil.Process(seed.pid)
    return [main, *main.children(recursive=True)]


def threads(seed) -> int:
    """Threads of the scheduler processes, where pair groups, their stores and gates live (the HTTP process's
    executor may grow a worker for a name lookup, which is not the fork's)."""
    return sum(p.num_threads() for p in tree(seed) if "--multiprocessing-fork" in p.cmdline())


def listening(seed) -> set[int]:
    return {c.laddr.port for p in tree(seed) for c in p.net_connections("tcp") if c.status == psutil.CONN_LISTEN}


def slot_is_free(seed) -> bool:
    lease = requests.post(f"{seed.base_url}/remote_instance_fork_lease", json={"ports": str(find_free_port())})
    if lease.status_code != 200:
        return False
    requests.post(f"{seed.base_url}/remote_instance_fork_lease/release", json={"lease_id": lease.json()["lease_id"]})
    return True


def settle(seed, baseline_threads: int, baseline_ports: set[int]) -> float:
    """Seconds until the seed is back to its baseline; fails the test past BOUND_S with what was left."""
    start = time.monotonic()
    while True:
        left = {"threads": threads(seed) - baseline_threads, "listeners": listening(seed) - baseline_ports}
        if left["threads"] <= 0 and not left["listeners"] and slot_is_free(seed):
            return time.monotonic() - start
        assert time.monotonic() - start < BOUND_S, f"left behind after {BOUND_S} s: {left}"
        time.sleep(0.5)


@pytest.mark.parametrize("when", ["join", "send"])
def test_client_dies_after_joining(seed, when):
    baseline_threads, baseline_ports = threads(seed), listening(seed)
    port = find_free_port()
    out = subprocess.run(
        [sys.executable, PEER, "dying-nccl-client", seed.base_url, str(port), when],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert '{"joined": true}' in out.stdout, out.stderr[-3000:]
    settle(seed, baseline_threads, baseline_ports)
    assert (
        requests.post(
            f"{seed.base_url}/generate", json={"text": "hi", "sampling_params": {"max_new_tokens": 2}}
        ).status_code
        == 200
    )


def test_client_connects_and_stalls(seed):
    baseline_threads, baseline_ports = threads(seed), listening(seed)
    port = find_free_port()
    body = {"master_address": "127.0.0.1", "ports": str(port), "group_name": "send_weights_127.0.0.1"}
    url = f"{seed.base_url}/init_weights_send_group_for_remote_instance"
    # Upstream's client fires init from a thread and does not wait for it; here it is a process of its own.
    pending = psutil.Popen([sys.executable, "-c", f"import requests; requests.post({url!r}, json={body!r})"])
    try:
        deadline = time.monotonic() + 30
        while port not in listening(seed):
            assert time.monotonic() < deadline, "the group port never opened"
            time.sleep(0.1)
        # Connected to the store, never a word: the store waits for a worker that never registers.
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            settle(seed, baseline_threads, baseline_ports)
    finally:
        pending.kill()
