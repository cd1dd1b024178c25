"""A two-member process group (seed rank 0, client rank 1) outside the TP world, with bounded waits."""

from __future__ import annotations

import datetime
import threading
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from sglang.srt.metrics import rfork_progress


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

    def broadcast_all(self, tensors: list[torch.Tensor], deadline: float) -> None:
        """Broadcast every tensor from the seed (rank 0) in order; wait until done or the deadline."""
        opts = dist.BroadcastOptions()
        opts.rootRank = 0
        opts.rootTensor = 0
        work = None
        for t in tensors:
            if t.numel():
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


def open_pair_group(host: str, port: int, rank: int, name: str, device: torch.device, timeout_s: float) -> PairGroup:
    """Rendezvous at tcp://host:port (rank 0 listens there) and check the link with a one-element broadcast."""
    timeout = datetime.timedelta(seconds=max(1.0, timeout_s))
    deadline = time.monotonic() + timeout_s
    _wait_closed(port)
    try:
        store = dist.TCPStore(host, port, world_size=2, is_master=rank == 0, timeout=timeout, wait_for_workers=True)
    except RuntimeError as e:
        role = "listen on" if rank == 0 else "connect to"
        raise PairGroupError(f"could not {role} {host}:{port} within {timeout_s:.0f} s: {e}") from None
    store = dist.PrefixStore(name, store)
    try:
        if device.type == "cuda":
            opts = dist.ProcessGroupNCCL.Options()
            opts._timeout = timeout
            pg = dist.ProcessGroupNCCL(store, rank, 2, opts)
        else:
            pg = dist.ProcessGroupGloo(store, rank, 2, timeout)
    except RuntimeError as e:
        raise PairGroupError(f"could not form group {name}: {e}") from None
    group = PairGroup(name, port, rank, device, store, pg)
    probe = torch.zeros(1, device=device)
    try:
        # Creates the communicator now (NCCL does so on the first collective), so its cost counts as setup.
        group.broadcast_all([probe], deadline)
    except Exception:
        group.close()
        raise
    return group
