"""Small process and logging helpers shared by the launcher, the engine and the schedulers."""

from __future__ import annotations

import logging
import os
import threading
import time

import psutil


def configure_logging(level: str = "info", prefix: str = "") -> None:
    """One log format for every process; prefix tells the processes apart."""
    # transformers warns about config fields on every load in every process; keep its errors only.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    tag = f" {prefix}" if prefix else ""
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format=f"[%(asctime)s{tag}] %(message)s",
        datefmt="%Y-%m-%d %H:%M:%S",
        force=True,
    )


def watch_parent(parent_pid: int, interval: float = 1.0) -> None:
    """Exit this process when its parent is gone, so a killed launcher leaves no orphans."""

    def loop() -> None:
        while True:
            time.sleep(interval)
            if os.getppid() != parent_pid or not psutil.pid_exists(parent_pid):
                os._exit(0)

    threading.Thread(target=loop, daemon=True, name="watch-parent").start()


def kill_process_tree(pid: int, include_parent: bool = True, timeout: float = 5.0) -> None:
    """Terminate a process and all its descendants; SIGKILL whatever is still alive after timeout."""
    try:
        parent = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return
    procs = parent.children(recursive=True) + ([parent] if include_parent else [])
    for p in procs:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
