"""Peer-assisted R-Fork reads: which source reads which tensors next (the per-source reading loop is peer_reader).

One WorkBoard per client rank tracks every tensor (pending, being read, verified). One worker thread per source
(the seed, each usable peer) claims a batch, reads it with its own Mooncake engine, checks every tensor against the
seed's checksum and hands back what failed. A source that errors is dropped and its tensors return to the pool;
a peer whose bytes fail the check is dropped and those tensors are read from the seed.

While other clients fork too, the seed's link is the one they all share, so each client announces its *seed claims*
(the batch its seed reader has in flight and the rest of its run ahead, see seed_runs) and leaves a tensor that a live
peer claimed to that peer, for a bounded time, instead of asking the seed for it as well: the seed sends about one
copy in all.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field

import torch

from sglang.srt.model_loader.seed_runs import (
    CLAIM_AHEAD_BATCHES,
    CLAIM_AHEAD_S,
    CLAIM_WAIT_S,
    bits,
    longest_gap,
    middle,
)

logger = logging.getLogger(__name__)

# Test-only: sleep this long after every batch, so a test can kill a peer while another client still reads from it.
TEST_READ_DELAY_S = float(os.environ.get("SGLANG_RFORK_PEER_TEST_READ_DELAY_S", "0"))
# A batch may take this long plus 1 s per 100 MB before its source counts as hung.
BATCH_TIMEOUT_S = 20.0
# The seed re-reads a tensor whose bytes failed its own checksum at most this often before the fork fails.
SEED_ATTEMPTS = 2


@dataclass(frozen=True)
class BatchLimit:
    """A batch is at most this many bytes (one tensor at least) and this many tensors: small enough that sources
    interleave and peers soon hold something to share, large enough that per-batch costs (a checksum pass with one
    host sync, a registry round) stay small next to the transfer."""

    nbytes: int
    tensors: int


# NIC links move ~1.5-10 GB/s: 64 MiB is tens of ms. NVLink moves ~390 GB/s: batches of GBs, or the checksum syncs
# between them would dominate.
BATCH_LIMITS = {
    "tcp": BatchLimit(64 << 20, 16),
    "rdma": BatchLimit(256 << 20, 64),
    "nvlink_intra": BatchLimit(2 << 30, 256),
}
# Tests: fewer tensors per batch, so that forks running side by side overlap even on a tiny model.
_BATCH_TENSORS = os.environ.get("SGLANG_RFORK_PEER_BATCH_TENSORS")


@dataclass(frozen=True)
class Item:
    """One tensor to fill: its position in the seed's order, local tensor, size, address on the seed, checksum."""

    index: int
    name: str
    tensor: torch.Tensor
    nbytes: int
    seed_addr: int
    checksum: str


@dataclass
class Source:
    """A seed or peer rank to read from: its session, per-tensor addresses and which tensors it holds verified."""

    label: str
    session_id: str
    addrs: list[int]
    is_seed: bool
    have: int = 0
    done: bool = False  # a peer that has forked: it holds everything and reads from no one
    failed: str | None = None
    bytes_read: int = 0
    bad_tensors: int = 0
    seq: int | None = None  # a peer's join number: of two clients claiming one tensor, the lower number keeps it
    claims: int = 0  # bitmap of the tensors this peer reads (or is about to read) from the seed
    claim_since: dict[int, float] = field(default_factory=dict)  # when this client first saw each claim
    seen: float = field(default_factory=time.monotonic)  # when this client learnt of the source

    def has(self, index: int) -> bool:
        return self.is_seed or bool(self.have >> index & 1)

    def set_claims(self, claims: int, now: float) -> None:
        """Take the peer's latest claim bitmap, keeping the first-seen time of the claims it still makes."""
        for i in bits(claims & ~self.claims):
            self.claim_since[i] = now
        for i in bits(self.claims & ~claims):
            del self.claim_since[i]
        self.claims = claims

    def fresh_claims(self, now: float) -> int:
        """The claims first seen less than CLAIM_WAIT_S ago."""
        expired = 0
        for i, since in self.claim_since.items():
            if now - since >= CLAIM_WAIT_S:
                expired |= 1 << i
        return self.claims & ~expired


