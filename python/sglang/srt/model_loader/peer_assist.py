"""Fan-out R-Fork over TransferEngine (--remote-instance-weight-loader-peer-assist): clients of one seed read from
each other as well as from the seed, and a forked client keeps serving later ones.

Each client rank registers its own (still empty) weights with a Mooncake engine of its own, announces itself in the
seed's swarm registry (GET/PUT /remote_instance_peers) and updates there which tensors it holds verified. It reads
its tensors in an order rotated by its join number, so clients started together fetch different tensors from the
seed first and then trade them; it also announces which tensors it is reading from the seed, and leaves the ones
others announced to them (see peer_sources), so that the seed sends about one copy in all. Every byte, from whichever
source, is checked against the seed's checksums.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import requests
from torch import nn

from sglang.srt.model_loader.peer_reader import SourceReader
from sglang.srt.model_loader.peer_sources import BATCH_LIMITS, Item, Source, WorkBoard
from sglang.srt.model_loader.remote_instance_weight_loader_utils import RemoteInstanceError
from sglang.srt.remote_instance.manifest import weight_tensors
from sglang.srt.remote_instance.mooncake_guard import (
    GuardedEngine,
    MooncakeError,
    auto_nic_protocol,
    memory_location,
    rank_engine,
)
from sglang.srt.remote_instance.peer_registry import PATH
from sglang.srt.remote_instance.transfer_engine_memory import host_identity, merged_regions, pretouch, segment_regions

if TYPE_CHECKING:
    from sglang.srt.model_loader.remote_instance_loader import ForkContext
    from sglang.srt.model_loader.transfer_engine_client import Endpoint, SeedRankInfo

logger = logging.getLogger(__name__)

# While forking: how often this client publishes what it holds and learns what the others hold.
EXCHANGE_S = 0.15
# Once forked: how often it refreshes its entry (the registry drops it 15 s after the last refresh).
HEARTBEAT_S = 3.0
REGISTRY_TIMEOUT_S = 2.0
# A forking peer refreshes its entry every EXCHANGE_S: one not refreshed for this long is stuck or dead, and its
# claims on the seed's tensors are ignored (its verified tensors can still be read; a dead one is dropped then).
CLAIMS_STALE_S = 1.0
# Peers one client rank reads from at most (each costs a reader thread and a Mooncake engine).
MAX_READ_PEERS = 8
# Engines that serve this process's weights to later clients: kept for the life of the process.
_SERVING: list[GuardedEngine] = []


@dataclass
class Registry:
    """This rank's entry in the seed's swarm registry; every call is bounded and none raises."""

    url: str
    headers: dict[str, str]
    rank: int
    announcement: dict[str, Any]
    addrs: list[int]
    serving: bool = True
    seq: int | None = None
    warned: bool = False
    sent_addrs: bool = False

    def announce(self, have: int, done: bool, claims: int = 0) -> bool:
        """PUT this rank's state (its addresses on the first call or after the entry expired); a rank that
        cannot serve announces nothing."""
        if not self.serving:
            return False
        body = {**self.announcement, "rank": self.rank, "have": f"{have:x}" if have else "", "done": done}
        if claims:
            body["claims"] = f"{claims:x}"
        for with_addrs in (False, True) if self.sent_addrs else (True,):
            if with_addrs:
                body["addrs"] = self.addrs
            resp = self._call("PUT", json=body)
            if resp is None:
                return False
            if resp.status_code == 404 and not with_addrs:
                continue  # the registry forgot us (expired, or the seed restarted): announce in full
            if resp.status_code != 200:
                self._warn(f"HTTP {resp.status_code}: {resp.text[:200]}")
                return False
            self.sent_addrs = True
            try:
                self.seq = int(resp.json()["seq"])
            except (ValueError, KeyError, TypeError):
                pass
            return True
        return False

    def peers(self, with_addrs: bool) -> list[dict[str, Any]]:
        """The other live entries of this rank, with or without their addresses (empty when the registry cannot
        be reached)."""
        resp = self._call("GET", params={"rank": self.rank, "addrs": int(with_addrs)})
        if resp is None or resp.status_code != 200:
            return []
        try:
            peers = resp.json()["peers"]
        except (ValueError, KeyError, TypeError):
            return []
        if not isinstance(peers, list):
            return []
        return [p for p in peers if isinstance(p, dict) and p.get("peer_id") != self.announcement["peer_id"]]

    def _call(self, method: str, **kwargs: Any) -> requests.Response | None:
        try:
            return requests.request(method, self.url, headers=self.headers, timeout=REGISTRY_TIMEOUT_S, **kwargs)
        except requests.RequestException as e:
            self._warn(type(e).__name__)
            return None

    def _warn(self, why: str) -> None:
        if not self.warned:
            self.warned = True
            logger.warning(
                "TP%d: the seed's swarm registry %s failed (%s): without it this rank finds no peers, or "
                "serves none; the fork goes on with the seed and whatever peers it knows",
                self.rank,
                self.url,
                why,
            )


@dataclass
class Swarm:
    """One client rank's peer-assisted fork: the board, its sources and their readers."""

    board: WorkBoard
    ctx: ForkContext
    protocol: str
    model: nn.Module
    readers: dict[str, SourceReader] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)  # peer_id -> label of the sources read from
    rejected: set[str] = field(default_factory=set)  # peers this client cannot read from (transport, layout)

    def add_source(self, source: Source) -> None:
        """Start reading from a new source in its own thread."""
        from sglang.srt.model_loader.transfer_engine_client import READ_PLANS

        self.board.add(source)
        gpu = self.ctx.device.index if self.ctx.device.type == "cuda" else None
        reader = SourceReader(
            self.board, source, self._engine, READ_PLANS[self.protocol], self.ctx.deadline, self.model, gpu
        )
        self.readers[source.label] = reader
        reader.start()

    def _engine(self) -> GuardedEngine:
        device = self.ctx.device
        gpu = device.index if device.type == "cuda" else None
        return rank_engine(
            self.ctx.seed.ip, self.protocol, gpu, lambda: merged_regions(weight_tensors(self.model), device)
        )

    def refresh(self, registry: Registry) -> None:
        """Learn what the peers hold now; their addresses are fetched only when a new peer shows up."""
        peers = registry.peers(with_addrs=False)
        new = [
            p for p in peers if str(p.get("peer_id")) not in self.labels and str(p.get("peer_id")) not in self.rejected
        ]
        if new and sum(1 for s in self.live_sources() if not s.is_seed) < MAX_READ_PEERS:
            peers = registry.peers(with_addrs=True)
        for peer in peers:
            self.consider(peer)

    def consider(self, peer: dict[str, Any]) -> None:
        """Add or refresh a peer from its registry entry, if this client can read from it."""
        peer_id = str(peer.get("peer_id"))
        try:
            have = int(peer.get("have") or "0", 16)
        except ValueError:
            return
        claims = _claims(peer)
        label = self.labels.get(peer_id)
        if label is not None:
            if self.board.sources[label].failed is None:
                self.board.update_have(label, have, peer.get("done") is True, claims)
            return
        addrs = peer.get("addrs")
        if peer_id in self.rejected or addrs is None:
            return
        if not (
            isinstance(addrs, list)
            and len(addrs) == len(self.board.items)
            and all(type(a) is int and 0 <= a < 1 << 64 for a in addrs)
            and isinstance(peer.get("seq"), int)
            and peer.get("protocol") == self.protocol
            and self._reachable(peer)
        ):
            self.rejected.add(peer_id)
            return
        if sum(1 for s in self.live_sources() if not s.is_seed) >= MAX_READ_PEERS:
            return  # enough sources; this one is considered again once one of them is dropped
        label = f"peer#{peer['seq']} {peer.get('session_id')}"
        self.labels[peer_id] = label
        source = Source(label, str(peer["session_id"]), addrs, is_seed=False, seq=peer["seq"])
        source.have = have & ((1 << len(self.board.items)) - 1)
        source.done = peer.get("done") is True
        source.set_claims(claims & ((1 << len(self.board.items)) - 1), time.monotonic())
        logger.info("TP%d: peer assist: reading from %s as well", self.ctx.tp_rank, label)
        self.add_source(source)

    def _reachable(self, peer: dict[str, Any]) -> bool:
        if self.protocol != "nvlink_intra":
            return True
        from sglang.srt.model_loader.transfer_engine_client import Endpoint, nvlink_reaches

        endpoint = Endpoint("nvlink_intra", str(peer["session_id"]), peer.get("host_id"), peer.get("gpu_uuid"))
        return nvlink_reaches(endpoint, self.ctx.device)

    def live_sources(self) -> list[Source]:
        return [s for s in self.board.sources.values() if s.failed is None]


