"""Running one seed rank's reshard plan: read every byte, check the staged ones in scratch, scatter them.

Two steps, so that the link is kept busy from the first read to the last:
- prepare_rank, before any read (the fork's "engine setup" step), derives everything that depends only on the plan
  and this rank's memory: the read entries, the scratch buffers and staged rounds, the scatter views, and the
  block-sum plans of every round (the in-place blocks of all seed ranks are summed together afterwards).
- RankRead.run: a reader thread issues the reads back to back (staged rounds first, then the in-place reads) while
  the calling thread launches each landed round's checks and scatter on a CUDA stream of its own, behind the reads
  that follow. With enough free memory there is one staged round, so the in-place reads hide all of it.

Block sums take the fused GPU kernel (block_checksum_gpu) if it is ready when the rank is prepared (in a
TransferEngine seed, which loads it as it starts); a client sums with torch (loading the kernel costs its start-up
more than it saves, see ModelRunner), about ten kernels per run of equal blocks: staged rounds are laid out so that
equal blocks lie back to back (transfer_engine_reshard.rounds), and the in-place blocks of all seed ranks are
summed together (all_checks). SGLANG_RFORK_RESHARD_TRACE=1 logs where the time went.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from sglang.srt.model_loader.transfer_engine_reshard import (
    ALIGN,
    Block,
    Checks,
    RankPlan,
    SeedShard,
    rounds,
    scatter_pairs,
)
from sglang.srt.remote_instance.block_checksum import ROW_WORDS, RangeSums
from sglang.srt.remote_instance.mooncake_guard import ReadEntry

logger = logging.getLogger(__name__)

# Rounds of this size on the CPU; on a GPU round_bytes sizes them from free memory. BUFFERS scratch buffers take
# turns when there is more than one round.
ROUND_BYTES = 512 << 20
MIN_ROUND_BYTES = 64 << 20
BUFFERS = 3
# Never take more than this share of the device's free memory for scratch.
FREE_SHARE = 0.25

# Reads entries (local_addr <- remote_addr) from one seed rank, returning once the bytes have landed; owner
# holds the local buffers and must outlive an abandoned read.
ReadFn = Callable[[list[ReadEntry], Any], int]
Trace = list[tuple[str, float, float]]


@dataclass
class _BlockChecks:
    """Block sums planned over fixed ranges, with the blocks and tensor names they check."""

    sums: RangeSums
    blocks: tuple[Block, ...]
    names: tuple[str, ...]

    def launch(self) -> Checks:
        return Checks(self.sums(), self.blocks, self.names)


@dataclass
class _Round:
    """One staged round: reads into scratch buffer `turn`, its block checks there, and the copies into place."""

    turn: int
    entries: list[ReadEntry]
    copies: list[tuple[torch.Tensor, torch.Tensor]]
    checks: _BlockChecks | None


# A block read in place: (flat uint8 view of the tensor, start, end) where it landed, the seed's block, the tensor.
Placed = tuple[tuple[torch.Tensor, int, int], Block, str]


@dataclass
class RankResult:
    """What reading from one seed rank did: bytes moved, the checks of the staged blocks (launched as they passed
    through scratch) and the blocks read in place (summed where they landed, by all_checks)."""

    moved: int = 0
    staged: list[Checks] = field(default_factory=list)
    in_place: list[Placed] = field(default_factory=list)


def all_checks(results: list[RankResult]) -> list[Checks]:
    """Checks of every block the seed ranks' reads brought, to be compared by transfer_engine_reshard.bad_blocks:
    the staged ones as launched; the in-place ones of all seed ranks summed together in memory order, so that
    pieces of one tensor from different seed ranks (q from rank 0 beside q from rank 1) join into one run of
    blocks for torch."""
    staged = [c for r in results for c in r.staged]
    placed = sorted((p for r in results for p in r.in_place), key=lambda p: (p[0][0].data_ptr(), p[0][1]))
    if not placed:
        return staged
    sums = RangeSums([span for span, _, _ in placed])()
    return [*staged, Checks(sums, tuple(b for _, b, _ in placed), tuple(n for _, _, n in placed))]


def round_bytes(plan: RankPlan, device: torch.device, seed_ranks: int = 1) -> int:
    """Scratch per round for this plan (RankRead raises it to the plan's largest staged block). On a GPU whose free
    memory holds every staged byte in FREE_SHARE of it (shared by the seed ranks read at once), one round: two
    calls into the transport in all, the checks and scatter hidden behind the in-place reads. (Weights load
    before the KV cache is allocated, so the memory is usually there.) Otherwise BUFFERS rounds of what fits."""
    if device.type != "cuda":
        return ROUND_BYTES
    staged = sum(-(-(s.hi - s.lo) // ALIGN) * ALIGN for s in plan.staged)
    free, _ = torch.cuda.mem_get_info(device)
    budget = int(free * FREE_SHARE) // max(1, seed_ranks)
    if staged <= budget:
        return staged
    return max(MIN_ROUND_BYTES, budget // BUFFERS)


def tracing() -> bool:
    """Whether SGLANG_RFORK_RESHARD_TRACE asks the server to log where each seed rank's read step spent its time."""
    return os.environ.get("SGLANG_RFORK_RESHARD_TRACE", "0") not in ("", "0", "false")


def trace_summary(trace: Trace, origin: float) -> str:
    """One line of a read step's spans: per step its total ms, calls, and first start / last end in ms after
    origin (the transfer's start)."""
    steps: dict[str, list[float]] = {}
    for step, a, b in trace:
        s = steps.setdefault(step, [0.0, 0, a, b])
        s[0] += b - a
        s[1] += 1
        s[2], s[3] = min(s[2], a), max(s[3], b)
    return "; ".join(
        f"{k} {v[0] * 1e3:.1f} ms x{v[1]} [{(v[2] - origin) * 1e3:.1f}..{(v[3] - origin) * 1e3:.1f}]"
        for k, v in steps.items()
    )


def warm_kernels(device: torch.device) -> threading.Thread | None:
    """Launch, once each, on a background thread, the kernels the read step will launch: block sums through torch
    (runs of blocks, a lone block with a byte tail) and the scatter's strided copies in each word size. CUDA loads
    a kernel on its first launch, and a fork pays that inside its transfer otherwise: the first pass of the read
    step took 271 ms against 52 ms for the next (2xH200, benchmark/rfork/profile_reshard.py). A fork starts this
    when it learns the seed's TP size and joins it before its reads."""
    if device.type != "cuda":
        return None

    def run() -> None:
        try:
            torch.cuda.set_device(device)
            with torch.cuda.stream(torch.cuda.Stream(device)):
                block = 8 * 8 * ROW_WORDS  # 8 rows of words
                raw = torch.zeros(4 * block + 64, dtype=torch.uint8, device=device)
                other = torch.zeros(block, dtype=torch.uint8, device=device)
                # a run, a lone block with a tail, and a run in another tensor (gathered with the first)
                spans = [(raw, 0, block), (raw, block, 2 * block), (raw, 2 * block, 4 * block + 61), (other, 0, block)]
                RangeSums(spans)()
                grid = raw[: 2 * block].view(256, -1)
                for word in (torch.int64, torch.int32, torch.int16, torch.uint8):
                    rows = grid.view(word)
                    half = rows.shape[1] // 2
                    rows[:128, :half].copy_(rows[128:, half:])
                raw[:block].copy_(raw[block : 2 * block])
                torch.cuda.current_stream(device).synchronize()
        except Exception as e:  # the read step then loads them itself
            logger.warning("warming the reshard kernels on %s failed: %r", device, e)

    thread = threading.Thread(target=run, name="reshard-kernels", daemon=True)
    thread.start()
    return thread


def prepare_rank(
    plan: RankPlan,
    shards: dict[str, SeedShard],
    ptrs: dict[str, int],
    tensors: dict[str, torch.Tensor],
    read: ReadFn,
    verify: bool,
    scratch_bytes: int | None = None,
    prepare: Callable[[list[torch.Tensor]], None] | None = None,
    trace: Trace | None = None,
    seed_ranks: int = 1,
) -> RankRead:
    """Everything one seed rank's plan needs before its first read (see the module's docstring).
    scratch_bytes: bytes per staged round (None: round_bytes, which shares free memory among the `seed_ranks`
    read at once). prepare gets the scratch buffers before any read into them (a transport that must register
    local memory); trace, if given, collects (step, host start, host end) spans."""
    spans = _Spans(trace)
    with spans("prepare"):
        return RankRead(plan, shards, ptrs, tensors, read, verify, scratch_bytes, prepare, spans, seed_ranks)


def read_rank(plan: RankPlan, shards, ptrs, tensors, read: ReadFn, verify: bool, **options: Any) -> RankResult:
    """prepare_rank, then run: one seed rank's plan in one call (tests, benchmarks)."""
    return prepare_rank(plan, shards, ptrs, tensors, read, verify, **options).run()


class RankRead:
    """One seed rank's plan, prepared: in-place entries, staged rounds in scratch, and the checks of both."""

    def __init__(self, plan, shards, ptrs, tensors, read, verify, scratch_bytes, prepare, spans, seed_ranks) -> None:
        self.read, self.span = read, spans
        self.tensors = tensors
        self.device = next(iter(tensors.values())).device
        names = {r.name for r in plan.direct} | {r.name for r in plan.staged}
        raw = {name: tensors[name].reshape(-1).view(torch.uint8) for name in names}
        self.direct = [
            ReadEntry(d.name, raw[d.name].data_ptr() + d.local, ptrs[d.name] + d.lo, d.hi - d.lo) for d in plan.direct
        ]
        self.in_place: list[Placed] = []
        if verify:
            self.in_place = [
                ((raw[d.name], d.local + b.lo - d.lo, d.local + b.hi - d.lo), b, d.name)
                for d in plan.direct
                for b in d.blocks
            ]
        self.buffers: list[torch.Tensor] = []
        self.rounds: list[_Round] = []
        if plan.staged:
            # A block is checked whole, so a round holds at least the largest one.
            largest = max(b.hi - b.lo for s in plan.staged for b in s.blocks)
            groups = rounds(plan.staged, max(scratch_bytes or round_bytes(plan, self.device, seed_ranks), largest))
            nbytes = max(at + s.hi - s.lo for g in groups for s, at in g)
            with spans("prepare: scratch"):
                count = min(BUFFERS, len(groups))
                self.buffers = [torch.empty(nbytes, dtype=torch.uint8, device=self.device) for _ in range(count)]
                if prepare is not None:
                    prepare(self.buffers)
            with spans("prepare: rounds"):
                for i, group in enumerate(groups):
                    turn = i % len(self.buffers)
                    self.rounds.append(self._round(turn, group, shards, ptrs, raw, verify))

    def _round(self, turn, group, shards, ptrs, raw, verify) -> _Round:
        scratch = self.buffers[turn]
        base = scratch.data_ptr()
        entries = [ReadEntry(s.name, base + at, ptrs[s.name] + s.lo, s.hi - s.lo) for s, at in group]
        copies = []
        for s, at in group:
            shard = shards[s.name]
            piece = scratch[at : at + s.hi - s.lo]
            copies += scatter_pairs(s, piece, shard.layout, shard.element_size, raw[s.name], wide=True)
        checks = None
        if verify:
            blocks = [(s, at, b) for s, at in group for b in s.blocks]
            checks = _BlockChecks(
                RangeSums([(scratch, at + b.lo - s.lo, at + b.hi - s.lo) for s, at, b in blocks]),
                tuple(b for _, _, b in blocks),
                tuple(s.name for s, _, _ in blocks),
            )
        return _Round(turn, entries, copies, checks)

    def run(self) -> RankResult:
        """Read, check and scatter; returns once every byte has landed and the checks and copies of the staged
        ones are queued on this device (a caller that needs them done synchronises)."""
        out = RankResult(in_place=self.in_place)
        with self.span("start"):
            reader = _Reader(self)
            # Checks and scatter run on a stream of their own: on the default stream they would wait for (and hold
            # up) the transport's copies, which Mooncake issues on a stream that synchronises with it.
            side = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        try:
            with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
                for rnd in reader.landed():
                    if rnd.checks is not None:
                        with self.span("sums"):
                            out.staged.append(rnd.checks.launch())
                    with self.span("scatter"):
                        for dest, src in rnd.copies:
                            dest.copy_(src)
                    reader.release(rnd.turn, _recorded(side))
        finally:
            with self.span("end"):
                reader.stop()
                if side is not None:
                    # Later work (the verify step, the allocator reusing scratch) runs on the default stream.
                    torch.cuda.current_stream(self.device).wait_stream(side)
        out.moved = reader.moved
        return out


def _recorded(stream: torch.cuda.Stream | None) -> torch.cuda.Event | None:
    if stream is None:
        return None  # on the CPU the checks and scatter are done when they return
    event = torch.cuda.Event()
    event.record(stream)
    return event


class _Reader:
    """The thread that issues one seed rank's reads: staged rounds into their buffers as each comes free, then
    the in-place reads."""

    def __init__(self, job: RankRead) -> None:
        self.job, self.span = job, job.span
        self.moved = 0
        # Per buffer, the event after which its last round's checks and scatter have run (None: free now).
        self._free: list[queue.Queue] = [queue.Queue() for _ in job.buffers]
        for q in self._free:
            q.put(None)
        self._landed: queue.Queue = queue.Queue()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="reshard-reader", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        job = self.job
        owner = (job.tensors, job.buffers)
        try:
            if job.device.type == "cuda":
                # A new thread starts on device 0; any CUDA call from it would open a context there.
                torch.cuda.set_device(job.device)
            for rnd in job.rounds:
                done = self._free[rnd.turn].get()
                if self._stopped.is_set():
                    return
                if done is not None:
                    with self.span("wait scratch"):
                        done.synchronize()
                with self.span("staged read"):
                    self.moved += job.read(rnd.entries, owner)
                self._landed.put(rnd)
            if job.direct and not self._stopped.is_set():
                with self.span("direct read"):
                    self.moved += job.read(job.direct, owner)
            self._landed.put(None)
        except BaseException as e:  # handed to the consuming thread
            self._landed.put(e)

    def landed(self) -> Iterator[_Round]:
        """Each staged round as it lands; returns after the in-place reads too have landed. Every read is bounded
        by its transport's deadline, so this always ends."""
        while True:
            with self.span("wait read"):
                item = self._landed.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def release(self, turn: int, done: torch.cuda.Event | None) -> None:
        """Hand a buffer back once `done` (the kernels reading it) has passed."""
        self._free[turn].put(done)

    def stop(self) -> None:
        """Let the thread end without issuing more reads (after an error here) and wait for it."""
        if self._thread.is_alive():
            self._stopped.set()
            for q in self._free:
                q.put(None)
            self._thread.join()


class _Spans:
    """Records (step, host start, host end) into a list; does nothing without one."""

    def __init__(self, trace: Trace | None) -> None:
        self.trace = trace

    @contextlib.contextmanager
    def __call__(self, step: str) -> Iterator[None]:
        if self.trace is None:
            yield
            return
        start = time.perf_counter()
        try:
            yield
        finally:
            self.trace.append((step, start, time.perf_counter()))
