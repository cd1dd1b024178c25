"""A TransferEngine fork into another --tp-size: fetch every seed rank's layout, read, check, scatter."""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from sglang.srt.model_loader.remote_instance_loader import ForkContext, RemoteManifest
from sglang.srt.model_loader.remote_instance_weight_loader_utils import RemoteInstanceError
from sglang.srt.model_loader.transfer_engine_client import (
    INFO_PATH,
    READ_PLANS,
    SeedRankInfo,
    _open_peer_memory,
    choose_endpoint,
    parse_info,
)
from sglang.srt.model_loader.transfer_engine_reshard import (
    RankPlan,
    ReshardError,
    SeedShard,
    bad_blocks,
    parse_shards,
    plan_all,
    zero_padding,
)
from sglang.srt.model_loader.transfer_engine_reshard_read import (
    RankRead,
    RankResult,
    Trace,
    all_checks,
    prepare_rank,
    trace_summary,
    tracing,
    warm_kernels,
)
from sglang.srt.remote_instance import block_checksum_gpu
from sglang.srt.remote_instance.manifest import weight_tensors
from sglang.srt.remote_instance.mooncake_guard import (
    GuardedEngine,
    MooncakeError,
    ReadEntry,
    auto_nic_protocol,
    memory_location,
    rank_engine,
)
from sglang.srt.remote_instance.shard_layout import ShardLayout, model_layouts
from sglang.srt.remote_instance.transfer_engine_memory import host_identity, merged_regions, pretouch

logger = logging.getLogger(__name__)


@dataclass
class SeedRank:
    """One seed rank: what it published and its tensors' layouts and blocks."""

    rank: int
    info: SeedRankInfo
    shards: dict[str, SeedShard]


