"""Peers that act on the wire as upstream SGLang's R-Fork does, written from reading its code, for interop tests.

Clients (print one JSON line {"name": checksum} per TP rank, received bytes checksummed here):
  python rfork_upstream_peer.py nccl-client SEED_URL PORTS TP [DELAY]  # init, own group, send, receive
  python rfork_upstream_peer.py te-client SEED_URL TP              # GET info, unpack 3 values, one batch read
  python rfork_upstream_peer.py dying-nccl-client SEED_URL PORT join|send  # TP1: joins, then exits at once
Seeds (print {"ready": [checksums of each TP rank]} once serving; load TP shards of MODEL_DIR from disk, every
rank in this one process, each served as an upstream seed rank serves its own):
  python rfork_upstream_peer.py nccl-seed MODEL_DIR HTTP_PORT [TP]
  python rfork_upstream_peer.py te-seed MODEL_DIR HTTP_PORT [TP]

Upstream's pair group: torch's rendezvous over tcp://master:port, PrefixStore(group_name), then torch's own
process-group helper (which nests the store further), a barrier, one broadcast per named parameter from rank 0.
Buffers of a client come from the seed's parameter list in the order the seed reports it; the recorded-order test
(test_rfork_upstream_wire.py) pins that order to upstream's model classes.
"""

from __future__ import annotations

import datetime
import json
import os
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import requests
import torch
import torch.distributed as dist
from torch.distributed.distributed_c10d import Backend, PrefixStore, _new_process_group_helper, _world, rendezvous

from sglang.srt.remote_instance.manifest import tensor_checksum

TIMEOUT = datetime.timedelta(seconds=60)


def upstream_group(master: str, port: int, rank: int, group_name: str) -> dist.ProcessGroup:
    """The pair group as upstream's init_custom_process_group forms it (gloo: this is a CPU test)."""
    store, rank, world = next(rendezvous(f"tcp://{master}:{port}", rank, 2, timeout=TIMEOUT))
    store.set_timeout(TIMEOUT)
    store = PrefixStore(group_name, store)
    pg, _ = _new_process_group_helper(2, rank, [], Backend("gloo"), store, group_name=group_name, timeout=TIMEOUT)
    _world.pg_group_ranks[pg] = {0: 0, 1: 1}
    dist.barrier(group=pg)
    return pg


def _buffers(seed_url: str, rank: int) -> list[tuple[str, torch.Tensor]]:
    specs = requests.get(f"{seed_url}/remote_instance_weight_manifest", params={"rank": rank}, timeout=30).json()
    return [(s["name"], torch.empty(s["shape"], dtype=getattr(torch, s["dtype"]))) for s in specs["tensors"]]


def nccl_client(seed_url: str, ports: str, tp: int, delay: float = 0.0) -> None:
    host = seed_url.split("//")[1].rsplit(":", 1)[0]
    body = {"master_address": host, "ports": ports, "group_name": f"send_weights_{host}"}
    port_list = [int(p) for p in ports.split(",")]
    buffers = [_buffers(seed_url, r) for r in range(tp)]
    # Upstream: rank 0 fires init from a thread and does not look at the answer.
    init = {**body, "group_rank": 0, "world_size": 2, "backend": "nccl"}
    threading.Thread(
        target=requests.post, args=(f"{seed_url}/init_weights_send_group_for_remote_instance",), kwargs={"json": init}
    ).start()
    results: list[dict[str, str] | None] = [None] * tp

    def rank_main(r: int) -> None:
        if r:
            time.sleep(delay)  # a slower rank: rank 0's send reaches the seed before this rank's group exists
        pg = upstream_group(host, port_list[r], 1, f"send_weights_{host}_{port_list[r]}_{r}")
        if r == 0:  # right after its own group forms, as upstream does
            threading.Thread(
                target=requests.post, args=(f"{seed_url}/send_weights_to_remote_instance",), kwargs={"json": body}
            ).start()
        for _, t in buffers[r]:
            dist.broadcast(t, src=0, group=pg)
        results[r] = {n: tensor_checksum(t) for n, t in buffers[r]}

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(tp)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for r in results:
        print(json.dumps(r), flush=True)


def dying_nccl_client(seed_url: str, port: int, when: str) -> None:
    """An upstream-style TP1 client that joins the seed's group and then dies: at once ("join"), or right after
    asking for the weights ("send"), without reading them."""
    host = seed_url.split("//")[1].rsplit(":", 1)[0]
    body = {"master_address": host, "ports": str(port), "group_name": f"send_weights_{host}"}
    init = {**body, "group_rank": 0, "world_size": 2, "backend": "nccl"}
    threading.Thread(
        target=requests.post, args=(f"{seed_url}/init_weights_send_group_for_remote_instance",), kwargs={"json": init}
    ).start()
    upstream_group(host, port, 1, f"send_weights_{host}_{port}_0")
    if when == "send":
        url = f"{seed_url}/send_weights_to_remote_instance"
        threading.Thread(target=requests.post, args=(url,), kwargs={"json": body}, daemon=True).start()
        time.sleep(0.5)  # the request is out; its answer and the weights are never read
    print(json.dumps({"joined": True}), flush=True)
    os._exit(0)  # no teardown: as a killed process leaves the group


