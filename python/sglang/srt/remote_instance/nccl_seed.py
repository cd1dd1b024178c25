"""Seed side of the NCCL backend: open a pair group per TP rank on request, broadcast every weight, tear down.

Waiting for the client and broadcasting run on a thread of their own (the calls answer through a Deferred): on the
scheduler thread, a client that stalls would stop the seed serving for up to the whole fork timeout."""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING

from sglang.srt.managers.rpc_registry import Deferred, in_background, register_rpc
from sglang.srt.remote_instance.manifest import weight_tensors
from sglang.srt.remote_instance.pair_group import PairGroup, open_pair_group

if TYPE_CHECKING:
    from sglang.srt.managers.scheduler import Scheduler

logger = logging.getLogger(__name__)

# Open groups by "<group_name>_<port>_<tp_rank>" (upstream's key), per scheduler process; the fork threads and the
# scheduler thread both touch it.
_GROUPS: dict[str, PairGroup] = {}
_GROUPS_LOCK = threading.Lock()


def _take(key: str) -> PairGroup | None:
    with _GROUPS_LOCK:
        return _GROUPS.pop(key, None)


def _key(scheduler: Scheduler, group_name: str, ports: str) -> tuple[str, int]:
    port_list = [int(p) for p in str(ports).split(",") if p.strip()]
    rank, size = scheduler.tp_rank, scheduler.server_args.tp_size
    if len(port_list) != size:
        raise ValueError(f"got {len(port_list)} group port(s) for a seed with --tp-size {size}; send one per TP rank")
    port = port_list[rank]
    return f"{group_name}_{port}_{rank}", port


def _timeout(scheduler: Scheduler, timeout: float | None) -> float:
    own = scheduler.server_args.remote_instance_weight_loader_timeout
    return min(own, timeout) if timeout else own


@register_rpc("init_weights_send_group_for_remote_instance")
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
) -> Deferred:
    """Listen on this rank's port until the matching client rank joins (bounded by the seed's timeout); with
    send_weights (ours), go straight on to the broadcast, saving the client a round trip to the seed."""
    if world_size != 2 or group_rank != 0:
        raise ValueError(f"only seed rank 0 of a 2-member group is supported (got rank {group_rank}/{world_size})")
    key, port = _key(scheduler, group_name, ports)
    stale = _take(key)
    if stale is not None:
        stale.close_later()
    device = scheduler.runner.device

    def work() -> str:
        start = time.perf_counter()
        group = open_pair_group(master_address, port, 0, key, device, _timeout(scheduler, timeout))
        logger.info("TP%d R-Fork group %s ready in %.3f s", scheduler.tp_rank, key, time.perf_counter() - start)
        if send_weights:
            return _send(scheduler, key, group, timeout)
        with _GROUPS_LOCK:
            _GROUPS[key] = group
        return f"group {key} ready"

    return in_background("init_weights_send_group_for_remote_instance", work, device)


@register_rpc("send_weights_to_remote_instance")
def send_weights(
    scheduler: Scheduler,
    master_address: str,
    ports: str,
    group_name: str = "weight_send_group",
    timeout: float | None = None,
) -> Deferred:
    """Broadcast every parameter in manifest order over the group, then tear the group down."""
    key, _ = _key(scheduler, group_name, ports)
    group = _take(key)
    if group is None:
        raise KeyError(f"no group {key}; call /init_weights_send_group_for_remote_instance first")
    device = scheduler.runner.device
    return in_background("send_weights_to_remote_instance", lambda: _send(scheduler, key, group, timeout), device)


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
