"""One sampling step's small host data (per-row knobs, row and token indices) moved to the device in two copies."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

# Columns of the per-row knobs tensor, in this order.
KNOB_COLUMNS = (
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "repetition_penalty",
    "frequency_penalty",
    "presence_penalty",
)
KNOB = {name: i for i, name in enumerate(KNOB_COLUMNS)}


@dataclass
class StepUpload:
    """Collects named float rows and int segments on the host; upload() sends each kind to the device in one
    non-blocking copy from pinned memory, instead of one small copy per row or per use."""

    floats: dict[str, list[list[float]]] = field(default_factory=dict)
    ints: dict[str, list[int]] = field(default_factory=dict)

    def add_floats(self, name: str, rows: list[list[float]]) -> None:
        """A [len(rows), width] float32 tensor called name; every row has the same width."""
        self.floats[name] = rows

    def add_ints(self, name: str, values: list[int]) -> None:
        """A 1-D int64 tensor called name."""
        self.ints[name] = values

    def upload(self, device: torch.device) -> dict[str, torch.Tensor]:
        """The named tensors on device (views into at most two transferred buffers)."""
        out: dict[str, torch.Tensor] = {}
        pin = device.type == "cuda"
        if self.floats:
            flat: list[float] = []
            spans = []
            for name, rows in self.floats.items():
                width = len(rows[0]) if rows else 0
                spans.append((name, len(flat), len(rows), width))
                for row in rows:
                    flat.extend(row)
            buf = _to_device(torch.tensor(flat, dtype=torch.float32, pin_memory=pin), device)
            for name, start, n, width in spans:
                out[name] = buf[start : start + n * width].view(n, width)
        if self.ints:
            flat_i: list[int] = []
            spans_i = []
            for name, values in self.ints.items():
                spans_i.append((name, len(flat_i), len(values)))
                flat_i.extend(values)
            buf_i = _to_device(torch.tensor(flat_i, dtype=torch.int64, pin_memory=pin), device)
            for name, start, n in spans_i:
                out[name] = buf_i[start : start + n]
        return out


def _to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    # Pinned memory makes the copy asynchronous; PyTorch's pinned-block cache does not hand the block out again
    # until the copy that reads it has completed, so a fresh host tensor per step is safe.
    return host.to(device, non_blocking=True) if device.type != "cpu" else host


def knob_row(params, vocab: int) -> list[float]:
    """The knobs of one request in KNOB_COLUMNS order; top_k is the number of tokens it keeps (vocab: all)."""
    top_k = params.top_k if 0 < params.top_k < vocab else vocab
    return [
        params.temperature,
        params.top_p,
        float(top_k),
        params.min_p,
        params.repetition_penalty,
        params.frequency_penalty,
        params.presence_penalty,
    ]
