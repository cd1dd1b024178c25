"""Entry point of a scheduler process: import the stack, take its orders, build the Scheduler, run the loop.

A rank process is started before the launcher has resolved its arguments, so its imports (torch, the model stack,
FlashInfer) overlap with the launcher's own; it then waits for a `RankOrders` on its pipe.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection

from sglang.srt import startup_timeline
from sglang.srt.server_args import PortArgs, ServerArgs
from sglang.srt.utils import configure_logging, watch_parent

# How long a started rank waits for its orders before it concludes that the launcher gave up on it.
ORDERS_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class RankOrders:
    """What the launcher sends a started rank: its arguments, addresses and place, and the launch instant."""

    server_args: ServerArgs
    port_args: PortArgs
    tp_rank: int
    gpu_id: int
    launch_time: float


def run_scheduler_process(pipe: Connection, gpu_hint: int | None) -> None:
    """Target of each rank process; answers ("ok", info) or ("error", message) on pipe once it has started.

    gpu_hint is the GPU this rank will most likely get; its CUDA context is created while the launcher still
    resolves the arguments (None: the launcher was told --device cpu).
    """
    faulthandler.enable()
    watch_parent(os.getppid())
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the launcher decides when we stop
    began = startup_timeline.process_start_time()
    _import_stack(gpu_hint)
    imported = time.time()
    if not pipe.poll(ORDERS_TIMEOUT_S):
        return
    orders = pipe.recv()
    if orders is None:  # the launcher failed before it could give orders
        return
    args = orders.server_args
    name = f"TP{orders.tp_rank}"
    configure_logging(args.log_level, prefix=name)
    timeline = startup_timeline.install(name, orders.launch_time)
    timeline.add("process start + imports", began, imported)
    timeline.add("wait for arguments", imported, time.time(), log=False)
    if args.device == "cpu":
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // args.tp_size_per_node))
    try:
        from sglang.srt.managers.scheduler import Scheduler

        scheduler = Scheduler(args, orders.port_args, orders.tp_rank, orders.gpu_id)
    except Exception as e:  # reported to the launcher, which prints one clear line
        logging.getLogger(__name__).debug("%s failed to start", name, exc_info=True)
        pipe.send(("error", f"{name}: {type(e).__name__}: {e}"))
        return
    pipe.send(
        (
            "ok",
            {
                "max_total_num_tokens": scheduler.max_total_num_tokens,
                "max_req_input_len": scheduler.max_req_input_len,
                "weight_load_seconds": scheduler.runner.weight_load_seconds,
                "weight_bytes": scheduler.runner.weight_bytes,
                "fork_report": scheduler.runner.fork_report,
                "startup_timeline": timeline.to_json(),
            },
        )
    )
    try:
        scheduler.event_loop()
    except Exception:
        # Take the rank down loudly; the launcher notices and stops the instance rather than serve half of it.
        logging.getLogger(__name__).exception("%s scheduler crashed", name)
        logging.shutdown()
        os._exit(1)


def _import_stack(gpu_hint: int | None) -> None:
    # Everything a rank needs before its first phase, done while the launcher is still resolving the arguments.
    import torch

    context = None
    if gpu_hint is not None and torch.version.cuda is not None and os.environ.get("SGLANG_FORCE_CPU") != "1":
        # The CUDA context (a second or more) is made on a thread while this one goes on importing.
        context = threading.Thread(target=_make_cuda_context, args=(gpu_hint,), daemon=True, name="cuda-context")
        context.start()
        try:
            import flashinfer  # noqa: F401
        except ImportError:
            pass  # the rank then fails with a clear error when it builds the flashinfer backend
    # Not transformers: a rank loads its tokenizer only when a request has stop strings or a grammar.
    import sglang.srt.managers.scheduler  # noqa: F401
    from sglang.srt.models.registry import ModelRegistry

    for arch in ModelRegistry.supported():
        ModelRegistry.resolve(arch)
    if context is not None:
        context.join()


def _make_cuda_context(gpu: int) -> None:
    import torch

    try:
        if gpu < torch.cuda.device_count():
            torch.cuda.set_device(gpu)
            torch.zeros(1, device=f"cuda:{gpu}")
    except RuntimeError:
        pass  # no usable GPU: the launcher resolves --device to cpu
