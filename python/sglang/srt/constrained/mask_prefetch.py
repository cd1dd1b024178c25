"""Grammar masks filled on a worker thread while the device runs the forward that the masks are for.

A constrained request's next mask depends only on the tokens its matcher has accepted, and the last of those was
accepted when the previous step was sampled. So the scheduler starts the fill right before a batch's forward
(Sampler.prefetch_masks) and the sampler takes the result when the logits are there, instead of filling masks on
the host after the forward, on the critical path. It is off unless SGLANG_GRAMMAR_MASK_PREFETCH=1: on an H200 with the
8B-shaped model it made constrained steps slower, not faster (bench_grammar: +21.8% over free rows at batch 1 and
+126% at batch 32 with it, +18.1% and +102% without), since xgrammar's fill threads then compete with the thread that
launches the forward.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from sglang.srt.constrained.grammar_backend import GrammarBackend
    from sglang.srt.managers.schedule_batch import Req

logger = logging.getLogger(__name__)

ENABLE_ENV = "SGLANG_GRAMMAR_MASK_PREFETCH"
# How long sampling waits for a prefetched fill (a whole batch's masks take milliseconds) before it gives up.
FILL_TIMEOUT_S = 60.0


@dataclass
class _Fill:
    """One prefetch: the batch it was for, its constrained rows, their matchers' positions, and its result."""

    reqs: list[Req]
    rows: list[int]
    accepted: list[int]
    bitmask: torch.Tensor
    done: Future


class MaskPrefetcher:
    """Starts a batch's mask fill on one worker thread (start) and hands the sampler a bitmask for its rows (take),
    filling on the spot whatever the prefetch did not cover or what has gone stale since."""

    def __init__(self, backend: GrammarBackend, enabled: bool | None = None) -> None:
        self.backend = backend
        self.enabled = os.environ.get(ENABLE_ENV, "0") not in ("", "0") if enabled is None else enabled
        self._pool: ThreadPoolExecutor | None = None
        self._fill: _Fill | None = None
        # Rows whose mask take() found prefetched, and rows it had to fill itself (tests and profiling read them).
        self.prefetched_rows = 0
        self.filled_rows = 0

    def start(self, reqs: list[Req]) -> None:
        """Begin filling the masks of reqs' constrained rows; the matchers must not advance until take(). Never
        raises: a prefetch that cannot start leaves take() to fill the masks itself."""
        try:
            self._finish()  # one fill at a time: a matcher is never read while the sampler advances it
            if self.enabled:
                self._start(reqs)
        except Exception:
            logger.exception("Prefetching grammar masks failed; they are filled at sampling time instead")

    def _start(self, reqs: list[Req]) -> None:
        rows = [i for i, r in enumerate(reqs) if r.grammar is not None and not r.finished and not r.grammar.terminated]
        if not rows:
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="grammar-masks")
        matchers = [reqs[i].grammar for i in rows]
        bitmask = self.backend.new_masks(len(reqs))
        done = self._pool.submit(self.backend.fill_masks, bitmask, rows, matchers)
        self._fill = _Fill(list(reqs), rows, [m.accepted for m in matchers], bitmask, done)

    def take(self, reqs: list[Req], rows: list[int]) -> torch.Tensor:
        """A host bitmask with len(reqs) rows where each of `rows` (constrained) holds its request's next mask."""
        fill = self._finish()
        if fill is not None and len(fill.reqs) == len(reqs) and all(a is b for a, b in zip(fill.reqs, reqs)):
            fresh = dict(zip(fill.rows, fill.accepted))
            if all(fresh.get(i) == reqs[i].grammar.accepted for i in rows):
                self.prefetched_rows += len(rows)
                return fill.bitmask  # the usual decode step: the batch that was prefetched, nothing stale
        bitmask = self.backend.new_masks(len(reqs))
        missing = []
        found = {} if fill is None else {id(fill.reqs[i]): (i, a) for i, a in zip(fill.rows, fill.accepted)}
        for i in rows:
            hit = found.get(id(reqs[i]))
            if hit is not None and fill.reqs[hit[0]] is reqs[i] and hit[1] == reqs[i].grammar.accepted:
                bitmask[i] = fill.bitmask[hit[0]]
            else:
                missing.append(i)
        self.prefetched_rows += len(rows) - len(missing)
        self.filled_rows += len(missing)
        if missing:
            self.backend.fill_masks(bitmask, missing, [reqs[i].grammar for i in missing])
        return bitmask

    def _finish(self) -> _Fill | None:
        """The fill in flight, once it is done; None if there is none or it failed (take() then fills the masks
        itself). One that does not end in time is an error: its matchers may not be advanced while it runs."""
        fill, self._fill = self._fill, None
        if fill is None:
            return None
        try:
            fill.done.result(timeout=FILL_TIMEOUT_S)
        except TimeoutError:
            raise RuntimeError(
                f"grammar masks for {len(fill.rows)} rows were not filled within {FILL_TIMEOUT_S:.0f} s; "
                f"leave {ENABLE_ENV} unset to fill them at sampling time instead"
            ) from None
        except Exception:
            logger.exception("Prefetched grammar masks failed; filling them at sampling time")
            return None
        return fill
