"""A two-member process group (seed rank 0, client rank 1) outside the TP world, with bounded waits."""

from __future__ import annotations

import contextlib
import datetime
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


class PairGroupError(RuntimeError):
    """The pair group could not be formed or an operation on it did not finish in time."""


@dataclass
class PairGroup:
    """One seed rank and one client rank; the seed hosts the rendezvous store on its port."""

    name: str
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


def wait_work(work: Any, deadline: float, what: str) -> None:
    """Poll a collective until it completes; never block past deadline (a dead peer must not hang us)."""
    while not work.is_completed():
        if time.monotonic() > deadline:
            raise PairGroupError(f"{what} did not finish before the timeout")
        time.sleep(0.002)
    work.wait()  # raises the collective's own error, if it failed


def open_pair_group(
    host: str, port: int, rank: int, name: str, device: torch.device, timeout_s: float
) -> PairGroup:
    """Rendezvous at tcp://host:port (rank 0 listens there) and check the link with a one-element broadcast."""
    timeout = datetime.timedelta(seconds=max(1.0, timeout_s))
    deadline = time.monotonic() + timeout_s
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
    group = PairGroup(name, rank, device, store, pg)
    probe = torch.zeros(1, device=device)
    try:
        # NCCL creates the communicator on the first collective and, by default, connects its channels lazily
        # on the first large one (about 0.6 s between two H200s, which would land inside the transfer).
        # Connecting everything now keeps setup and data movement apart.
        with _env("NCCL_RUNTIME_CONNECT", "0"):
            group.broadcast_all([probe], deadline)
    except Exception:
        group.close()
        raise
    return group


@contextlib.contextmanager
def _env(name: str, value: str) -> Iterator[None]:
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old
