"""Control calls that every TP rank answers (flush_cache, get_weights_by_name, R-Fork seed steps, ...)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from sglang.srt.distributed.parallel_state import all_gather_pyobj
from sglang.srt.managers.rpc_registry import DEFERRING, RPC_HANDLERS, Deferred, register_rpc, settled
from sglang.srt.model_executor.weights_by_name import read_weight

if TYPE_CHECKING:
    from sglang.srt.managers.scheduler import Scheduler

logger = logging.getLogger(__name__)


def run(scheduler: Scheduler, method: str, params: dict[str, Any]) -> dict[str, Any] | Deferred:
    """Run a handler; the answer is {"ok": True, "value": ...}, {"ok": False, "error": message}, or a Deferred
    whose future ends in one of those (see PendingRpcs)."""
    _load_plugins()
    handler = RPC_HANDLERS.get(method)
    if handler is None:
        return {"ok": False, "error": f"unknown control method {method!r}"}
    try:
        value = handler(scheduler, **params)
    except Exception as e:  # a bad control call must never take the scheduler down
        if method in DEFERRING:
            return settled(method, error=e)
        return _failed(scheduler, method, e)
    if isinstance(value, Deferred):
        return value
    return settled(method, value) if method in DEFERRING else {"ok": True, "value": value}


def _failed(scheduler: Scheduler, method: str, e: BaseException) -> dict[str, Any]:
    logger.warning("control call %s failed on TP%d: %s", method, scheduler.tp_rank, e)
    return {"ok": False, "error": f"{type(e).__name__}: {e}"}


class PendingRpcs:
    """Deferred answers by request id. Every TP rank defers the same calls in the same order (they handle control
    calls in lockstep), so the ranks agree on which are finished with one all-gather of their finished ids."""

    def __init__(self) -> None:
        self.pending: dict[str, Deferred] = {}

    def __bool__(self) -> bool:
        return bool(self.pending)

    def add(self, rid: str, deferred: Deferred) -> None:
        self.pending[rid] = deferred

    def collect(self, scheduler: Scheduler) -> list[tuple[str, dict[str, Any]]]:
        """(rid, answer) of each call finished on every rank. A collective: every rank calls it in the same step."""
        done = {rid for rid, d in self.pending.items() if d.future.done()}
        everyone = all_gather_pyobj(done)
        ready = [rid for rid in self.pending if all(rid in ranks_done for ranks_done in everyone)]
        answers = []
        for rid in ready:
            deferred = self.pending.pop(rid)
            error = deferred.future.exception()
            if error is None:
                answers.append((rid, {"ok": True, "value": deferred.future.result()}))
            else:
                answers.append((rid, _failed(scheduler, deferred.method, error)))
        return answers


def _load_plugins() -> None:
    # Handlers that live with their feature register themselves on import.
    import sglang.srt.managers.profiler  # noqa: F401
    import sglang.srt.remote_instance  # noqa: F401


@register_rpc("get_load")
def _get_load(scheduler: Scheduler) -> dict[str, int]:
    return scheduler.get_load()


@register_rpc("flush_cache")
def _flush_cache(scheduler: Scheduler) -> bool:
    if scheduler.running or scheduler.waiting or scheduler.chunked_req:
        return False
    scheduler.tree_cache.evict(1 << 62)
    scheduler.tree_cache.reset()
    return True


@register_rpc("get_weights_by_name")
def _get_weights_by_name(
    scheduler: Scheduler, name: str, truncate_size: int | None = None, raw: bool = False
) -> dict[str, Any]:
    return read_weight(scheduler.runner.model, name, truncate_size, raw, scheduler.server_args.tp_size)
