"""KV cache memory: request rows of token slots, per-layer K/V buffers, and a slot allocator."""

from __future__ import annotations

import torch


class ReqToTokenPool:
    """Maps (request row, position) to a KV slot; one row per running request."""

    def __init__(self, size: int, max_context_len: int, device: torch.device) -> None:
        self.size = size
        self.req_to_token = torch.zeros((size, max_context_len), dtype=torch.int64, device=device)
        self.free_slots = list(range(size))

    def alloc(self) -> int | None:
        """One free row, or None when every row is in use."""
        return self.free_slots.pop() if self.free_slots else None

    def free(self, row: int) -> None:
        self.free_slots.append(row)

    def available_size(self) -> int:
        return len(self.free_slots)


class MHATokenToKVPool:
    """Per-layer K and V buffers of shape [num_slots + 1, kv_heads, head_dim]; slot 0 is never handed out."""

    def __init__(
        self, size: int, num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device
    ) -> None:
        self.size = size
        shape = (size + 1, num_kv_heads, head_dim)
        self.k_buffer = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v_buffer = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]

    def set_kv_buffer(self, layer_id: int, loc: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        self.k_buffer[layer_id][loc] = k.to(self.k_buffer[layer_id].dtype)
        self.v_buffer[layer_id][loc] = v.to(self.v_buffer[layer_id].dtype)

    def get_key_buffer(self, layer_id: int) -> torch.Tensor:
        return self.k_buffer[layer_id]

    def get_value_buffer(self, layer_id: int) -> torch.Tensor:
        return self.v_buffer[layer_id]

    @staticmethod
    def bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        """Bytes of K plus V for one token over all layers."""
        return 2 * num_layers * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()
