"""`--nnodes 2`: two launches on one host split the TP ranks; node 0 serves HTTP, node 1 runs rank 1."""

from __future__ import annotations

import subprocess
import sys
import time

import psutil
import requests

from sglang.test.hf_reference import hf_greedy
from sglang.test.test_utils import find_free_port, kill_process_tree, popen_launch_server


def test_two_node_launch_matches_hf_and_stops_together(tiny_model_dir):
    model = tiny_model_dir("llama")
    init = f"127.0.0.1:{find_free_port()}"
    common = ["--tp-size", "2", "--nnodes", "2", "--dist-init-addr", init]
    node1 = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "sglang.launch_server",
            "--model-path",
            model,
            "--port",
            str(find_free_port()),
            *common,
            "--node-rank",
            "1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    node0 = None
    try:
        node0 = popen_launch_server(model, other_args=[*common, "--node-rank", "0"])
        prompt = [10, 20, 30, 40, 50]
        r = requests.post(
            f"{node0.base_url}/generate",
            json={"input_ids": prompt, "sampling_params": {"temperature": 0, "max_new_tokens": 16, "ignore_eos": True}},
        )
        assert r.json()["output_ids"] == hf_greedy(model, [prompt], 16)[0]
        # Node 0 going away takes node 1 down too: no orphaned rank keeps its GPU.
        ranks = psutil.Process(node1.pid).children(recursive=True)
        assert ranks, "node 1 should run its TP rank in a child process"
        kill_process_tree(node0.pid)
        node0 = None
        node1.wait(timeout=60)
        _, alive = psutil.wait_procs(ranks, timeout=10)
        assert not alive, f"node 1 left processes behind: {alive}"
    finally:
        for proc in (node0, node1):
            if proc is not None:
                kill_process_tree(proc.pid)
        time.sleep(0.1)
