"""The registry of control methods: features register handlers here; the scheduler looks them up.

Kept free of scheduler imports so a feature (e.g. the R-Fork seed) can register without importing the scheduler
back, which imports the feature's package to load its handlers."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import torch

RpcHandler = Callable[..., Any]
RPC_HANDLERS: dict[str, RpcHandler] = {}
# Methods whose answer is always a Deferred, on every rank, even when a rank fails at once: every TP rank must take
# the same road (an immediate answer is a gather, a deferred one a later all-gather), or the ranks run different
# collectives and the scheduler stops.
DEFERRING: set[str] = set()


def register_rpc(name: str, *, deferred: bool = False) -> Callable[[RpcHandler], RpcHandler]:
    """Register fn(scheduler, **params) as the handler of control method `name` (deferred: it may answer later)."""

    def wrap(fn: RpcHandler) -> RpcHandler:
        RPC_HANDLERS[name] = fn
        if deferred:
            DEFERRING.add(name)
        return fn

    return wrap


@dataclass
class Deferred:
    """A handler's answer that is not ready yet: its work runs on another thread (waiting for a peer, moving
    weights) while the scheduler goes on serving. The caller gets the answer once every TP rank's is done."""

    method: str
    future: Future


def settled(method: str, value: Any = None, error: BaseException | None = None) -> Deferred:
    """A Deferred that is already done (a deferring method that answered or failed at once on this rank)."""
    future: Future = Future()
    if error is None:
        future.set_result(value)
    else:
        future.set_exception(error)
    return Deferred(method, future)


def without_tracebacks(error: BaseException) -> BaseException:
    """error, and the errors it was raised from, stripped of their tracebacks. A stored traceback keeps the failed
    call's frames alive in a cycle (frame -> future -> error -> traceback -> frame) until a GC pass that an idle
    scheduler may not run for minutes, and those frames hold a failed fork's process group: its sockets and threads.
    The caller is only told the message."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        current.__traceback__ = None
        current = current.__cause__ or current.__context__
    return error


def in_background(method: str, work: Callable[[], Any], device: torch.device) -> Deferred:
    """Run work() on a new thread bound to device (CUDA's current device is per thread) and defer the answer."""
    future: Future = Future()

    def body() -> None:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        try:
            future.set_result(work())
        except BaseException as e:  # handed to the caller as the call's error
            future.set_exception(without_tracebacks(e))

    threading.Thread(target=body, name=f"rpc-{method}", daemon=True).start()
    return Deferred(method, future)
