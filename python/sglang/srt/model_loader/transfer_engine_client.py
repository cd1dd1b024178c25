"""R-Fork client over a Mooncake TransferEngine: one-sided reads of the weights a seed rank published."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from sglang.srt.model_loader.remote_instance_loader import (
    ForkContext,
    RemoteManifest,
    RemoteWeightBackend,
    register_remote_backend,
    seed_tp_size,
)
from sglang.srt.model_loader.remote_instance_weight_loader_utils import RemoteInstanceError
from sglang.srt.remote_instance.manifest import TensorSpec, weight_tensors
from sglang.srt.remote_instance.mooncake_guard import (
    GuardedEngine,
    MooncakeError,
    ReadEntry,
    ReadPlan,
    auto_nic_protocol,
    forced_protocol,
    mooncake_module,
    rank_engine,
    rdma_devices,
    supports_intra_nvlink,
)
from sglang.srt.remote_instance.transfer_engine_memory import host_identity, merged_regions, pretouch

logger = logging.getLogger(__name__)

INFO_PATH = "/remote_instance_transfer_engine_info"
UPSTREAM_SEED = (
    "the seed publishes only [ptr, numel, element_size] per tensor (an upstream SGLang seed?): dtypes, shapes, "
    "checksums and which instance published the info cannot be verified, only names and sizes"
)
SEED_FLAG = "--remote-instance-weight-loader-start-seed-via-transfer-engine"


# Windows stay far below Mooncake's ~1000-request queue limit, beyond which a TCP peer pair wedges. NIC transports
# are polled with sleeps (their IO threads need the CPU); NVLink copies go as large blocking batches: one request
# per tensor with polling ran at 26 GB/s against 390 GB/s for a batch on 2xH200.
READ_PLANS = {
    "tcp": ReadPlan(16),
    "rdma": ReadPlan(64),
    "nvlink_intra": ReadPlan(256, batched=True, touch_first=True),
}


@dataclass(frozen=True)
class Endpoint:
    """One way to reach a seed rank: Mooncake protocol (None = not published) and session id."""

    protocol: str | None
    session_id: str
    host_id: str | None = None
    gpu_uuid: str | None = None


@dataclass(frozen=True)
class SeedRankInfo:
    """What a seed rank published: endpoints, {name: [ptr, numel, element_size]} (upstream's), and ours if it is
    one of ours: {name: {dtype, shape, checksum}} and the HTTP port of the instance that published it."""

    endpoints: list[Endpoint]
    weights: dict[str, list[Any]]
    meta: dict[str, Any] | None = None
    http_port: int | None = None


@register_remote_backend("transfer_engine")
class TransferEngineBackend(RemoteWeightBackend):
    """Reads each parameter straight from the seed's registered memory; the seed's scheduler never takes part."""

    def __init__(self) -> None:
        self.info: SeedRankInfo | None = None
        self.reshard: Any = None  # a ReshardFork when the seed runs another --tp-size

    def preflight(self, ctx: ForkContext) -> None:
        """Mooncake must import here before the seed is asked for anything."""
        try:
            mooncake_module()
            forced_protocol()
        except MooncakeError as e:
            raise RemoteInstanceError(ctx.seed.name, "preflight", str(e)) from None

    def fetch_manifest(self, ctx: ForkContext) -> RemoteManifest:
        """GET this rank's info from the seed and turn it into specs and checksums."""
        try:
            payload = ctx.seed.request(
                "manifest", "GET", INFO_PATH, params={"rank": ctx.tp_rank}, timeout=min(ctx.remaining(), 30.0)
            )
        except RemoteInstanceError as e:
            seed_tp = seed_tp_size(ctx)  # this rank may not exist on a seed with fewer ranks
            if seed_tp is not None and seed_tp != ctx.tp_size:
                return self._reshard(ctx, seed_tp)
            detail = str(e).removeprefix(f"R-Fork from seed {e.seed} failed at step '{e.step}': ")
            raise RemoteInstanceError(ctx.seed.name, "manifest", f"{detail}. {_diagnose(ctx)}".strip()) from None
        layout = payload.get("shard_layout") if isinstance(payload, dict) else None
        if isinstance(layout, dict) and isinstance(layout.get("tp_size"), int) and layout["tp_size"] != ctx.tp_size:
            return self._reshard(ctx, layout["tp_size"])
        self.info = parse_info(ctx.seed.name, payload)
        if self.info.http_port is not None and self.info.http_port != ctx.seed.port:
            raise RemoteInstanceError(
                ctx.seed.name,
                "manifest",
                f"the TransferEngine info came from the instance on HTTP port {self.info.http_port}, not the seed "
                "asked; give each instance on the seed host its own --engine-info-bootstrap-port",
            )
        if self.info.meta is None:
            # An upstream seed: only [ptr, numel, element_size] per tensor, checked in transfer() as upstream does.
            return RemoteManifest(None, None, UPSTREAM_SEED)
        specs: list[TensorSpec] = []
        checksums: dict[str, str] = {}
        for name, entry in self.info.weights.items():
            meta = self.info.meta.get(name)
            if not isinstance(meta, dict) or not {"dtype", "shape", "checksum"} <= meta.keys():
                raise RemoteInstanceError(ctx.seed.name, "manifest", f"malformed weights_meta for {name}")
            numel, esize = int(entry[1]), int(entry[2])
            specs.append(TensorSpec(name, str(meta["dtype"]), tuple(int(x) for x in meta["shape"]), numel * esize))
            checksums[name] = str(meta["checksum"])
        unverified = None if self.info.http_port is not None else "the seed does not say which instance it is"
        return RemoteManifest(specs, checksums, unverified)

    def _reshard(self, ctx: ForkContext, seed_tp: int) -> RemoteManifest:
        """The seed runs another --tp-size: read from all its ranks (transfer_engine_reshard_io)."""
        from sglang.srt.model_loader.transfer_engine_reshard_io import ReshardFork

        logger.info(
            "TP%d: the seed runs --tp-size %d, this client %d: forking across layouts",
            ctx.tp_rank,
            seed_tp,
            ctx.tp_size,
        )
        self.reshard = ReshardFork.fetch(ctx, seed_tp)
        return self.reshard.manifest()

    def transfer(self, model: nn.Module, ctx: ForkContext) -> int:
        """Read every non-empty parameter of this rank from the seed rank; returns bytes moved."""
        if self.reshard is not None:
            if ctx.load_config.peer_assist:
                # Peers hold this client's layout only once they have forked; across layouts every byte is the seed's.
                logger.warning("TP%d: peer assist does not apply across TP sizes; reading from the seed", ctx.tp_rank)
            return self.reshard.transfer(model, ctx)
        if self.info is None:
            raise RemoteInstanceError(ctx.seed.name, "transfer", "fetch_manifest must run before transfer")
        try:
            endpoint = choose_endpoint(self.info.endpoints, ctx.device)
        except MooncakeError as e:
            raise RemoteInstanceError(ctx.seed.name, "transfer", str(e)) from None
        tensors = weight_tensors(model)
        entries = []
        for name, t in tensors:
            if t.numel() == 0:
                continue  # zero-length slices abort Mooncake batches
            if not t.is_contiguous():
                raise RemoteInstanceError(ctx.seed.name, "transfer", f"local parameter {name} is not contiguous")
            entry = self.info.weights.get(name)
            if entry is None or (int(entry[1]), int(entry[2])) != (t.numel(), t.element_size()):
                # Only reachable with an upstream seed: ours were compared with the manifest already.
                raise RemoteInstanceError(
                    ctx.seed.name,
                    "transfer",
                    f"the seed has no tensor {name} of {t.numel()} elements of {t.element_size()} bytes "
                    f"(it publishes {entry}); start the client with the seed's model, --dtype and --tp-size",
                )
            entries.append(ReadEntry(name, t.data_ptr(), int(entry[0]), t.numel() * t.element_size()))
        if ctx.load_config.peer_assist:
            if self.info.meta is not None:
                from sglang.srt.model_loader.peer_assist import transfer_with_peers

                return transfer_with_peers(self.info, endpoint, model, ctx)
            logger.warning(
                "TP%d: peer assist needs a seed that publishes checksums; reading from the seed alone", ctx.tp_rank
            )
        pretouch((t for _, t in tensors), ctx.device)
        protocol = endpoint.protocol or auto_nic_protocol()
        ctx.details["transport"] = protocol
        gpu = ctx.device.index if ctx.device.type == "cuda" else None
        start = time.perf_counter()
        try:
            engine = rank_engine(ctx.seed.ip, protocol, gpu, lambda: merged_regions(tensors, ctx.device))
        except MooncakeError as e:
            raise RemoteInstanceError(ctx.seed.name, "transfer", str(e)) from None
        logger.info(
            "TP%d: reading %d tensors from seed rank %s over Mooncake %s",
            ctx.tp_rank,
            len(entries),
            endpoint.session_id,
            protocol,
        )
        try:
            plan = READ_PLANS[protocol]
            if plan.touch_first:
                _open_peer_memory(engine, endpoint.session_id, entries, ctx, plan)
            ctx.timings["engine setup"] = time.perf_counter() - start
            start = time.perf_counter()
            moved = engine.read(endpoint.session_id, entries, ctx.deadline, plan, owner=model, cuda_device=gpu)
            ctx.timings["transfer"] = time.perf_counter() - start
            return moved
        except MooncakeError as e:
            raise RemoteInstanceError(ctx.seed.name, "transfer", f"Mooncake {protocol}: {e}") from None
        finally:
            engine.close()


def _open_peer_memory(
    engine: GuardedEngine, session_id: str, entries: list[ReadEntry], ctx: ForkContext, plan: ReadPlan
) -> None:
    """Read a few bytes of every tensor first. Mooncake maps each of the seed's CUDA allocations into this process on
    first touch (~30 ms for an 8B model's ~130 allocations on H200), which is setup, not data movement."""
    probe = 256
    scratch = torch.empty(len(entries) * probe, dtype=torch.uint8, device=ctx.device)
    base = scratch.data_ptr()
    touches = [ReadEntry(e.name, base + i * probe, e.remote_addr, min(probe, e.length)) for i, e in enumerate(entries)]
    engine.read(session_id, touches, ctx.deadline, plan, owner=scratch, cuda_device=ctx.device.index)


def parse_info(seed: str, payload: Any) -> SeedRankInfo:
    """Validate the seed's answer; RemoteInstanceError says what is malformed."""
    info = payload.get("remote_instance_transfer_engine_info") if isinstance(payload, dict) else None
    if not (isinstance(info, list) and len(info) >= 2 and isinstance(info[0], str) and isinstance(info[1], dict)):
        raise RemoteInstanceError(
            seed,
            "manifest",
            "malformed transfer engine info: expected 'remote_instance_transfer_engine_info' = "
            "[session_id, {name: [ptr, numel, element_size, ...]}]",
        )
    for name, entry in info[1].items():
        if not (isinstance(entry, list) and len(entry) >= 3 and all(isinstance(x, int) for x in entry[:3])):
            raise RemoteInstanceError(seed, "manifest", f"malformed weight info for {name}: {str(entry)[:100]}")
    endpoints = [
        Endpoint(e.get("protocol"), e["session_id"], e.get("host_id"), e.get("gpu_uuid"))
        for e in payload.get("transfer_engine_endpoints") or []
        if isinstance(e, dict) and isinstance(e.get("session_id"), str)
    ]
    meta = payload.get("weights_meta")
    instance = payload.get("instance")
    http_port = instance.get("http_port") if isinstance(instance, dict) else None
    return SeedRankInfo(
        endpoints or [Endpoint(None, info[0])],
        info[1],
        meta if isinstance(meta, dict) else None,
        http_port if isinstance(http_port, int) else None,
    )


def choose_endpoint(endpoints: list[Endpoint], device: torch.device) -> Endpoint:
    """MOONCAKE_PROTOCOL's choice if set; else NVLink when it can reach the seed's GPU, else the NIC endpoint."""
    offered = ", ".join(str(e.protocol or "unspecified") for e in endpoints)
    forced = forced_protocol()
    if forced:
        match = next((e for e in endpoints if e.protocol in (forced, None)), None)
        if match is None:
            raise MooncakeError(
                f"MOONCAKE_PROTOCOL={forced} but the seed serves {offered}; unset it or restart the seed with it"
            )
        chosen = Endpoint(forced, match.session_id, match.host_id, match.gpu_uuid)
    else:
        nvlink = next((e for e in endpoints if e.protocol == "nvlink_intra" and nvlink_reaches(e, device)), None)
        nic = next((e for e in endpoints if e.protocol != "nvlink_intra"), None)
        chosen = nvlink or nic
        if chosen is None:
            raise MooncakeError(
                "the seed serves only nvlink_intra and this client is not on its host and GPU fabric; start the "
                "seed without MOONCAKE_PROTOCOL=nvlink_intra"
            )
    if (chosen.protocol or auto_nic_protocol()) == "rdma" and not rdma_devices():
        raise MooncakeError(
            "the seed serves RDMA but this host has no RDMA device; start the seed with "
            "MOONCAKE_PROTOCOL=tcp (or give this host a NIC)"
        )
    return chosen


def nvlink_reaches(endpoint: Endpoint, device: torch.device) -> bool:
    """Whether CUDA IPC from this process can read the seed GPU behind endpoint."""
    if device.type != "cuda" or not supports_intra_nvlink():
        return False
    mine = host_identity(device)
    if endpoint.host_id != mine["host_id"]:
        return False
    if endpoint.gpu_uuid is None:
        return True
    for index in range(torch.cuda.device_count()):
        if str(getattr(torch.cuda.get_device_properties(index), "uuid", "")) == endpoint.gpu_uuid:
            return index == device.index or torch.cuda.can_device_access_peer(device.index, index)
    logger.info("seed GPU %s is not visible to this process; not using nvlink_intra", endpoint.gpu_uuid)
    return False


def _diagnose(ctx: ForkContext) -> str:
    """Why the seed has no info for us, from its /get_server_info (empty when that cannot be learned)."""
    try:
        info = ctx.seed.request("diagnose", "GET", "/get_server_info", timeout=min(ctx.remaining(), 5.0))
    except RemoteInstanceError:
        return ""
    if not isinstance(info, dict):
        return ""
    if info.get("remote_instance_weight_loader_start_seed_via_transfer_engine") is False:
        return (
            f"The seed was not started with {SEED_FLAG}: restart it with that flag, "
            "or fork with --remote-instance-weight-loader-backend nccl."
        )
    if isinstance(info.get("tp_size"), int) and info["tp_size"] != ctx.tp_size:
        return f"The seed runs --tp-size {info['tp_size']}, this client {ctx.tp_size}: they must match."
    return (
        f"The seed's TP{ctx.tp_rank} has not published its weights; look for 'NOT a TransferEngine seed' "
        "in the seed's log."
    )
