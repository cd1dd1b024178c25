"""The weight manifest (what a rank holds) and per-tensor checksums, shared by both R-Fork backends."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

_MOD = 65521  # position weights cycle through 1.._MOD so swapped words change the sum
# Words per checksum chunk (a multiple of _MOD): bounds the int64 temporaries to a few hundred MB.
_CHUNK_WORDS = _MOD * 512
_MASK = (1 << 64) - 1


@dataclass(frozen=True)
class TensorSpec:
    """One parameter as both sides must see it: name, dtype, shape, byte size."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["shape"] = list(self.shape)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> TensorSpec:
        return cls(str(d["name"]), str(d["dtype"]), tuple(int(x) for x in d["shape"]), int(d["nbytes"]))


def weight_tensors(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The tensors a fork moves, in transfer order: named_parameters() (tied weights once)."""
    return [(name, p.data) for name, p in model.named_parameters()]


def build_manifest(model: nn.Module) -> list[TensorSpec]:
    """Specs of every transferred tensor of this rank, in transfer order."""
    return [
        TensorSpec(name, str(t.dtype).removeprefix("torch."), tuple(t.shape), t.numel() * t.element_size())
        for name, t in weight_tensors(model)
    ]


def diff_manifests(local: list[TensorSpec], remote: list[TensorSpec], limit: int = 5) -> list[str]:
    """Human-readable differences (at most limit), empty when the two ranks can exchange bytes."""
    diffs: list[str] = []
    local_by_name = {s.name: s for s in local}
    remote_by_name = {s.name: s for s in remote}
    missing = [n for n in local_by_name if n not in remote_by_name]
    extra = [n for n in remote_by_name if n not in local_by_name]
    if missing:
        diffs.append(f"{len(missing)} parameter(s) missing on the seed, e.g. {missing[:3]}")
    if extra:
        diffs.append(f"{len(extra)} parameter(s) only on the seed, e.g. {extra[:3]}")
    for name, mine in local_by_name.items():
        theirs = remote_by_name.get(name)
        if theirs is None or theirs == mine:
            continue
        if theirs.dtype != mine.dtype:
            diffs.append(f"{name}: dtype {theirs.dtype} on the seed, {mine.dtype} here")
        elif theirs.shape != mine.shape:
            diffs.append(f"{name}: shape {list(theirs.shape)} on the seed, {list(mine.shape)} here")
        if len(diffs) >= limit:
            break
    if not diffs and [s.name for s in local] != [s.name for s in remote]:
        diffs.append("same parameters but in a different order")
    return diffs[:limit]


def tensor_checksum(t: torch.Tensor) -> str:
    """64-bit position-weighted sum of the tensor's bytes taken as 64-bit words, computed where the tensor lives.

    Integer addition wraps modulo 2**64 and is associative, so the value does not depend on the
    device or the reduction order: a CPU seed and a CUDA client agree on equal bytes.
    """
    return tensor_checksums([t])[0]


@torch.inference_mode()
def tensor_checksums(tensors: list[torch.Tensor]) -> list[str]:
    """tensor_checksum of each tensor, with one copy to the host per device for all of them.

    A fork verifies ~200 tensors (tens of thousands for a MoE model); a host sync per tensor cost more than the
    arithmetic on the GPU.
    """
    sums: list[torch.Tensor] = []
    tails: list[torch.Tensor | None] = []
    sizes: list[int] = []
    for t in tensors:
        raw = t.detach().contiguous().reshape(-1).view(torch.uint8)
        body = raw.numel() - raw.numel() % 8
        sums.append(_word_sums(raw[:body].view(torch.int64)))
        tails.append(raw[body:] if body < raw.numel() else None)  # the last < 8 bytes, if any
        sizes.append(raw.numel())
    host = host_values(sums)
    out = []
    for (weighted, plain), tail_bytes, size in zip(host, tails, sizes):
        tail = 0 if tail_bytes is None else int.from_bytes(bytes(tail_bytes.cpu().tolist()), "little")
        out.append(f"{(weighted * 1_000_003 + plain + tail * 7 + size) & _MASK:016x}")
    return out


def _word_sums(words: torch.Tensor) -> torch.Tensor:
    """[position-weighted sum, plain sum] of int64 words, on their device, without a host sync."""
    weighted = torch.zeros((), dtype=torch.int64, device=words.device)
    plain = torch.zeros((), dtype=torch.int64, device=words.device)
    # Word i is weighted by (i % _MOD) + 1: viewing each chunk as rows of _MOD words makes that one
    # broadcast multiply (chunks start at multiples of _MOD).
    pattern = torch.arange(1, _MOD + 1, device=words.device, dtype=torch.int64)
    for start in range(0, words.numel(), _CHUNK_WORDS):
        chunk = words[start : start + _CHUNK_WORDS]
        rows = chunk.numel() // _MOD * _MOD
        weighted += (chunk[:rows].view(-1, _MOD) * pattern).sum()
        weighted += (chunk[rows:] * pattern[: chunk.numel() - rows]).sum()
        plain += chunk.sum()
    return torch.stack([weighted, plain])


def host_values(vectors: list[torch.Tensor]) -> list[list[int]]:
    """Equal-length integer vectors as Python lists, in order, with one device-to-host copy per device."""
    by_device: dict[torch.device, list[int]] = {}
    for i, v in enumerate(vectors):
        by_device.setdefault(v.device, []).append(i)
    out: list[list[int]] = [[] for _ in vectors]
    for indices in by_device.values():
        for i, values in zip(indices, torch.stack([vectors[i] for i in indices]).cpu().tolist()):
            out[i] = values
    return out


def model_checksums(model: nn.Module) -> dict[str, str]:
    """Checksum of every transferred tensor, keyed by name."""
    named = list(weight_tensors(model))
    return dict(zip((name for name, _ in named), tensor_checksums([t for _, t in named])))


def verify_checksums(model: nn.Module, expected: dict[str, str]) -> list[str]:
    """Names whose bytes here differ from the seed's (empty means every tensor matched)."""
    got = model_checksums(model)
    return [name for name, value in got.items() if expected.get(name) != value]
