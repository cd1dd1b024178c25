"""Entry point of a scheduler process: build the Scheduler, report readiness, run the loop."""

from __future__ import annotations

import faulthandler
import logging
import os
import signal
from multiprocessing.connection import Connection

from sglang.srt.server_args import PortArgs, ServerArgs
from sglang.srt.utils import configure_logging, watch_parent


def run_scheduler_process(
    server_args: ServerArgs, port_args: PortArgs, tp_rank: int, gpu_id: int, pipe: Connection
) -> None:
    """Target of each scheduler process; sends ("ok", info) or ("error", message) through pipe."""
    configure_logging(server_args.log_level, prefix=f"TP{tp_rank}")
    faulthandler.enable()
    watch_parent(os.getppid())
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the launcher decides when we stop
    if server_args.device == "cpu":
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // server_args.tp_size_per_node))
    try:
        from sglang.srt.managers.scheduler import Scheduler

        scheduler = Scheduler(server_args, port_args, tp_rank, gpu_id)
    except Exception as e:  # reported to the launcher, which prints one clear line
        logging.getLogger(__name__).debug("TP%d failed to start", tp_rank, exc_info=True)
        pipe.send(("error", f"TP{tp_rank}: {type(e).__name__}: {e}"))
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
            },
        )
    )
    try:
        scheduler.event_loop()
    except Exception:
        # Take the rank down loudly; the launcher notices and stops the instance rather than serve half of it.
        logging.getLogger(__name__).exception("TP%d scheduler crashed", tp_rank)
        logging.shutdown()
        os._exit(1)