def te_client(seed_url: str, tp: int) -> None:
    from mooncake.engine import TransferEngine

    for r in range(tp):
        info = requests.get(f"{seed_url}/remote_instance_transfer_engine_info", params={"rank": r}, timeout=30).json()
        session_id, weights = info["remote_instance_transfer_engine_info"]
        engine = TransferEngine()
        assert engine.initialize("127.0.0.1", "P2PHANDSHAKE", "tcp", "") == 0
        out, locals_, remotes, lengths = {}, [], [], []
        for name, (ptr, numel, esize) in weights.items():  # exactly three, as upstream unpacks
            t = torch.zeros(numel * esize, dtype=torch.uint8)
            out[name] = t
            locals_.append(t.data_ptr())
            remotes.append(ptr)
            lengths.append(numel * esize)
        assert engine.batch_transfer_sync_read(session_id, locals_, remotes, lengths) == 0
        print(json.dumps({n: tensor_checksum(t) for n, t in out.items()}), flush=True)


class _Seed(BaseHTTPRequestHandler):
    """Upstream's seed endpoints (only these: our manifest and lease are 404 here, as upstream)."""

    tensors: list[list[tuple[str, torch.Tensor]]] = []  # per TP rank
    groups: dict[str, dist.ProcessGroup] = {}
    te_info: list[list] = []  # per TP rank: [session_id, {name: [ptr, numel, element_size]}]

    def log_message(self, *args: object) -> None:
        pass

    def _reply(self, status: int, data: object) -> None:
        raw = json.dumps(data).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def do_GET(self) -> None:
        path, _, query = self.path.partition("?")
        if path == "/remote_instance_transfer_engine_info" and self.te_info:
            rank = int(dict(p.split("=", 1) for p in query.split("&") if "=" in p).get("rank", 0))
            if not 0 <= rank < len(self.te_info):
                self._reply(400, {"detail": f"rank {rank} out of range"})
                return
            self._reply(200, {"rank": rank, "remote_instance_transfer_engine_info": self.te_info[rank]})
        elif path == "/get_server_info":
            self._reply(200, {"tp_size": len(self.tensors)})
        else:
            self._reply(404, {"detail": "Not Found"})

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["content-length"])) or b"{}")
        ports = [int(p) for p in body.get("ports", "0").split(",")]
        # Each seed rank r takes ports[r] and names its group <group_name>_<port>_<r>, as upstream's ranks do.
        keys = [f"{body.get('group_name')}_{ports[r]}_{r}" for r in range(len(self.tensors))]
        if self.path == "/init_weights_send_group_for_remote_instance":

            def init(r: int) -> None:
                self.groups[keys[r]] = upstream_group(body["master_address"], ports[r], 0, keys[r])

            _every_rank(init, len(self.tensors))
            self._reply(200, {"success": True, "message": "Succeeded to init group through nccl."})
        elif self.path == "/send_weights_to_remote_instance":

            def send(r: int) -> None:
                pg = self.groups.pop(keys[r])
                for _, t in self.tensors[r]:
                    dist.broadcast(t, src=0, group=pg)
                dist.destroy_process_group(pg)

            _every_rank(send, len(self.tensors))
            self._reply(200, {"success": True, "message": "Succeeded to send weights through nccl."})
        else:
            self._reply(404, {"detail": "Not Found"})


def _every_rank(fn, tp: int) -> None:
    """Run fn(rank) for every seed rank at once, as upstream's scheduler processes would."""
    threads = [threading.Thread(target=fn, args=(r,)) for r in range(tp)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def seed(kind: str, model_dir: str, http_port: int, tp: int) -> None:
    from sglang.srt.configs.load_config import LoadConfig
    from sglang.srt.configs.model_config import ModelConfig
    from sglang.srt.distributed import parallel_state
    from sglang.srt.model_loader import get_model_loader

    for rank in range(tp):
        # Loading a shard needs only this rank's index and the TP size; no collective runs while loading.
        parallel_state._TP = parallel_state.TPGroup(rank=rank, size=tp, device=torch.device("cpu"))
        model = get_model_loader(LoadConfig()).load_model(ModelConfig.from_path(model_dir), torch.device("cpu"))
        _Seed.tensors.append([(n, p.data) for n, p in model.named_parameters()])
    if kind == "te-seed":
        from mooncake.engine import TransferEngine

        for tensors in _Seed.tensors:  # one engine per rank, as each upstream rank has its own
            engine = TransferEngine()
            assert engine.initialize("127.0.0.1", "P2PHANDSHAKE", "tcp", "") == 0
            for _, t in tensors:
                assert engine.register_memory(t.data_ptr(), t.numel() * t.element_size()) == 0
            weights = {n: [t.data_ptr(), t.numel(), t.element_size()] for n, t in tensors}
            _Seed.te_info.append([f"127.0.0.1:{engine.get_rpc_port()}", weights])
            _engines.append(engine)
    server = ThreadingHTTPServer(("127.0.0.1", http_port), _Seed)
    ready = [{n: tensor_checksum(t) for n, t in tensors} for tensors in _Seed.tensors]
    print(json.dumps({"ready": ready}), flush=True)
    server.serve_forever()


_engines: list = []  # kept alive for as long as the seed serves


if __name__ == "__main__":
    role = sys.argv[1]
    if role == "nccl-client":
        nccl_client(sys.argv[2], sys.argv[3], int(sys.argv[4]), float(sys.argv[5]) if len(sys.argv) > 5 else 0.0)
    elif role == "dying-nccl-client":
        dying_nccl_client(sys.argv[2], int(sys.argv[3]), sys.argv[4])
    elif role == "te-client":
        te_client(sys.argv[2], int(sys.argv[3]))
    else:
        seed(role, sys.argv[2], int(sys.argv[3]), int(sys.argv[4]) if len(sys.argv) > 4 else 1)
