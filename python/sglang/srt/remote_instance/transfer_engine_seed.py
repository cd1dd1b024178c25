"""TransferEngine seed: register this rank's weights with Mooncake and publish where each tensor lives."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import requests
import torch

from sglang.srt.managers.rpc_registry import register_rpc
from sglang.srt.remote_instance.addresses import local_ip_towards
from sglang.srt.remote_instance.manifest import weight_tensors
from sglang.srt.remote_instance.manifest_seed import cached_checksums
from sglang.srt.remote_instance.mooncake_guard import (
    GuardedEngine,
    MooncakeError,
    auto_nic_protocol,
    forced_protocol,
    memory_location,
    open_engine,
    rdma_devices,
    supports_intra_nvlink,
)
from sglang.srt.remote_instance.shard_layout import published_layout
from sglang.srt.remote_instance.transfer_engine_memory import host_identity, merged_regions, segment_regions

if TYPE_CHECKING:
    from sglang.srt.managers.scheduler import Scheduler
    from sglang.srt.model_executor.model_runner import ModelRunner
    from sglang.srt.server_args import ServerArgs

logger = logging.getLogger(__name__)

PUBLISH_TIMEOUT = 5.0
PUBLISH_ATTEMPTS = 3


@dataclass
class TransferEngineSeed:
    """One rank's published weights: the engines serving them and the info dict clients read."""

    tp_rank: int
    engines: list[GuardedEngine]
    weights_info_dict: dict[str, list[Any]]
    endpoints: list[dict[str, Any]]
    register_seconds: float
    regions: dict[str, int] = field(default_factory=dict)
    # Ours, beside upstream's three-value entries: {name: {"dtype", "shape", "checksum"}}.
    weights_meta: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Which instance published this (its HTTP port), so a client can tell it got the info of the seed it asked.
    http_port: int | None = None
    # Ours: this rank's TP facts and each tensor's shard layout and block checksums (shard_layout.published_layout),
    # so that a client with another --tp-size can fork too.
    shard_layout: dict[str, Any] | None = None

    @property
    def session_id(self) -> str:
        """The primary engine's session id (the one upstream clients use)."""
        return self.engines[0].session_id

    def payload(self) -> dict[str, Any]:
        """The PUT body for the bootstrap server (upstream keys plus our endpoint list)."""
        return {
            "rank": self.tp_rank,
            "tp_rank": self.tp_rank,
            "transfer_engine_info": {
                "session_id": self.session_id,
                "weights_info_dict": self.weights_info_dict,
                "transfer_engine_endpoints": self.endpoints,
                "weights_meta": self.weights_meta,
                "instance": {"http_port": self.http_port},
                "shard_layout": self.shard_layout,
            },
        }


def start_transfer_engine_seed(runner: ModelRunner) -> TransferEngineSeed | None:
    """Register and publish runner's weights; on failure log loudly and keep serving (returns None)."""
    args = runner.server_args
    try:
        checksums = cached_checksums(runner)
        seed = create_seed(runner.model, runner.device, runner.tp_rank, advertised_host(args), checksums)
        seed.http_port = args.port
    except Exception as e:  # publishing is optional: the instance must keep serving whatever went wrong
        logger.error("TP%d: NOT a TransferEngine seed (clients cannot fork from this instance): %s", runner.tp_rank, e)
        return None
    start = time.perf_counter()
    try:
        seed.shard_layout = published_layout(runner.model, runner.tp_rank, runner.tp_size)
        logger.info("TP%d: shard layout and block checksums took %.3f s", runner.tp_rank, time.perf_counter() - start)
    except Exception as e:  # only forks into another --tp-size need it
        logger.warning(
            "TP%d: no shard layout published (clients must use --tp-size %d): %s", runner.tp_rank, runner.tp_size, e
        )
    try:
        url = publish(seed, bootstrap_url(args), args.api_key)
    except RuntimeError as e:
        logger.error(
            "TP%d: TransferEngine info NOT published, clients cannot fork from this rank: %s", runner.tp_rank, e
        )
        return seed
    nbytes = sum(v[1] * v[2] for v in seed.weights_info_dict.values())
    logger.info(
        "TP%d: TransferEngine seed published to %s: %d tensors, %.1f MB in %s; registration took %.3f s",
        seed.tp_rank,
        url,
        len(seed.weights_info_dict),
        nbytes / 1e6,
        ", ".join(f"{n} {p} region(s)" for p, n in seed.regions.items()),
        seed.register_seconds,
    )
    return seed


