"""Seed side of the NCCL backend: open a pair group per TP rank on request, broadcast every weight, tear down.

Waiting for the client and broadcasting run on a thread of their own (the calls answer through a Deferred): on the
scheduler thread, a client that stalls would stop the seed serving for up to the whole fork timeout."""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import TYPE_CHECKING

from sglang.srt.managers.rpc_registry import Deferred, in_background, register_rpc
from sglang.srt.remote_instance.addresses import parse_ports
from sglang.srt.remote_instance.manifest import weight_tensors
from sglang.srt.remote_instance.pair_group import PairGroup, open_seed_group

if TYPE_CHECKING:
    from sglang.srt.managers.scheduler import Scheduler

logger = logging.getLogger(__name__)

# Open groups by "<group_name>_<port>_<tp_rank>" (upstream's key), per scheduler process; the fork threads and the
# scheduler thread both touch it.
_GROUPS: dict[str, PairGroup] = {}
# Groups still forming, by the same key: a send that arrives early waits for its group here.
_PENDING: dict[str, Future] = {}
_GROUPS_LOCK = threading.Lock()


def _take(key: str) -> PairGroup | None:
    with _GROUPS_LOCK:
        return _GROUPS.pop(key, None)


def _key(scheduler: Scheduler, group_name: str, ports: str) -> tuple[str, int]:
    port_list = parse_ports(ports)
    rank, size = scheduler.tp_rank, scheduler.server_args.tp_size
    if len(port_list) != size:
        raise ValueError(f"got {len(port_list)} group port(s) for a seed with --tp-size {size}; send one per TP rank")
    port = port_list[rank]
    return f"{group_name}_{port}_{rank}", port


def _timeout(scheduler: Scheduler, timeout: float | None) -> float:
    own = scheduler.server_args.remote_instance_weight_loader_timeout
    return min(own, timeout) if timeout else own


def _settle_init(key: str, future: Future, group: PairGroup | None, error: BaseException | None) -> None:
    with _GROUPS_LOCK:
        if _PENDING.get(key) is future:
            del _PENDING[key]
    if error is None:
        future.set_result(group)
    else:
        future.set_exception(error)


@register_rpc("init_weights_send_group_for_remote_instance", deferred=True)
def init_group(
    scheduler: Scheduler,
    master_address: str,
    ports: str,
    group_rank: int = 0,
    world_size: int = 2,
    group_name: str = "weight_send_group",
    backend: str = "nccl",
    timeout: float | None = None,
    send_weights: bool = False,
    client_address: str | None = None,
) -> Deferred:
    """Serve this rank's rendezvous (where the seed serves, to client_address only) until the matching client rank
    joins, bounded by the seed's timeout; with send_weights (ours), go straight on to the broadcast, saving the
    client a round trip. master_address was checked by the HTTP layer; the seed never dials it."""
    if world_size != 2 or group_rank != 0:
        raise ValueError(f"only seed rank 0 of a 2-member group is supported (got rank {group_rank}/{world_size})")
    key, port = _key(scheduler, group_name, ports)
    stale = _take(key)
    if stale is not None:
        stale.close_later()
    device = scheduler.runner.device
    allowed = {client_address} if client_address else {"127.0.0.1", "::1"}
    future: Future = Future()
    with _GROUPS_LOCK:
        _PENDING[key] = future

    def work() -> str:
        start = time.perf_counter()
        try:
            group = open_seed_group(
                scheduler.server_args.host, port, allowed, key, device, _timeout(scheduler, timeout)
            )
        except BaseException as e:
            _settle_init(key, future, None, e)
            raise
        logger.info("TP%d R-Fork group %s ready in %.3f s", scheduler.tp_rank, key, time.perf_counter() - start)
        if send_weights:
            _settle_init(key, future, None, RuntimeError(f"group {key} was sent to at once (send_weights)"))
            return _send(scheduler, key, group, timeout)
        with _GROUPS_LOCK:
            _GROUPS[key] = group
        _settle_init(key, future, group, None)
        return f"group {key} ready"

    return in_background("init_weights_send_group_for_remote_instance", work, device)


@register_rpc("send_weights_to_remote_instance", deferred=True)
def send_weights(
    scheduler: Scheduler,
    master_address: str,
    ports: str,
    group_name: str = "weight_send_group",
    timeout: float | None = None,
) -> Deferred:
    """Broadcast every parameter in manifest order over the group, then tear the group down. Upstream clients send
    this as soon as their own group forms, which may be before this rank's has: the send then waits for it."""
    key, _ = _key(scheduler, group_name, ports)
    with _GROUPS_LOCK:
        pending = _PENDING.get(key)
        known = pending is not None or key in _GROUPS
    if not known:
        raise KeyError(f"no group {key}; call /init_weights_send_group_for_remote_instance first")
    device = scheduler.runner.device

    def work() -> str:
        if pending is not None:
            try:
                pending.result(timeout=_timeout(scheduler, timeout))
            except FutureTimeout:
                raise TimeoutError(f"group {key} did not form in time") from None
            except Exception as e:
                raise RuntimeError(f"group {key} could not be formed: {e}") from None
        group = _take(key)
        if group is None:
            raise KeyError(f"no group {key}; it was already used or torn down")
        return _send(scheduler, key, group, timeout)

    return in_background("send_weights_to_remote_instance", work, device)


def _send(scheduler: Scheduler, key: str, group: PairGroup, timeout: float | None) -> str:
    tensors = [t for _, t in weight_tensors(scheduler.runner.model)]
    start = time.perf_counter()
    try:
        group.broadcast_all(tensors, time.monotonic() + _timeout(scheduler, timeout))
    finally:
        # Off the scheduler thread: an NCCL teardown would stall serving for ~0.5 s.
        group.close_later()
    seconds = time.perf_counter() - start
    nbytes = sum(t.numel() * t.element_size() for t in tensors)
    logger.info(
        "TP%d R-Fork sent %.1f MB over %s in %.3f s (%.2f GB/s)",
        scheduler.tp_rank,
        nbytes / 1e6,
        key,
        seconds,
        nbytes / max(seconds, 1e-9) / 1e9,
    )
    return f"sent {nbytes} bytes in {seconds:.3f} s"


@register_rpc("destroy_weights_send_group")
def destroy_group(scheduler: Scheduler, ports: str, group_name: str = "weight_send_group") -> bool:
    """Drop a group whose client never asked for the weights (called when its lease expires)."""
    key, _ = _key(scheduler, group_name, ports)
    group = _take(key)
    if group is not None:
        group.close_later()
    return group is not None
