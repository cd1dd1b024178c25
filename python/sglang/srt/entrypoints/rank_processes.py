"""This node's rank processes: started before the launcher resolves its arguments, given their orders later."""

from __future__ import annotations

import contextlib
import multiprocessing as mp
from dataclasses import dataclass
from typing import Any

from sglang.srt.utils import kill_process_tree


@dataclass
class RankProcesses:
    """This node's rank processes, started early: they import while the launcher resolves its arguments."""

    procs: list[mp.process.BaseProcess]
    pipes: list[Any]

    @staticmethod
    def start(gpu_hints: list[int | None]) -> RankProcesses:
        """Spawn one rank process per GPU hint (spawn, not fork: CUDA cannot survive a fork); they wait for
        RankOrders."""
        from sglang.srt.managers.scheduler_process import run_scheduler_process

        ctx = mp.get_context("spawn")
        procs, pipes = [], []
        for local_rank, gpu_hint in enumerate(gpu_hints):
            ours, theirs = ctx.Pipe(duplex=True)
            proc = ctx.Process(
                target=run_scheduler_process,
                args=(theirs, gpu_hint),
                name=f"sglang-scheduler-{local_rank}",
                daemon=True,
            )
            proc.start()
            theirs.close()
            procs.append(proc)
            pipes.append(ours)
        return RankProcesses(procs, pipes)

    def wait_ready(self) -> list[dict[str, Any]]:
        """Each rank's start-up report, in rank order; raises with the first rank's error."""
        return [_wait_ready(proc, pipe) for proc, pipe in zip(self.procs, self.pipes)]

    def dismiss(self) -> None:
        """Tell ranks that never got orders to exit, and make sure they do."""
        for pipe in self.pipes:
            with contextlib.suppress(OSError):
                pipe.send(None)
        stop_processes(self.procs)


def stop_processes(procs: list[mp.process.BaseProcess]) -> None:
    """Terminate rank processes and wait for them (killing what lingers)."""
    # Signal every rank before waiting for any: a rank that sees its peer vanish first would log a crash.
    for proc in procs:
        if proc.is_alive():
            proc.terminate()
    for proc in procs:
        proc.join(timeout=5)
        if proc.is_alive():
            kill_process_tree(proc.pid)


def _wait_ready(proc: mp.process.BaseProcess, pipe: Any) -> dict[str, Any]:
    while not pipe.poll(0.2):
        if not proc.is_alive():
            raise RuntimeError(f"{proc.name} exited with code {proc.exitcode} while starting; see its log above")
    status, payload = pipe.recv()
    if status != "ok":
        raise RuntimeError(payload)
    return payload
