"""Running one seed rank's reshard plan: read every byte, check the staged ones in scratch, scatter them.

Two ways, chosen by SGLANG_RFORK_RESHARD_PIPELINE:
- sequential (default): the in-place reads in one go, then staged rounds one after another (read a round into
  scratch, sum its blocks, scatter it) on the default stream, two scratch buffers taking turns.
- pipelined (=1, experimental): a reader thread issues the reads back to back (staged rounds first, then the
  in-place ones) while this thread launches each landed round's checks and scatter on a CUDA stream of its own;
  with enough free memory there is a single staged round, so they run beside the in-place reads. Block sums use
  the fused GPU kernel (block_checksum_gpu) once it is compiled, and the scatter copies in wide words. Measured on
  2xH200 with benchmark/rfork/profile_reshard.py (the read step alone, 8B-shaped): 0.78x / 0.60x of the raw link
  for TP1 -> TP2 / TP2 -> TP1 against 0.56x / 0.47x for the sequential way; but inside a server (bench_topology.py)
  the fork's transfer took 0.18-0.21 s against 0.08-0.09 s, for a reason not found before the GPU time ran out.
  Hence not the default.
"""

from __future__ import annotations

import contextlib
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
    RankPlan,
    SeedShard,
    StagedRead,
    rounds,
    scatter,
)
from sglang.srt.remote_instance.block_checksum import range_sums
from sglang.srt.remote_instance.mooncake_guard import ReadEntry

# Sequential: staged reads of one round share one scratch buffer of this size (or the largest block, if bigger).
SCRATCH_BYTES = 256 << 20
# Pipelined: rounds of this size on the CPU; on a GPU round_bytes sizes them from free memory. BUFFERS scratch
# buffers take turns when there is more than one round.
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
class RankResult:
    """What reading from one seed rank did: bytes moved and the blocks to check (sums of the staged ones were
    taken as they passed through scratch; the in-place ones are summed where they landed, in `verify`)."""

    moved: int = 0
    staged_checks: list[tuple[torch.Tensor, Block, str]] = field(default_factory=list)
    in_place: list[tuple[torch.Tensor, int, Block, str]] = field(default_factory=list)

    def checks(self) -> list[tuple[torch.Tensor, Block, str]]:
        """(sums, block, tensor name) of every block read."""
        sums = range_sums([(raw, at, at + b.hi - b.lo) for raw, at, b, _ in self.in_place])
        return self.staged_checks + [(s, b, name) for s, (_, _, b, name) in zip(sums, self.in_place)]


