"""KV slot allocation: which slots of the KV pool are free."""

from __future__ import annotations

import torch


class TokenToKVPoolAllocator:
    """Hands out KV slot indices 1..size; keeps them on the CPU so allocation never syncs the device."""

    def __init__(self, size: int, device: torch.device) -> None:
        self.size = size
        self.device = device
        self.free_slots = torch.arange(1, size + 1, dtype=torch.int64)

    def available_size(self) -> int:
        return int(self.free_slots.numel())

    def alloc(self, n: int) -> torch.Tensor | None:
        """n slots (CPU int64 tensor), or None if fewer are free."""
        if n > self.free_slots.numel():
            return None
        out, self.free_slots = self.free_slots[:n], self.free_slots[n:]
        return out

    def free(self, slots: torch.Tensor) -> None:
        if slots.numel():
            self.free_slots = torch.cat([self.free_slots, slots.to("cpu", torch.int64)])
