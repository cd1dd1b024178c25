"""A peer that dies in the middle of an R-Fork (NCCL backend wire protocol), for fault tests.

python rfork_misbehaving_peer.py client SEED_URL GROUP_PORT   # joins, receives a little, exits 3
python rfork_misbehaving_peer.py seed MODEL_DIR HTTP_PORT     # serves a fork, dies halfway through sending
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import requests
import torch

from sglang.srt.remote_instance.manifest import TensorSpec
from sglang.srt.remote_instance.pair_group import join_seed_group, open_seed_group, wait_work

CPU = torch.device("cpu")


def run_client(seed_url: str, port: int) -> None:
    manifest = requests.get(f"{seed_url}/remote_instance_weight_manifest", params={"rank": 0}).json()
    specs = [TensorSpec.from_json(d) for d in manifest["tensors"]]
    lease = requests.post(f"{seed_url}/remote_instance_fork_lease", json={"ports": str(port)}).json()["lease_id"]
    body = {
        "master_address": "127.0.0.1",
        "ports": str(port),
        "group_name": "send_weights_127.0.0.1",
        "lease_id": lease,
    }
    threading.Thread(
        target=requests.post,
        args=(f"{seed_url}/init_weights_send_group_for_remote_instance",),
        kwargs={"json": body},
        daemon=True,
    ).start()
    group = join_seed_group("127.0.0.1", port, f"send_weights_127.0.0.1_{port}_0", CPU, 60)
    threading.Thread(
        target=requests.post, args=(f"{seed_url}/send_weights_to_remote_instance",), kwargs={"json": body}, daemon=True
    ).start()
    import torch.distributed as dist

    opts = dist.BroadcastOptions()
    for spec in specs[:2]:
        t = torch.empty(spec.shape, dtype=getattr(torch, spec.dtype))
        wait_work(group.pg.broadcast([t], opts), time.monotonic() + 30, "receive")
    os._exit(3)


def run_seed(model_dir: str, http_port: int, refuse: bool = False) -> None:
    from sglang.srt.configs.load_config import LoadConfig
    from sglang.srt.configs.model_config import ModelConfig
    from sglang.srt.model_loader import get_model_loader
    from sglang.srt.remote_instance.manifest import build_manifest, model_checksums, weight_tensors

    model = get_model_loader(LoadConfig()).load_model(ModelConfig.from_path(model_dir), CPU)
    manifest = {
        "tensors": [s.to_json() for s in build_manifest(model)],
        "checksums": model_checksums(model),
    }
    tensors = [t for _, t in weight_tensors(model)]
    groups: dict[str, object] = {}

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def _reply(self, data: dict) -> None:
            raw = json.dumps(data).encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

        def do_GET(self) -> None:
            self._reply(manifest if self.path.startswith("/remote_instance_weight_manifest") else {})

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["content-length"])) or b"{}")
            if self.path == "/init_weights_send_group_for_remote_instance" and refuse:
                raw = json.dumps({"success": False, "message": "Failed to init group: simulated refusal."}).encode()
                self.send_response(400)
                self.send_header("content-length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)
                return
            if self.path == "/init_weights_send_group_for_remote_instance":
                port = int(body["ports"])
                groups["g"] = open_seed_group(
                    "127.0.0.1", port, {"127.0.0.1"}, f"{body['group_name']}_{port}_0", CPU, 60
                )
            if self.path == "/send_weights_to_remote_instance" or body.get("send_weights"):
                half = tensors[: len(tensors) // 2]
                groups["g"].broadcast_all(half, time.monotonic() + 30)
                os._exit(1)  # the seed dies halfway through the transfer
            self._reply({"success": True, "lease_id": "fake"})

    ThreadingHTTPServer(("127.0.0.1", http_port), Handler).serve_forever()


if __name__ == "__main__":
    role, target, port_arg = sys.argv[1], sys.argv[2], int(sys.argv[3])
    if role == "client":
        run_client(target, port_arg)
    else:
        run_seed(target, port_arg, refuse=role == "refuse")
