"""Which memory a TransferEngine rank exposes (weights merged into regions) and where it lives (host, GPU).

Shared by the seed (what it registers and publishes) and the client (what it registers for RDMA, whether NVLink
reaches the seed)."""

from __future__ import annotations

import bisect
import socket
from collections.abc import Iterable

import torch

from sglang.srt.remote_instance.mooncake_guard import MooncakeError


def merged_regions(tensors: list[tuple[str, torch.Tensor]], device: torch.device) -> list[tuple[int, int]]:
    """Address-contiguous weights merged into few (addr, length) regions, never across CUDA allocations."""
    spans = sorted((t.data_ptr(), t.numel() * t.element_size()) for _, t in tensors if t.numel())
    segments = _cuda_segments(device) if device.type == "cuda" else []
    regions: list[list[int]] = []
    for addr, length in spans:
        if (
            regions
            and addr <= regions[-1][0] + regions[-1][1]
            and (not segments or _segment_of(segments, addr) == _segment_of(segments, regions[-1][0]))
        ):
            regions[-1][1] = max(regions[-1][1], addr + length - regions[-1][0])
        else:
            regions.append([addr, length])
    return [(a, n) for a, n in regions]


def segment_regions(tensors: list[tuple[str, torch.Tensor]], device: torch.device) -> list[tuple[int, int]]:
    """Whole cudaMalloc segments holding weights: NVLink IPC exports allocations, not sub-ranges."""
    segments = _cuda_segments(device)
    chosen: set[tuple[int, int]] = set()
    for name, t in tensors:
        if not t.numel():
            continue
        seg = _segment_of(segments, t.data_ptr())
        if seg is None:
            raise MooncakeError(
                f"{name} is not in a cudaMalloc segment of the caching allocator (expandable_segments or a custom "
                "allocator?), which NVLink IPC cannot export; unset PYTORCH_CUDA_ALLOC_CONF=expandable_segments"
            )
        chosen.add(seg)
    return sorted(chosen)


def _cuda_segments(device: torch.device) -> list[tuple[int, int]]:
    segments = [
        (int(s["address"]), int(s["total_size"]))
        for s in torch.cuda.memory_snapshot()
        if s.get("device") == device.index and not s.get("is_expandable", False)
    ]
    return sorted(segments)


def _segment_of(segments: list[tuple[int, int]], addr: int) -> tuple[int, int] | None:
    i = bisect.bisect_right(segments, (addr, float("inf"))) - 1
    if i >= 0 and segments[i][0] <= addr < segments[i][0] + segments[i][1]:
        return segments[i]
    return None


def host_identity(device: torch.device) -> dict[str, str]:
    """What a client compares to decide whether NVLink IPC can reach this rank: host (and GPU) identity."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = "unknown-boot"
    ident = {"host_id": f"{socket.gethostname()}/{boot}"}
    if device.type == "cuda":
        uuid = getattr(torch.cuda.get_device_properties(device), "uuid", None)
        if uuid is not None:
            ident["gpu_uuid"] = str(uuid)
    return ident


def pretouch(tensors: Iterable[torch.Tensor], device: torch.device) -> None:
    """Write every page of host-memory read destinations before Mooncake does: untouched pages would fault inside
    its single IO thread and cut throughput by ~4x. Nothing to do on a GPU."""
    if device.type != "cpu":
        return
    with torch.no_grad():
        for t in tensors:
            t.zero_()
