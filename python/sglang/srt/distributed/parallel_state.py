"""One TP group per process: a device group (nccl on CUDA, gloo on CPU) and a gloo CPU group."""

from __future__ import annotations

import datetime
import pickle
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass
class TPGroup:
    """The tensor-parallel group this process belongs to."""

    rank: int
    size: int
    device: torch.device
    device_group: Any = None
    cpu_group: Any = None


_TP: TPGroup | None = None


def init_distributed(
    tp_rank: int, tp_size: int, init_method: str, device: torch.device, timeout_s: float = 600.0
) -> TPGroup:
    """Join the TP group; with tp_size 1 no torch.distributed group is created."""
    global _TP
    group = TPGroup(rank=tp_rank, size=tp_size, device=device)
    if tp_size > 1:
        backend = "nccl" if device.type == "cuda" else "gloo"
        timeout = datetime.timedelta(seconds=timeout_s)
        dist.init_process_group(
            backend=backend, init_method=init_method, rank=tp_rank, world_size=tp_size, timeout=timeout
        )
        group.device_group = dist.group.WORLD
        group.cpu_group = dist.new_group(backend="gloo", timeout=timeout) if backend != "gloo" else dist.group.WORLD
    _TP = group
    return group


def get_tp_group() -> TPGroup:
    """The TP group; a single-rank group if init_distributed was never called (e.g. in unit tests)."""
    global _TP
    if _TP is None:
        _TP = TPGroup(rank=0, size=1, device=torch.device("cpu"))
    return _TP


def get_tp_rank() -> int:
    """This process's TP rank."""
    return get_tp_group().rank


def get_tp_size() -> int:
    """Number of TP ranks."""
    return get_tp_group().size


def tensor_model_parallel_all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum x over the TP group (in place) and return it."""
    group = get_tp_group()
    if group.size == 1:
        return x
    dist.all_reduce(x, group=group.device_group)
    return x


def tensor_model_parallel_all_gather(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Concatenate x from every TP rank along dim."""
    group = get_tp_group()
    if group.size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(group.size)]
    dist.all_gather(parts, x.contiguous(), group=group.device_group)
    return torch.cat(parts, dim=dim)


def broadcast_pyobj(obj: Any, src: int = 0) -> Any:
    """Send a picklable object from rank src to every TP rank over the CPU group."""
    group = get_tp_group()
    if group.size == 1:
        return obj
    if group.rank == src:
        payload = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)
        size = torch.tensor([payload.numel()], dtype=torch.long)
        dist.broadcast(size, src=src, group=group.cpu_group)
        if payload.numel():
            dist.broadcast(payload, src=src, group=group.cpu_group)
        return obj
    size = torch.empty(1, dtype=torch.long)
    dist.broadcast(size, src=src, group=group.cpu_group)
    payload = torch.empty(int(size.item()), dtype=torch.uint8)
    dist.broadcast(payload, src=src, group=group.cpu_group)
    return pickle.loads(payload.numpy().tobytes())


def gather_pyobj(obj: Any, dst: int = 0) -> list[Any] | None:
    """Collect one picklable object from each TP rank on rank dst (None elsewhere)."""
    group = get_tp_group()
    if group.size == 1:
        return [obj]
    out: list[Any] | None = [None] * group.size if group.rank == dst else None
    dist.gather_object(obj, out, dst=dst, group=group.cpu_group)
    return out


def all_gather_pyobj(obj: Any) -> list[Any]:
    """One picklable object from every TP rank, on every rank, in rank order."""
    group = get_tp_group()
    if group.size == 1:
        return [obj]
    out: list[Any] = [None] * group.size
    dist.all_gather_object(out, obj, group=group.cpu_group)
    return out


def destroy_distributed() -> None:
    """Tear down the TP group (best effort)."""
    global _TP
    if dist.is_initialized():
        dist.destroy_process_group()
    _TP = None