def transfer_with_peers(info: SeedRankInfo, endpoint: Endpoint, model: nn.Module, ctx: ForkContext) -> int:
    """Fill model from the seed and its forking peers; returns the bytes read. Needs a seed that publishes checksums."""
    meta = info.meta or {}
    local = dict(weight_tensors(model))
    items: list[Item] = []
    for name, entry in info.weights.items():
        t = local.get(name)
        if t is None or t.numel() == 0:
            continue  # names were matched with the manifest already; zero-length slices abort Mooncake batches
        items.append(
            Item(len(items), name, t, t.numel() * t.element_size(), int(entry[0]), str(meta[name]["checksum"]))
        )
    pretouch((item.tensor for item in items), ctx.device)
    protocol = endpoint.protocol or auto_nic_protocol()
    ctx.details["transport"] = protocol
    start = time.perf_counter()
    engine, registry = _join(ctx, protocol, model, items)
    try:
        moved = _read(ctx, registry, items, endpoint, protocol, model, start)
    except BaseException:
        if engine is not None:
            engine.close()  # the weights it serves are about to be freed
        raise
    if engine is not None:
        _SERVING.append(engine)
    return moved


def _read(
    ctx: ForkContext,
    registry: Registry,
    items: list[Item],
    endpoint: Endpoint,
    protocol: str,
    model: nn.Module,
    start: float,
) -> int:
    offset = int((registry.seq or 0) * 0.6180339887 % 1.0 * len(items))
    board = WorkBoard(items, list(range(offset, len(items))) + list(range(offset)), BATCH_LIMITS[protocol])
    board.seq = registry.seq
    swarm = Swarm(board, ctx, protocol, model)
    swarm.refresh(registry)  # before the seed's reader starts, so that it knows what peers hold already
    seed = Source("seed", endpoint.session_id, [it.seed_addr for it in items], is_seed=True)
    swarm.add_source(seed)
    ctx.timings["engine setup"] = time.perf_counter() - start
    logger.info(
        "TP%d: reading %d tensors over Mooncake %s from seed rank %s and its peers (join #%s, starting at tensor %d)",
        ctx.tp_rank,
        len(items),
        protocol,
        endpoint.session_id,
        registry.seq,
        offset,
    )
    start = time.perf_counter()
    next_exchange = 0.0
    try:
        while not board.finished:
            if board.fatal:
                raise RemoteInstanceError(ctx.seed.name, "transfer", board.fatal)
            if time.monotonic() > ctx.deadline:
                read = board.done.bit_count()
                raise RemoteInstanceError(
                    ctx.seed.name, "transfer", f"{read} of {len(items)} tensors read before the deadline"
                )
            if seed.failed and (board.needs_seed() or not any(not s.is_seed for s in swarm.live_sources())):
                raise RemoteInstanceError(ctx.seed.name, "transfer", f"Mooncake {protocol}: {seed.failed}")
            if time.monotonic() >= next_exchange:
                next_exchange = time.monotonic() + EXCHANGE_S
                registry.announce(board.done, False, board.seed_claims())
                swarm.refresh(registry)
            board.wait(EXCHANGE_S)
    finally:
        board.stop()
    ctx.timings["transfer"] = time.perf_counter() - start
    registry.announce(board.done, True)
    if registry.serving:
        heartbeat = threading.Thread(target=_heartbeat, args=(registry, board.done), name="rfork-peer-heartbeat")
        heartbeat.daemon = True
        heartbeat.start()
    ctx.details["peer_assist"] = _report(board, registry)
    logger.info(
        "TP%d: peer assist: bytes by source: %s",
        ctx.tp_rank,
        ", ".join(
            f"{s.label} {s.bytes_read}" + (f" (dropped: {s.failed})" if s.failed else "")
            for s in board.sources.values()
        ),
    )
    return sum(s.bytes_read for s in board.sources.values())


