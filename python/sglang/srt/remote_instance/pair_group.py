"""A two-member process group (seed rank 0, client rank 1) outside the TP world, with bounded waits."""

from __future__ import annotations

import datetime
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from sglang.srt.metrics import rfork_progress
from sglang.srt.remote_instance.store_gate import StoreGate, normalize_ip


class PairGroupError(RuntimeError):
    """The pair group could not be formed or an operation on it did not finish in time."""


@dataclass
class PairGroup:
    """One seed rank and one client rank; the seed hosts the rendezvous store on its port."""

    name: str
    port: int
    rank: int
    device: torch.device
    store: Any
    pg: Any
    gate: StoreGate | None = None

    def broadcast_all(self, tensors: list[torch.Tensor], deadline: float) -> None:
        """Broadcast every tensor from the seed (rank 0) in order; wait until done or the deadline."""
        opts = dist.BroadcastOptions()
        opts.rootRank = 0
        opts.rootTensor = 0
        work = None
        for t in tensors:  # empty ones too: upstream peers broadcast every parameter, and gloo counts collectives
            work = self.pg.broadcast([t], opts)
            rfork_progress.enqueued(work, t.numel() * t.element_size())
        if work is not None:
            wait_work(work, deadline, f"broadcast on group {self.name}")

    def close(self) -> None:
        """Release the communicator; abort first so a half-finished collective cannot pin it."""
        abort = getattr(self.pg, "abort", None)
        if self.device.type == "cuda" and abort is not None:
            try:
                abort()
            except RuntimeError:
                pass
        if self.gate is not None:
            self.gate.close()
        self.pg = None
        self.store = None

    def close_later(self) -> None:
        """Close in a background thread. Tearing down an NCCL communicator takes ~0.5 s on H200s, ten times
        the transfer itself; nobody needs to wait for it once the bytes have landed. A later group on the same
        port waits for this one to let go of it (see open_pair_group)."""
        thread = threading.Thread(target=self.close, name=f"close-{self.name}", daemon=True)
        with _CLOSING_LOCK:
            _CLOSING[self.port] = thread
        thread.start()


# Groups being torn down in the background, by rendezvous port.
_CLOSING: dict[int, threading.Thread] = {}
_CLOSING_LOCK = threading.Lock()
# Seconds a new group waits for an old one on its port to finish closing.
CLOSE_WAIT_S = 30.0


def _wait_closed(port: int) -> None:
    with _CLOSING_LOCK:
        thread = _CLOSING.pop(port, None)
    if thread is not None:
        thread.join(CLOSE_WAIT_S)


def wait_work(work: Any, deadline: float, what: str) -> None:
    """Poll a collective until it completes; never block past deadline (a dead peer must not hang us)."""
    while not work.is_completed():
        if time.monotonic() > deadline:
            raise PairGroupError(f"{what} did not finish before the timeout")
        time.sleep(0.0005)  # a fork's whole transfer can take 50 ms; coarse polling would show in it
    work.wait()  # raises the collective's own error, if it failed


def _group_store(store: Any, name: str, device: torch.device) -> Any:
    """The store a pair-group backend sees, nested as upstream's peers nest it: the group name (upstream's own
    PrefixStore), then torch's process-group helper adds "<name>/" and "<device type>/"."""
    return dist.PrefixStore(f"{device.type}/", dist.PrefixStore(f"{name}/", dist.PrefixStore(name, store)))


def _backend(store: Any, rank: int, device: torch.device, timeout: datetime.timedelta) -> Any:
    if device.type == "cuda":
        opts = dist.ProcessGroupNCCL.Options()
        opts.is_high_priority_stream = False
        opts._timeout = timeout
        pg = dist.ProcessGroupNCCL(store, rank, 2, opts)
    else:
        pg = dist.ProcessGroupGloo(store, rank, 2, timeout)
    pg._set_sequence_number_for_group()  # torch's helper does this; gloo's rank 0 publishes it through the store
    return pg


def _form(store: Any, rank: int, name: str, port: int, device: torch.device, timeout_s: float, gate: Any) -> PairGroup:
    """Build the backend on store and run the barrier both sides start with (on NCCL it creates the communicator,
    so its cost counts as setup)."""
    timeout = datetime.timedelta(seconds=max(1.0, timeout_s))
    deadline = time.monotonic() + timeout_s
    try:
        pg = _backend(_group_store(store, name, device), rank, device, timeout)
    except RuntimeError as e:
        if gate is not None:
            gate.close()
        raise PairGroupError(f"could not form group {name}: {e}") from None
    group = PairGroup(name, port, rank, device, store, pg, gate)
    opts = dist.BarrierOptions()
    if device.type == "cuda":
        opts.device_ids = [device.index or 0]
    try:
        wait_work(pg.barrier(opts), deadline, f"barrier on group {name}")
    except Exception:
        group.close()
        raise
    return group


def open_seed_group(
    bind_host: str, port: int, allowed_peers: set[str], name: str, device: torch.device, timeout_s: float
) -> PairGroup:
    """Seed side (rank 0): serve the rendezvous on bind_host:port to allowed_peers only, then form the group."""
    timeout = datetime.timedelta(seconds=max(1.0, timeout_s))
    _wait_closed(port)
    inner = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    inner.bind(("127.0.0.1", 0))
    inner.listen(16)
    try:
        gate = StoreGate(bind_host, port, frozenset(normalize_ip(p) for p in allowed_peers), inner.getsockname()[1])
        gate.start()
    except OSError as e:
        inner.close()
        raise PairGroupError(f"could not listen on {bind_host}:{port}: {e.strerror or e}") from None
    try:
        # The store owns the pre-bound loopback socket; its constructor returns once the client has connected.
        store = dist.TCPStore("127.0.0.1", inner.getsockname()[1], 2, True, timeout, True, False, inner.detach(), True)
    except RuntimeError as e:
        gate.close()
        refused = f" (refused connections from {sorted(set(gate.refused))})" if gate.refused else ""
        raise PairGroupError(f"no client joined on {bind_host}:{port} within {timeout_s:.0f} s{refused}: {e}") from None
    group = _form(store, 0, name, port, device, timeout_s, gate)
    gate.stop_listening()  # the client is in: nobody else needs the port
    return group


def join_seed_group(host: str, port: int, name: str, device: torch.device, timeout_s: float) -> PairGroup:
    """Client side (rank 1): connect to the seed's rendezvous at host:port and form the group."""
    timeout = datetime.timedelta(seconds=max(1.0, timeout_s))
    _wait_closed(port)
    try:
        store = dist.TCPStore(host, port, world_size=2, is_master=False, timeout=timeout, wait_for_workers=True)
    except RuntimeError as e:
        raise PairGroupError(f"could not connect to {host}:{port} within {timeout_s:.0f} s: {e}") from None
    return _form(store, 1, name, port, device, timeout_s, None)