@dataclass
class ReshardFork:
    """State of one client rank's fork from a seed with another TP size."""

    seed_tp: int
    ranks: dict[int, SeedRank]
    results: list[RankResult] = field(default_factory=list)
    padding_bytes: int = 0
    tp_rank: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)  # seed ranks are read from parallel threads
    warming: threading.Thread | None = None  # warm_kernels, from fetch until the reads

    @classmethod
    def fetch(cls, ctx: ForkContext, seed_tp: int) -> ReshardFork:
        """GET every seed rank's info; RemoteInstanceError if one publishes no shard layout."""
        ranks: dict[int, SeedRank] = {}
        for rank in range(seed_tp):
            payload = ctx.seed.request(
                "manifest", "GET", INFO_PATH, params={"rank": rank}, timeout=min(ctx.remaining(), 30.0)
            )
            info = parse_info(ctx.seed.name, payload)
            if info.http_port is not None and info.http_port != ctx.seed.port:
                raise RemoteInstanceError(
                    ctx.seed.name,
                    "manifest",
                    f"seed rank {rank}'s TransferEngine info came from the instance on HTTP port {info.http_port}; "
                    "give each instance on the seed host its own --engine-info-bootstrap-port",
                )
            published = payload.get("shard_layout") if isinstance(payload, dict) else None
            if not isinstance(published, dict) or not isinstance(published.get("tensors"), dict):
                raise RemoteInstanceError(
                    ctx.seed.name,
                    "manifest",
                    f"the seed runs --tp-size {seed_tp} and this client {ctx.tp_size}, but seed rank {rank} "
                    "publishes no shard layout (an upstream or older seed): start the client with "
                    f"--tp-size {seed_tp}",
                )
            try:
                shards = parse_shards(published["tensors"], info.weights)
            except ReshardError as e:
                raise RemoteInstanceError(ctx.seed.name, "manifest", f"seed rank {rank}: {e}") from None
            ranks[rank] = SeedRank(rank, info, shards)
        return cls(seed_tp, ranks, warming=warm_kernels(ctx.device))

    def manifest(self) -> RemoteManifest:
        """No per-tensor specs to compare (shapes differ by design): layouts are checked in transfer, and the
        bytes against the seed's block checksums (verify)."""
        return RemoteManifest(None, None, None, verify=self.verify)

    def transfer(self, model: nn.Module, ctx: ForkContext) -> int:
        """Plan, read and scatter every tensor of this rank; returns the bytes read from seed ranks."""
        self.tp_rank = ctx.tp_rank
        tensors = dict(weight_tensors(model))
        layouts = model_layouts(model)
        plans = self._plan(ctx, tensors, layouts)
        self.padding_bytes += zero_padding(tensors, layouts)
        pretouch(tensors.values(), ctx.device)
        start = time.perf_counter()
        engines: dict[int, GuardedEngine] = {}
        try:
            routes = {r: self._route(ctx, r, engines, tensors) for r in plans}
            for r, (engine, session) in routes.items():
                if READ_PLANS[engine.protocol].touch_first:
                    self._touch(ctx, r, engine, session, tensors)
            traced = tracing()
            traces: dict[int, Trace | None] = {r: [] if traced else None for r in plans}
            # Entries, scratch, scatter views and block-sum tables, before the first read (as a raw read of the
            # same bytes builds its entry lists before it starts).
            reads = {r: self._prepare_rank(ctx, r, plans[r], routes[r], tensors, traces[r]) for r in plans}
            if ctx.device.type == "cuda":
                torch.cuda.synchronize(ctx.device)  # the padding zeros, so that "transfer" times the reads alone
            if self.warming is not None:
                self.warming.join(max(0.0, min(ctx.remaining(), 30.0)))
            if traced:
                self._log_context(ctx)
            ctx.timings["engine setup"] = time.perf_counter() - start
            start = time.perf_counter()
            with ThreadPoolExecutor(max(1, len(plans)), thread_name_prefix="reshard") as pool:
                moved = sum(pool.map(lambda r: self._run(ctx, reads[r]), plans))
            joined = time.perf_counter()
            if ctx.device.type == "cuda":
                torch.cuda.synchronize(ctx.device)  # the last rounds' sums and scatters are part of the transfer
            ctx.timings["transfer"] = time.perf_counter() - start
            if traced:
                self._log_trace(ctx, traces, start, joined)
        except MooncakeError as e:
            raise RemoteInstanceError(ctx.seed.name, "transfer", str(e)) from None
        finally:
            for engine in engines.values():
                engine.close()
        staged = sum(len(p.staged) for p in plans.values())
        logger.info(
            "TP%d: forked from a TP%d seed: %.1f MB from %d seed rank(s), %d in-place and %d staged read(s)",
            ctx.tp_rank,
            self.seed_tp,
            moved / 1e6,
            len(plans),
            sum(len(p.direct) for p in plans.values()),
            staged,
        )
        ctx.details["reshard"] = f"TP{self.seed_tp}->TP{ctx.tp_size}"
        return moved

    def verify(self, model: nn.Module) -> list[str]:
        """Tensors whose bytes differ from the seed's block checksums: staged blocks as they passed through
        scratch, in-place blocks where they landed."""
        checks = all_checks(self.results)
        bad = bad_blocks(checks)
        logger.info(
            "TP%d: verified %d blocks, %.1f MB read from the TP%d seed, against its per-block checksums (every "
            "byte read, in place and staged); %.1f KB of vocabulary padding was zero-filled here, not read",
            self.tp_rank,
            sum(len(c.blocks) for c in checks),
            sum(b.hi - b.lo for c in checks for b in c.blocks) / 1e6,
            self.seed_tp,
            self.padding_bytes / 1e3,
        )
        return bad

    def _plan(
        self, ctx: ForkContext, tensors: dict[str, torch.Tensor], layouts: dict[str, ShardLayout]
    ) -> dict[int, RankPlan]:
        seeds = {r: s.shards for r, s in self.ranks.items()}
        dtypes = {r: {n: str(m.get("dtype")) for n, m in (s.info.meta or {}).items()} for r, s in self.ranks.items()}
        try:
            return plan_all(tensors, layouts, seeds, dtypes, _preference(ctx, self.ranks))
        except ReshardError as e:
            raise RemoteInstanceError(ctx.seed.name, "layout", f"TP{ctx.tp_rank}: {e}") from None

    def _route(
        self, ctx: ForkContext, rank: int, engines: dict[int, GuardedEngine], tensors: dict[str, torch.Tensor]
    ) -> tuple[GuardedEngine, str]:
        """An engine of its own for reading from one seed rank (seed ranks are read from parallel threads, and a
        failed read retires its engine)."""
        endpoint = choose_endpoint(self.ranks[rank].info.endpoints, ctx.device)
        protocol = endpoint.protocol or auto_nic_protocol()
        gpu = ctx.device.index if ctx.device.type == "cuda" else None
        destination = list(tensors.items())
        engine = engines[rank] = rank_engine(
            ctx.seed.ip, protocol, gpu, lambda: merged_regions(destination, ctx.device)
        )
        ctx.details["transport"] = protocol
        return engine, endpoint.session_id

    def _log_context(self, ctx: ForkContext) -> None:
        """What else runs in this process as the reads start (threads holding the GIL slow the read step)."""
        logger.info(
            "TP%d: reshard trace: fused block sums %s; threads: %s",
            ctx.tp_rank,
            (
                f"ready (loaded in {block_checksum_gpu.load_seconds.get(ctx.device.index, 0.0):.2f} s)"
                if block_checksum_gpu.available(ctx.device)
                else "not ready"
            ),
            ", ".join(sorted(t.name for t in threading.enumerate())),
        )

    def _log_trace(self, ctx: ForkContext, traces: dict[int, Trace | None], start: float, joined: float) -> None:
        """Each seed rank's read-step spans, and when its threads joined and the device was done."""
        for r, trace in traces.items():
            logger.info("TP%d: reshard trace, seed rank %d: %s", ctx.tp_rank, r, trace_summary(trace or [], start))
        logger.info(
            "TP%d: reshard trace: reads joined at %.1f ms, device synchronised at %.1f ms",
            ctx.tp_rank,
            (joined - start) * 1e3,
            ctx.timings["transfer"] * 1e3,
        )

    def _touch(
        self, ctx: ForkContext, rank: int, engine: GuardedEngine, session: str, tensors: dict[str, torch.Tensor]
    ) -> None:
        """Map the seed rank's allocations into this process before the timed reads (see _open_peer_memory)."""
        weights = self.ranks[rank].info.weights
        touch = [
            ReadEntry(n, 0, int(weights[n][0]), int(weights[n][1]) * int(weights[n][2]))
            for n in tensors
            if tensors[n].numel()
        ]
        _open_peer_memory(engine, session, touch, ctx, READ_PLANS[engine.protocol])

    def _prepare_rank(
        self,
        ctx: ForkContext,
        rank: int,
        plan: RankPlan,
        route: tuple[GuardedEngine, str],
        tensors: dict[str, torch.Tensor],
        trace: Trace | None,
    ) -> RankRead:
        engine, session = route
        read_plan = READ_PLANS[engine.protocol]
        gpu = ctx.device.index if ctx.device.type == "cuda" else None
        seed = self.ranks[rank]
        ptrs = {name: int(seed.info.weights[name][0]) for name in tensors}

        def read(entries: list[ReadEntry], owner: Any) -> int:
            return engine.read(session, entries, ctx.deadline, read_plan, owner=owner, cuda_device=gpu)

        def prepare(buffers: list[torch.Tensor]) -> None:
            if engine.protocol == "rdma":  # the NIC writes into scratch too
                engine.register([(b.data_ptr(), b.numel()) for b in buffers], memory_location(gpu))

        verify = ctx.load_config.verify
        return prepare_rank(
            plan, seed.shards, ptrs, tensors, read, verify, prepare=prepare, trace=trace, seed_ranks=len(self.ranks)
        )

    def _run(self, ctx: ForkContext, job: RankRead) -> int:
        if ctx.device.type == "cuda":
            # A pool thread starts on device 0: a CUDA call from it would open a second context (~0.1 s, and
            # memory) on another rank's GPU.
            torch.cuda.set_device(ctx.device)
        result = job.run()
        with self.lock:
            self.results.append(result)
        return result.moved


def _preference(ctx: ForkContext, ranks: dict[int, SeedRank]) -> list[int]:
    """Seed ranks in the order to read replicated bytes from: those on this GPU first (no link crossed), then
    starting at this rank's own index so that client ranks spread over the seed's ranks."""
    order = [(ctx.tp_rank + k) % len(ranks) for k in range(len(ranks))]
    if ctx.device.type != "cuda":
        return order
    uuid = host_identity(ctx.device).get("gpu_uuid")
    local = [r for r in order if any(e.gpu_uuid == uuid for e in ranks[r].info.endpoints)]
    return local + [r for r in order if r not in local]