def _join(
    ctx: ForkContext, protocol: str, model: nn.Module, items: list[Item]
) -> tuple[GuardedEngine | None, Registry]:
    """Serve this rank's weights with an engine of its own and announce it in the seed's registry (a rank that
    cannot serve still reads from the others)."""
    device = ctx.device
    tensors = weight_tensors(model)
    gpu = device.index if device.type == "cuda" else None
    engine: GuardedEngine | None = None
    try:
        engine = rank_engine(ctx.seed.ip, protocol, gpu)
        spans = segment_regions(tensors, device) if protocol == "nvlink_intra" else merged_regions(tensors, device)
        engine.register(spans, memory_location(gpu))
    except MooncakeError as e:
        logger.warning("TP%d: peer assist: this rank cannot serve its weights to other clients: %s", ctx.tp_rank, e)
        if engine is not None:
            engine.close()
            engine = None
    headers = {"Authorization": f"Bearer {ctx.seed.api_key}"} if ctx.seed.api_key else {}
    announcement = {
        "peer_id": uuid.uuid4().hex,
        "session_id": engine.session_id if engine is not None else "",
        "protocol": protocol,
        **host_identity(device),
    }
    addrs = [it.tensor.data_ptr() for it in items]
    registry = Registry(ctx.seed.url + PATH, headers, ctx.tp_rank, announcement, addrs, serving=engine is not None)
    registry.announce(0, False)
    return engine, registry


