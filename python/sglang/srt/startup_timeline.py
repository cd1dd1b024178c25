"""Start-up timeline: every phase of a launch timed against the launch itself, logged as it ends.

A forked replica is only as elastic as its whole start, so the launcher and every rank record when each phase began
and ended (wall-clock seconds, comparable across the processes of one host), log one INFO line per phase, and warn
when a phase stays silent for long. The launcher merges the ranks' phases, logs a summary at "ready" and serves the
timeline in /get_server_info under `startup_timeline`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

logger = logging.getLogger("sglang.startup")

# A phase that runs longer than this says so, and again every HEARTBEAT_S, so no start is silent for long.
HEARTBEAT_S = 5.0


@dataclass(frozen=True)
class Phase:
    """One timed step of a start; start and end are Unix times."""

    name: str
    process: str
    start: float
    end: float

    @property
    def seconds(self) -> float:
        return self.end - self.start


def process_start_time() -> float:
    """When the OS started this process, as a Unix time: the launch instant, so interpreter start-up counts too.

    On Linux the process's age comes from /proc (start in clock ticks since boot, against /proc/uptime), which is
    exact to 10 ms; psutil's create_time adds the boot time rounded to whole seconds, up to a second off.
    """
    try:
        with open("/proc/self/stat") as f:
            # Field 22 (starttime) counted after the ")" that ends the command name, which may itself hold spaces.
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return time.time() - (uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        import psutil

        return psutil.Process(os.getpid()).create_time()


class StartupTimeline:
    """The phases one process went through; `phase()` times a block, logs its end and its silences."""

    def __init__(self, process: str, origin: float) -> None:
        self.process = process
        self.origin = origin
        self.phases: list[Phase] = []
        self._open: dict[str, float] = {}
        self._lock = threading.Lock()
        self._heartbeat: threading.Thread | None = None

    def add(self, name: str, start: float, end: float, log: bool = True) -> Phase:
        """Record a phase measured elsewhere (e.g. before logging existed, or a step another module timed)."""
        phase = Phase(name, self.process, start, end)
        with self._lock:
            self.phases.append(phase)
        if log:
            self._log(phase)
        return phase

    def _log(self, phase: Phase) -> None:
        logger.info("Startup: %s took %.2f s (%.2f s after launch)", phase.name, phase.seconds, phase.end - self.origin)

    def log_all(self) -> None:
        """Log every phase recorded so far (for phases added with log=False before logging was decided on)."""
        for phase in list(self.phases):
            self._log(phase)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time the block as phase `name`; a phase that raises is recorded too, with '(failed)'."""
        start = time.time()
        with self._lock:
            self._open[name] = start
        self._ensure_heartbeat()
        failed = True
        try:
            yield
            failed = False
        finally:
            with self._lock:
                self._open.pop(name, None)
            self.add(name + (" (failed)" if failed else ""), start, time.time())

    def _ensure_heartbeat(self) -> None:
        if self._heartbeat is None:
            self._heartbeat = threading.Thread(target=self._beat, daemon=True, name="startup-heartbeat")
            self._heartbeat.start()

    def _beat(self) -> None:
        last_said: dict[str, float] = {}
        while True:
            time.sleep(1.0)
            now = time.time()
            with self._lock:
                open_phases = dict(self._open)
            for name, start in open_phases.items():
                if now - start >= HEARTBEAT_S and now - last_said.get(name, start) >= HEARTBEAT_S:
                    last_said[name] = now
                    logger.info("Startup: still in %s (%.0f s so far)", name, now - start)

    def to_json(self) -> list[dict]:
        """Phases as dicts with times relative to the launch (start_s, end_s, seconds)."""
        return [phase_json(p, self.origin) for p in self.phases]


def phase_json(phase: Phase, origin: float) -> dict:
    """A phase as JSON with its times relative to origin."""
    return {
        "name": phase.name,
        "process": phase.process,
        "start_s": round(phase.start - origin, 4),
        "end_s": round(phase.end - origin, 4),
        "seconds": round(phase.seconds, 4),
    }


def phases_from_json(items: list[dict], origin: float) -> list[Phase]:
    """The inverse of phase_json, for phases that a rank sent to the launcher."""
    return [Phase(i["name"], i["process"], origin + i["start_s"], origin + i["end_s"]) for i in items]


def summary(phases: list[Phase], origin: float, ready: float) -> dict:
    """What /get_server_info serves: launch -> ready, and every phase of every process relative to the launch."""
    ordered = sorted(phases, key=lambda p: (p.start, p.process))
    return {"launch_to_ready_s": round(ready - origin, 4), "phases": [phase_json(p, origin) for p in ordered]}


def summary_line(timeline: dict) -> str:
    """One log line: launch -> ready and each process's phases in order."""
    by_process: dict[str, list[str]] = {}
    for p in timeline["phases"]:
        by_process.setdefault(p["process"], []).append(f"{p['name']} {p['seconds']:.2f}")
    parts = "; ".join(f"{proc}: " + ", ".join(items) for proc, items in by_process.items())
    return f"ready {timeline['launch_to_ready_s']:.2f} s after launch ({parts})"


_CURRENT: StartupTimeline | None = None


def install(process: str, origin: float) -> StartupTimeline:
    """Make a new timeline this process's current one (the launcher's, or a rank's given the launch instant)."""
    global _CURRENT
    _CURRENT = StartupTimeline(process, origin)
    return _CURRENT


def current() -> StartupTimeline:
    """This process's timeline; one that counts from the process's own start if none was installed."""
    global _CURRENT
    if _CURRENT is None:
        _CURRENT = StartupTimeline(f"pid{os.getpid()}", process_start_time())
    return _CURRENT


def phase(name: str) -> contextlib.AbstractContextManager[None]:
    """Time a block as a phase of this process's start (see StartupTimeline.phase)."""
    return current().phase(name)