def round_bytes(plan: RankPlan, device: torch.device, seed_ranks: int = 1) -> int:
    """Scratch per round for this plan. On a GPU whose free memory holds every staged byte in FREE_SHARE of it
    (shared by the seed ranks read at once), one round: two calls into the transport in all, the checks and
    scatter hidden behind the in-place reads. (Weights load before the KV cache is allocated, so the memory is
    usually there.) Otherwise BUFFERS rounds of what fits, at least the plan's largest staged block."""
    largest = max((b.hi - b.lo for s in plan.staged for b in s.blocks), default=0)
    staged = sum(-(-(s.hi - s.lo) // ALIGN) * ALIGN for s in plan.staged)
    if device.type != "cuda":
        return max(ROUND_BYTES, largest)
    free, _ = torch.cuda.mem_get_info(device)
    budget = int(free * FREE_SHARE) // max(1, seed_ranks)
    if staged <= budget:
        return max(staged, largest)
    return max(MIN_ROUND_BYTES, budget // BUFFERS, largest)


def pipelined() -> bool:
    """Whether SGLANG_RFORK_RESHARD_PIPELINE asks for the pipelined way (see the module's docstring)."""
    return os.environ.get("SGLANG_RFORK_RESHARD_PIPELINE", "0") not in ("", "0", "false")


def read_rank(
    plan: RankPlan,
    shards: dict[str, SeedShard],
    ptrs: dict[str, int],
    tensors: dict[str, torch.Tensor],
    read: ReadFn,
    verify: bool,
    scratch_bytes: int | None = None,
    prepare: Callable[[list[torch.Tensor]], None] | None = None,
    trace: Trace | None = None,
    pipeline: bool | None = None,
    seed_ranks: int = 1,
) -> RankResult:
    """Run one seed rank's plan, the way `pipeline` says (None: as SGLANG_RFORK_RESHARD_PIPELINE says).
    scratch_bytes: bytes per staged round (None: SCRATCH_BYTES, or round_bytes for the pipelined way, which shares
    free memory among the `seed_ranks` read at once). prepare gets the scratch buffers before any read into them
    (a transport that must register local memory); trace, if given, collects (step, host start, host end) spans
    for benchmark/rfork/profile_reshard.py."""
    job = _Job(plan, shards, ptrs, tensors, read, verify, prepare, _Spans(trace))
    if (pipelined() if pipeline is None else pipeline) and plan.staged:
        size = scratch_bytes or round_bytes(plan, job.device, seed_ranks)
        return _read_pipelined(job, size)
    return _read_sequential(job, scratch_bytes or SCRATCH_BYTES)


class _Job:
    """One seed rank's plan and what both ways derive from it: flat byte views, in-place entries, the result."""

    def __init__(self, plan, shards, ptrs, tensors, read, verify, prepare, span) -> None:
        self.plan, self.shards, self.ptrs, self.tensors = plan, shards, ptrs, tensors
        self.read, self.verify, self.prepare, self.span = read, verify, prepare, span
        self.device = next(iter(tensors.values())).device
        self.raw = {name: t.reshape(-1).view(torch.uint8) for name, t in tensors.items()}
        self.direct = [
            ReadEntry(d.name, self.raw[d.name].data_ptr() + d.local, ptrs[d.name] + d.lo, d.hi - d.lo)
            for d in plan.direct
        ]
        self.out = RankResult()
        if verify:
            self.out.in_place = [
                (self.raw[d.name], d.local + b.lo - d.lo, b, d.name) for d in plan.direct for b in d.blocks
            ]

    def scratch(self, round_size: int, count: int) -> tuple[list[list[tuple[StagedRead, int]]], list[torch.Tensor]]:
        """The staged rounds and up to `count` scratch buffers for them (prepared for the transport)."""
        largest = max(b.hi - b.lo for s in self.plan.staged for b in s.blocks)
        groups = rounds(self.plan.staged, max(round_size, largest))
        size = max(at + s.hi - s.lo for g in groups for s, at in g)
        buffers = [torch.empty(size, dtype=torch.uint8, device=self.device) for _ in range(min(count, len(groups)))]
        if self.prepare is not None:
            self.prepare(buffers)
        return groups, buffers

    def round_entries(self, group: list[tuple[StagedRead, int]], scratch: torch.Tensor) -> list[ReadEntry]:
        """Reads of one staged round into scratch."""
        base = scratch.data_ptr()
        return [ReadEntry(s.name, base + at, self.ptrs[s.name] + s.lo, s.hi - s.lo) for s, at in group]

    def check_and_scatter(self, group: list[tuple[StagedRead, int]], scratch: torch.Tensor, wide: bool) -> None:
        """Launch the sums of a landed round's blocks (compared in `verify`) and copy its pieces into place."""
        if self.verify:
            with self.span("sums"):
                blocks = [(b, s.name) for s, _ in group for b in s.blocks]
                spans = [(scratch, at + b.lo - s.lo, at + b.hi - s.lo) for s, at in group for b in s.blocks]
                self.out.staged_checks += [(sums, b, name) for sums, (b, name) in zip(range_sums(spans), blocks)]
        with self.span("scatter"):
            for s, at in group:
                shard = self.shards[s.name]
                buf = scratch[at : at + s.hi - s.lo]
                scatter(s, buf, shard.layout, shard.element_size, self.raw[s.name], wide=wide)


def _read_sequential(job: _Job, round_size: int) -> RankResult:
    out = job.out
    with job.span("direct read"):
        out.moved = job.read(job.direct, job.tensors) if job.direct else 0
    if not job.plan.staged:
        return out
    groups, buffers = job.scratch(round_size, 2)
    done: list[torch.cuda.Event | None] = [None] * len(buffers)
    cuda = job.device.type == "cuda"
    with torch.cuda.device(job.device) if cuda else contextlib.nullcontext():
        for i, group in enumerate(groups):
            turn = i % len(buffers)
            if done[turn] is not None:
                with job.span("wait scratch"):
                    done[turn].synchronize()  # the kernels reading this buffer two rounds ago have finished
            with job.span("staged read"):
                out.moved += job.read(job.round_entries(group, buffers[turn]), (job.tensors, buffers))
            job.check_and_scatter(group, buffers[turn], wide=False)
            if cuda:
                done[turn] = torch.cuda.Event()
                done[turn].record()
    return out


def _read_pipelined(job: _Job, round_size: int) -> RankResult:
    with job.span("setup"):
        groups, buffers = job.scratch(round_size, BUFFERS)
        reader = _Reader(job, groups, buffers)
        # Checks and scatter run on a stream of their own: on the default stream they would wait for (and hold
        # up) the transport's copies, which Mooncake issues on a stream that synchronises with it.
        side = torch.cuda.Stream(job.device) if job.device.type == "cuda" else None
    try:
        with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
            for turn, group in reader.landed():
                job.check_and_scatter(group, buffers[turn], wide=True)
                reader.release(turn, _recorded(side))
    finally:
        reader.stop()
        if side is not None:
            # Later work (the verify step, the allocator reusing scratch) runs on the default stream.
            torch.cuda.current_stream(job.device).wait_stream(side)
    job.out.moved = reader.moved
    return job.out


def _recorded(stream: torch.cuda.Stream | None) -> torch.cuda.Event | None:
    if stream is None:
        return None  # on the CPU the checks and scatter are done when they return
    event = torch.cuda.Event()
    event.record(stream)
    return event


class _Reader:
    """The thread that issues one seed rank's reads: staged rounds into free buffers, then the in-place reads."""

    def __init__(self, job: _Job, groups: list[list[tuple[StagedRead, int]]], buffers: list[torch.Tensor]) -> None:
        self.job, self.groups, self.buffers, self.span = job, groups, buffers, job.span
        self.moved = 0
        self._free: queue.Queue = queue.Queue()
        for turn in range(len(buffers)):
            self._free.put((turn, None))
        self._landed: queue.Queue = queue.Queue()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="reshard-reader", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            if self.buffers[0].is_cuda:
                # A new thread starts on device 0; any CUDA call from it would open a context there.
                torch.cuda.set_device(self.buffers[0].device)
            for group in self.groups:
                turn, done = self._free.get()
                if self._stopped.is_set():
                    return
                if done is not None:
                    with self.span("wait scratch"):
                        done.synchronize()  # the checks and scatter of this buffer's last round have run
                with self.span("staged read"):
                    entries = self.job.round_entries(group, self.buffers[turn])
                    self.moved += self.job.read(entries, (self.job.tensors, self.buffers))
                self._landed.put((turn, group))
            if self.job.direct and not self._stopped.is_set():
                with self.span("direct read"):
                    self.moved += self.job.read(self.job.direct, (self.job.tensors, self.buffers))
            self._landed.put(None)
        except BaseException as e:  # handed to the consuming thread
            self._landed.put(e)

    def landed(self) -> Iterator[tuple[int, list[tuple[StagedRead, int]]]]:
        """(buffer, round) as each round lands; returns after the in-place reads too have landed. Every read is
        bounded by its transport's deadline, so this always ends."""
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
        self._free.put((turn, done))

    def stop(self) -> None:
        """Let the thread end without issuing more reads (after an error here) and wait for it."""
        if self._thread.is_alive():
            self._stopped.set()
            self._free.put((None, None))
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