def create_seed(
    model: torch.nn.Module, device: torch.device, tp_rank: int, host: str, checksums: dict[str, str]
) -> TransferEngineSeed:
    """Start one engine per servable transport, register the weights with each and build the info dict."""
    tensors = weight_tensors(model)
    for name, t in tensors:
        if not t.is_contiguous():
            raise RuntimeError(f"parameter {name} is not contiguous; its bytes cannot be read as one range")
    register_seconds = 0.0
    engines: list[GuardedEngine] = []
    endpoints: list[dict[str, Any]] = []
    regions: dict[str, int] = {}
    gpu = device.index if device.type == "cuda" else None
    location = memory_location(gpu)
    try:
        for protocol in seed_protocols(device):
            engine = open_engine(host, protocol, gpu)
            engines.append(engine)
            spans = segment_regions(tensors, device) if protocol == "nvlink_intra" else merged_regions(tensors, device)
            start = time.perf_counter()
            engine.register(spans, location)
            register_seconds += time.perf_counter() - start
            regions[protocol] = len(spans)
            endpoints.append({"protocol": protocol, "session_id": engine.session_id, **host_identity(device)})
            ports = ", ".join(f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}" for ip, port in engine.listening)
            logger.warning(
                "TP%d: Mooncake TransferEngine (%s) opened ports %s (rpc %d) on all interfaces; anyone who can reach "
                "them can read this instance's weights: firewall them or keep the seed on a private network",
                tp_rank,
                protocol,
                ports or "?",
                engine.rpc_port,
            )
    except MooncakeError:
        for engine in engines:
            engine.close()
        raise
    # Exactly three values per entry: upstream's clients (and tools written for them) unpack three.
    info = {name: [t.data_ptr(), t.numel(), t.element_size()] for name, t in tensors}
    meta = {
        name: {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape), "checksum": checksums[name]}
        for name, t in tensors
    }
    return TransferEngineSeed(tp_rank, engines, info, endpoints, register_seconds, regions, meta)


def seed_protocols(device: torch.device) -> list[str]:
    """Transports this rank serves: MOONCAKE_PROTOCOL if set, else the NIC one plus NVLink for CUDA weights."""
    forced = forced_protocol()
    if forced == "rdma" and not rdma_devices():
        raise MooncakeError("MOONCAKE_PROTOCOL=rdma but this host has no RDMA device; unset it or use tcp")
    if forced == "nvlink_intra" and (device.type != "cuda" or not supports_intra_nvlink()):
        raise MooncakeError(
            "MOONCAKE_PROTOCOL=nvlink_intra needs CUDA weights and a Mooncake build with intra-node NVLink "
            "(mooncake-transfer-engine-cuda13); unset it or use tcp/rdma"
        )
    if forced:
        return [forced]
    protocols = [auto_nic_protocol()]
    if device.type == "cuda" and supports_intra_nvlink():
        protocols.append("nvlink_intra")
    return protocols


def advertised_host(args: ServerArgs) -> str:
    """The address clients reach this rank's TransferEngine at."""
    host = args.host
    if host in ("localhost", "::1") or host.startswith("127."):
        return "127.0.0.1"
    if host not in ("0.0.0.0", "::", ""):
        return host
    # Bound to every interface: use the one that routes to the head node (or outward); no packet is sent.
    return local_ip_towards(_dist_init_host(args) or "192.0.2.1")


def bootstrap_url(args: ServerArgs) -> str:
    """Where the bootstrap server of this instance listens (node 0)."""
    host = _dist_init_host(args)
    if host is None:
        host = args.host if args.host not in ("0.0.0.0", "::", "") else "127.0.0.1"
    host = f"[{host}]" if ":" in host else host
    return f"http://{host}:{args.engine_info_bootstrap_port}"


def _dist_init_host(args: ServerArgs) -> str | None:
    if not args.dist_init_addr:
        return None
    return args.dist_init_addr.rsplit(":", 1)[0].strip("[]")


def publish(seed: TransferEngineSeed, url: str, api_key: str | None) -> str:
    """PUT this rank's info to the bootstrap server; RuntimeError after PUBLISH_ATTEMPTS failures."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    target = f"{url}/register_transfer_engine_info"
    error = ""
    for attempt in range(PUBLISH_ATTEMPTS):
        try:
            resp = requests.put(target, json=seed.payload(), headers=headers, timeout=PUBLISH_TIMEOUT)
        except requests.RequestException as e:
            error = f"cannot reach the bootstrap server at {url} ({type(e).__name__})"
        else:
            if resp.status_code == 200:
                return url
            error = f"the bootstrap server at {url} answered HTTP {resp.status_code}: {resp.text[:200]}"
        time.sleep(0.5 * (attempt + 1))
    raise RuntimeError(f"{error}; is --engine-info-bootstrap-port the one this instance's node 0 serves?")


@register_rpc("transfer_engine_seed_info")
def seed_info(scheduler: Scheduler) -> dict[str, Any] | None:
    """This rank's TransferEngine seed state (None when it does not publish)."""
    seed = getattr(scheduler.runner, "transfer_engine_seed", None)
    if seed is None:
        return None
    return {
        "session_id": seed.session_id,
        "endpoints": seed.endpoints,
        "register_seconds": seed.register_seconds,
        "regions": seed.regions,
        "listening": [list(addr) for engine in seed.engines for addr in engine.listening],
    }
