"""A fork's progress in the client's log while the weights move: bytes done of the total and the rate, every ~2 s.

The transfer loops report with `advance(nbytes)` (bytes known to have landed) or `enqueued(work, nbytes)` (an
asynchronous collective whose completion the ticker polls); both do nothing when no fork is being tracked.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator
from typing import Any

logger = logging.getLogger(__name__)

PROGRESS_INTERVAL_S = 2.0


class ForkProgress:
    """Bytes of one rank's fork that have landed, and a thread that logs them until the fork ends."""

    def __init__(self, label: str, total_bytes: int, interval: float = PROGRESS_INTERVAL_S) -> None:
        self.label = label
        self.total = total_bytes
        self.interval = interval
        self.done = 0
        self.works: list[tuple[Any, int]] = []
        self.lock = threading.Lock()
        self.started = time.perf_counter()
        self.stopped = threading.Event()
        self.ticker = threading.Thread(target=self._tick, name="rfork-progress", daemon=True)

    def add(self, nbytes: int) -> None:
        with self.lock:
            self.done += nbytes

    def add_work(self, work: Any, nbytes: int) -> None:
        with self.lock:
            self.works.append((work, nbytes))

    def landed(self) -> int:
        """Bytes done, counting each asynchronous collective once it reports completion."""
        with self.lock:
            still = []
            for work, nbytes in self.works:
                if work.is_completed():
                    self.done += nbytes
                else:
                    still.append((work, nbytes))
            self.works = still
            return min(self.done, self.total)

    def line(self) -> str:
        """The progress line as it is now."""
        done, elapsed = self.landed(), time.perf_counter() - self.started
        share = done / self.total * 100 if self.total else 100.0
        return (
            f"{self.label}: {done / 1e9:.2f} / {self.total / 1e9:.2f} GB ({share:.0f}%) in {elapsed:.1f} s, "
            f"{done / max(elapsed, 1e-9) / 1e9:.2f} GB/s"
        )

    def _tick(self) -> None:
        while not self.stopped.wait(self.interval):
            logger.info("%s", self.line())


_current: ForkProgress | None = None


@contextlib.contextmanager
def track(label: str, total_bytes: int, interval: float = PROGRESS_INTERVAL_S) -> Iterator[ForkProgress]:
    """Track one fork of this process while the block runs (the transfer step), logging every interval."""
    global _current
    progress = ForkProgress(label, total_bytes, interval)
    _current = progress
    progress.ticker.start()
    try:
        yield progress
    finally:
        progress.stopped.set()
        _current = None


def advance(nbytes: int) -> None:
    """nbytes more of the tracked fork have landed."""
    progress = _current
    if progress is not None:
        progress.add(nbytes)


def enqueued(work: Any, nbytes: int) -> None:
    """An asynchronous collective (a torch.distributed Work) will land nbytes when it completes."""
    progress = _current
    if progress is not None:
        progress.add_work(work, nbytes)
