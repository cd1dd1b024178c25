"""Control calls that every TP rank answers (flush_cache, get_weights_by_name, R-Fork seed steps, ...)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sglang.srt.managers.scheduler import Scheduler

logger = logging.getLogger(__name__)

RpcHandler = Callable[..., Any]
# Largest parameter /get_weights_by_name returns without truncate_size (as JSON, about 20 bytes per element).
MAX_WEIGHT_ELEMENTS = 1 << 24
RPC_HANDLERS: dict[str, RpcHandler] = {}


def register_rpc(name: str) -> Callable[[RpcHandler], RpcHandler]:
    """Register fn(scheduler, **params) as the handler of control method `name`."""

    def wrap(fn: RpcHandler) -> RpcHandler:
        RPC_HANDLERS[name] = fn
        return fn

    return wrap


def run(scheduler: Scheduler, method: str, params: dict[str, Any]) -> dict[str, Any]:
    """Run a handler; the answer is {"ok": True, "value": ...} or {"ok": False, "error": message}."""
    _load_plugins()
    handler = RPC_HANDLERS.get(method)
    if handler is None:
        return {"ok": False, "error": f"unknown control method {method!r}"}
    try:
        return {"ok": True, "value": handler(scheduler, **params)}
    except Exception as e:  # a bad control call must never take the scheduler down
        logger.warning("control call %s failed on TP%d: %s", method, scheduler.tp_rank, e)
        return {"ok": False, "error": f"{type(e).__name__}: {e}"}


def _load_plugins() -> None:
    # Handlers that live with their feature register themselves on import.
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
def _get_weights_by_name(scheduler: Scheduler, name: str, truncate_size: int | None = None) -> list:
    params = dict(scheduler.runner.model.named_parameters())
    if name not in params:
        raise KeyError(f"no parameter named {name!r}; see /get_model_info for the model's parameters")
    param = params[name]
    if truncate_size is None and param.numel() > MAX_WEIGHT_ELEMENTS:
        # A full 128k-vocab embedding as JSON would take the server's memory with it.
        raise ValueError(
            f"{name} has {param.numel()} elements, more than {MAX_WEIGHT_ELEMENTS} can be returned at once; "
            "pass truncate_size"
        )
    tensor = param.detach()
    if truncate_size is not None:
        tensor = tensor.flatten()[:truncate_size]
    return tensor.float().cpu().tolist()