def _heartbeat(registry: Registry, have: int) -> None:
    """Keep this forked rank listed as a full source for as long as the process lives."""
    while True:
        time.sleep(HEARTBEAT_S)
        registry.announce(have, True)


def _claims(peer: dict[str, Any]) -> int:
    """The tensors a peer says it reads from the seed; none when it says nothing (an older client), says it
    wrongly, or has not refreshed its entry lately."""
    age = peer.get("age_s")
    if not isinstance(age, (int, float)) or age > CLAIMS_STALE_S:
        return 0
    try:
        return max(int(peer.get("claims") or "0", 16), 0)
    except (TypeError, ValueError):
        return 0


def _report(board: WorkBoard, registry: Registry) -> dict[str, Any]:
    seed_bytes = sum(s.bytes_read for s in board.sources.values() if s.is_seed)
    peer_bytes = sum(s.bytes_read for s in board.sources.values() if not s.is_seed)
    return {
        "join_seq": registry.seq,
        "bytes_by_source": {s.label: s.bytes_read for s in board.sources.values()},
        "seed_bytes": seed_bytes,
        "peer_bytes": peer_bytes,
        "dropped_sources": {s.label: s.failed for s in board.sources.values() if s.failed},
        "tensors_reread_after_bad_checksum": sum(s.bad_tensors for s in board.sources.values()),
        "seed_reads_after_claim_wait": board.claim_overrides,
    }
