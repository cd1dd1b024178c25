"""The reading loop of one peer-assist source (the seed or a peer): claim a batch on the WorkBoard, read it with the
source's own Mooncake engine, check it against the seed's checksums, hand back what failed."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from sglang.srt.model_loader.peer_sources import BATCH_TIMEOUT_S, TEST_READ_DELAY_S, Source, WorkBoard
from sglang.srt.remote_instance.manifest import tensor_checksums
from sglang.srt.remote_instance.mooncake_guard import GuardedEngine, MooncakeError, ReadEntry, ReadPlan

logger = logging.getLogger(__name__)


@dataclass
class SourceReader:
    """The reading loop of one source, in its own thread with its own Mooncake engine."""

    board: WorkBoard
    source: Source
    make_engine: Callable[[], GuardedEngine]
    plan: ReadPlan
    deadline: float
    owner: Any
    cuda_device: int | None = None
    thread: threading.Thread | None = None

    def start(self) -> None:
        self.thread = threading.Thread(target=self._run, name=f"rfork-peer-read-{self.source.label}", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            if self.cuda_device is not None:
                torch.cuda.set_device(self.cuda_device)
            engine = self.make_engine()
        except Exception as e:  # an engine that cannot start is a source we cannot use
            self.board.complete(self.source, [], [], f"cannot start a Mooncake engine for it: {e}")
            return
        try:
            self._loop(engine)
        except Exception as e:  # anything else (a failed checksum pass, say): its tensors go to the other sources
            logger.exception("R-Fork peer assist: reading from %s failed", self.source.label)
            self.board.complete(self.source, [], [], f"{type(e).__name__}: {e}")
        finally:
            engine.close()

    def _loop(self, engine: GuardedEngine) -> None:
        board, source = self.board, self.source
        while True:
            batch = board.claim(source, timeout=0.5)
            if not batch:
                with board.cond:
                    if board.stopped or board.finished or board.fatal or source.failed:
                        return
                continue
            entries = [ReadEntry(it.name, it.tensor.data_ptr(), source.addrs[it.index], it.nbytes) for it in batch]
            nbytes = sum(e.length for e in entries)
            limit = min(self.deadline, time.monotonic() + BATCH_TIMEOUT_S + nbytes / 1e8)
            try:
                engine.read(
                    source.session_id, entries, limit, self.plan, owner=self.owner, cuda_device=self.cuda_device
                )
            except MooncakeError as e:
                logger.warning("R-Fork peer assist: dropping source %s: %s", source.label, e)
                board.complete(source, [], [], str(e))
                return
            if self.cuda_device is not None:
                # Copy-engine transports may report a batch done while its copies are still queued on a stream.
                torch.cuda.synchronize(self.cuda_device)
            sums = tensor_checksums([it.tensor for it in batch])
            good = [it for it, s in zip(batch, sums) if s == it.checksum]
            bad = [it for it, s in zip(batch, sums) if s != it.checksum]
            if bad:
                logger.warning(
                    "R-Fork peer assist: %d tensor(s) from %s fail the seed's checksums (e.g. %s); reading them "
                    "from the seed",
                    len(bad),
                    source.label,
                    bad[0].name,
                )
            board.complete(source, good, bad)
            if source.failed:
                return
            if TEST_READ_DELAY_S:
                time.sleep(TEST_READ_DELAY_S)
