"""torch.profiler on every TP rank, driven by /start_profile and /stop_profile (upstream's endpoints)."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from sglang.srt.managers.rpc_registry import register_rpc

if TYPE_CHECKING:
    from sglang.srt.managers.scheduler import Scheduler

logger = logging.getLogger(__name__)

# Where traces go when a request names no output_dir (upstream's variable and default).
PROFILER_DIR_ENV = "SGLANG_TORCH_PROFILER_DIR"
DEFAULT_PROFILER_DIR = "/tmp"
ACTIVITIES = ("CPU", "GPU", "MEM")


@dataclass
class _Run:
    """One profiling run of one rank."""

    profile: torch.profiler.profile
    path: str
    steps_left: int | None


class RankProfiler:
    """Starts and stops one rank's torch profiler; a run with num_steps stops itself after that many batches."""

    def __init__(self, tp_rank: int, device: torch.device) -> None:
        self.tp_rank = tp_rank
        self.device = device
        self.run: _Run | None = None

    def start(
        self,
        output_dir: str | None = None,
        num_steps: int | None = None,
        activities: list[str] | None = None,
        with_stack: bool = True,
        record_shapes: bool = False,
        profile_id: str | None = None,
    ) -> str:
        """Begin a run; returns the path its trace will be written to."""
        if self.run is not None:
            raise RuntimeError("a profiling run is already going; call /stop_profile first")
        wanted = [a.upper() for a in (activities or ["CPU", "GPU"])]
        unknown = [a for a in wanted if a not in ACTIVITIES]
        if unknown:
            raise ValueError(f"unknown profiler activities {unknown}; choose from {list(ACTIVITIES)}")
        kinds = [torch.profiler.ProfilerActivity.CPU] if "CPU" in wanted else []
        if "GPU" in wanted and self.device.type == "cuda":
            kinds.append(torch.profiler.ProfilerActivity.CUDA)
        if not kinds:
            raise ValueError(f"no profiler activity this rank can record ({wanted} on {self.device.type})")
        directory = output_dir or os.environ.get(PROFILER_DIR_ENV, DEFAULT_PROFILER_DIR)
        os.makedirs(directory, exist_ok=True)
        if not os.access(directory, os.W_OK):
            raise PermissionError(f"profiler output directory {directory} is not writable")
        path = os.path.join(directory, f"{profile_id or time.time()}-TP-{self.tp_rank}.trace.json.gz")
        profile = torch.profiler.profile(
            activities=kinds, with_stack=with_stack, record_shapes=record_shapes, profile_memory="MEM" in wanted
        )
        profile.start()
        self.run = _Run(profile, path, num_steps)
        logger.info("Profiling started on TP%d; trace will be %s", self.tp_rank, path)
        return path

    def stop(self) -> str:
        """End the run and write its trace; returns the trace's path."""
        if self.run is None:
            raise RuntimeError("no profiling run is going; call /start_profile first")
        run, self.run = self.run, None
        run.profile.stop()
        run.profile.export_chrome_trace(run.path)
        logger.info("Profiling stopped on TP%d; trace written to %s", self.tp_rank, run.path)
        return run.path

    def on_step(self) -> None:
        """A batch ran: count it against num_steps."""
        if self.run is None or self.run.steps_left is None:
            return
        self.run.steps_left -= 1
        if self.run.steps_left <= 0:
            self.stop()


@register_rpc("start_profile")
def _start_profile(scheduler: Scheduler, **options: Any) -> str:
    return scheduler.profiler.start(**options)


@register_rpc("stop_profile")
def _stop_profile(scheduler: Scheduler) -> str:
    return scheduler.profiler.stop()