@dataclass
class WorkBoard:
    """Every tensor's state; sources claim batches in this client's order and report back."""

    items: list[Item]
    order: list[int]
    limit: BatchLimit = BATCH_LIMITS["tcp"]
    sources: dict[str, Source] = field(default_factory=dict)
    claimed: dict[int, str] = field(default_factory=dict)
    done: int = 0  # bitmap of verified tensors, what this client announces
    seed_only: set[int] = field(default_factory=set)
    seed_failures: dict[int, int] = field(default_factory=dict)
    fatal: str | None = None
    stopped: bool = False
    cond: threading.Condition = field(default_factory=threading.Condition)
    seq: int | None = None  # this client's join number
    plan: int = 0  # bitmap of the tensors the seed reader means to read next (announced with the in-flight ones)
    seed_started: float | None = None  # when the seed reader claimed its first batch: its rate so far sets the plan
    claim_overrides: int = 0  # tensors read from the seed although a peer claimed them (the wait for it expired)
    cursor: int | None = None  # where the seed reader's current run goes on

    def __post_init__(self) -> None:
        self.sizes = [it.nbytes for it in self.items]  # fixed for the board's life; the seed's run planning reads it

    @property
    def finished(self) -> bool:
        return self.done == (1 << len(self.items)) - 1

    def add(self, source: Source) -> None:
        with self.cond:
            self.sources[source.label] = source
            self.cond.notify_all()

    def update_have(self, label: str, have: int, done: bool, claims: int = 0) -> None:
        """A peer announced more verified tensors, its current seed claims, or that it has forked."""
        with self.cond:
            source = self.sources[label]
            every = (1 << len(self.items)) - 1
            have &= every
            claims &= every
            if (have, done, claims) != (source.have, source.done, source.claims):
                source.have, source.done = have, done
                source.set_claims(claims, time.monotonic())
                self.cond.notify_all()

    def seed_claims(self) -> int:
        """What this client announces it reads from the seed: the seed reader's batch in flight and its plan."""
        with self.cond:
            claims = self.plan
            for index, label in self.claimed.items():
                if self.sources[label].is_seed:
                    claims |= 1 << index
            return claims & ~self.done

    def claim(self, source: Source, timeout: float) -> list[Item]:
        """The next batch source should read (waits up to timeout for one); empty if none or when stopped."""
        end = time.monotonic() + timeout
        with self.cond:
            while not self.stopped and source.failed is None and not self.finished and self.fatal is None:
                batch = self._pick(source)
                if batch:
                    for item in batch:
                        self.claimed[item.index] = source.label
                    return batch
                left = end - time.monotonic()
                if left <= 0:
                    break
                self.cond.wait(left)
        return []

    def _pick(self, source: Source) -> list[Item]:
        if source.is_seed:
            return self._pick_seed()
        batch: list[Item] = []
        size = 0
        for i in self.order:
            if self.done >> i & 1 or i in self.claimed or i in self.seed_only or not source.has(i):
                continue
            item = self.items[i]
            if batch and (size + item.nbytes > self.limit.nbytes or len(batch) >= self._max_tensors()):
                break
            batch.append(item)
            size += item.nbytes
        return batch

    def _pick_seed(self) -> list[Item]:
        """The seed reader walks a run of consecutive tensors (in the seed's order) that no one else has or reads
        from the seed; where its run runs into another's, it starts again in the middle of the longest such gap,
        so that two readers seldom walk towards the same tensors (claims reach the others a little late)."""
        peers = [s for s in self.sources.values() if not s.is_seed and s.failed is None]
        expired = 0
        skip = 0
        spread = any(not s.done for s in peers)
        if spread:
            # Other clients are forking too, so the seed's link is the one all of them share: leave it what no
            # usable peer holds, nor what a forking peer reads from the seed itself (for CLAIM_WAIT_S at most).
            # Once every known peer has forked, the seed is one source among the others.
            now = time.monotonic()
            for s in peers:
                skip |= s.have
                if s.done:
                    continue
                fresh = s.fresh_claims(now)
                expired |= s.claims & ~fresh
                if self.seq is not None and s.seq is not None and self.seq < s.seq:
                    fresh &= ~self.plan  # both claim these: the earlier joiner (this client) keeps them
                skip |= fresh
        taken = self.done | skip & ~self._seed_only_mask()
        for i in self.claimed:
            taken |= 1 << i
        n = len(self.items)
        start = self.cursor
        if start is None or taken >> start & 1:
            if spread:
                # Peers that joined before this client and have not started yet pick their runs as this client
                # would, from much the same view: leave them the places they will pick.
                newcomers = [
                    s
                    for s in peers
                    if not (s.done or s.have or s.claims) and self._joined_before(s) and now - s.seen < CLAIM_WAIT_S
                ]
                start = self._run_start(taken, len(newcomers))
            else:
                start = next((i for i in self.order if not taken >> i & 1), None)
        if start is None:
            return []
        batch: list[Item] = []
        size = 0
        plan = 0
        plan_room = 0
        i = start
        for _ in range(n):
            if taken >> i & 1:
                break  # another's run (or what this client has already): the next batch starts elsewhere
            item = self.items[i]
            if plan or batch and (size + item.nbytes > self.limit.nbytes or len(batch) >= self._max_tensors()):
                # The batch is full; what the seed reader would read next is its plan, claimed with the batch.
                if not plan:
                    plan_room = self._plan_bytes(size)
                if plan_room <= 0:
                    break
                plan |= 1 << i
                plan_room -= item.nbytes
            else:
                batch.append(item)
                size += item.nbytes
            i = (i + 1) % n
        if not batch:
            return []
        self.cursor = (batch[-1].index + 1) % n
        self.plan = plan
        self.claim_overrides += sum(1 for it in batch if expired >> it.index & 1)
        if self.seed_started is None:
            self.seed_started = time.monotonic()
        return batch

    def _seed_only_mask(self) -> int:
        mask = 0
        for i in self.seed_only:
            mask |= 1 << i
        return mask

    def _joined_before(self, peer: Source) -> bool:
        return self.seq is not None and peer.seq is not None and peer.seq < self.seq

    def _run_start(self, taken: int, newcomers: int = 0) -> int | None:
        """Where the seed reader's next run starts (see seed_runs), after newcomers earlier joiners took theirs; this
        client's own first tensor when nothing is taken yet (orders are rotated by join number, so clients that
        start together spread)."""
        if not taken & ((1 << len(self.items)) - 1):
            return self.order[0] if self.order else None
        sizes = self.sizes
        for _ in range(newcomers + 1):
            gap, gap_bytes = longest_gap(sizes, taken)
            if not gap:
                return None
            if gap_bytes <= self._plan_bytes(0) or len(gap) <= self._max_tensors() and gap_bytes <= self.limit.nbytes:
                start = gap[0]  # one batch, or no longer than a plan: splitting it would only cost an extra batch
            else:
                start = middle(gap, sizes, gap_bytes)
            for j in gap[gap.index(start) :]:
                taken |= 1 << j  # a newcomer's run: from its start to the end of the gap
        return start

    def _plan_bytes(self, batch_bytes: int) -> int:
        """How far past its batch of batch_bytes the seed reader claims (see CLAIM_AHEAD_BATCHES)."""
        rate = 0.0
        seed = next((s for s in self.sources.values() if s.is_seed), None)
        if self.seed_started is not None and seed is not None:
            rate = seed.bytes_read / max(time.monotonic() - self.seed_started, 1e-3)
        return max((CLAIM_AHEAD_BATCHES - 1) * batch_bytes, int(rate * CLAIM_AHEAD_S))

    def needs_seed(self) -> bool:
        """Whether some tensor still missing can come only from the seed (a peer's copy failed the check)."""
        with self.cond:
            return any(not self.done >> i & 1 for i in self.seed_only)

    def _max_tensors(self) -> int:
        return int(_BATCH_TENSORS) if _BATCH_TENSORS else self.limit.tensors

    def complete(self, source: Source, good: list[Item], bad: list[Item], error: str | None = None) -> None:
        """Record a batch: good tensors are verified, bad ones failed the checksum, error drops the source."""
        with self.cond:
            for item in good:
                self.claimed.pop(item.index, None)
                self.done |= 1 << item.index
                source.bytes_read += item.nbytes
            for item in bad:
                self.claimed.pop(item.index, None)
                self.seed_only.add(item.index)
                source.bad_tensors += 1
                if source.is_seed:
                    self.seed_failures[item.index] = self.seed_failures.get(item.index, 0) + 1
                    if self.seed_failures[item.index] >= SEED_ATTEMPTS:
                        self.fatal = (
                            f"{item.name} read from the seed {SEED_ATTEMPTS} times never matched the seed's own "
                            "checksum: its weights changed after it published them (a weight update?); fork again"
                        )
            if bad and not source.is_seed and error is None:
                error = f"served {len(bad)} tensor(s) that fail the seed's checksums, e.g. {bad[0].name}"
            if error is not None:
                source.failed = error
                if source.is_seed:
                    self.plan = 0  # nothing more comes from the seed through this client: let the others take it
                for index in [i for i, label in self.claimed.items() if label == source.label]:
                    del self.claimed[index]
            self.cond.notify_all()

    def stop(self) -> None:
        with self.cond:
            self.stopped = True
            self.cond.notify_all()

    def wait(self, timeout: float) -> None:
        with self.cond:
            if not (self.finished or self.fatal):
                self.cond.wait(timeout)
