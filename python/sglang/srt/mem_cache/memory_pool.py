"""KV cache memory: request rows of token slots and the per-layer K/V buffers."""

from __future__ import annotations

import torch


class ReqToTokenPool:
    """Maps (request row, position) to a KV slot; one row per running request.

    Row `scratch_row` (the last one) is never handed out: pad rows of a CUDA-graph batch write into it.
    """

    def __init__(self, size: int, max_context_len: int, device: torch.device) -> None:
        self.size = size
        self.scratch_row = size
        self.req_to_token = torch.zeros((size + 1, max_context_len), dtype=torch.int64, device=device)
        # Each row's newest KV slot, on the host: with pages, a request's next token goes right after it while its
        # page has room, and reading it back from req_to_token would wait for the device.
        self.newest_slot = [0] * (size + 1)
        self.free_slots = list(range(size))

    def alloc(self) -> int | None:
        """One free row, or None when every row is in use."""
        return self.free_slots.pop() if self.free_slots else None

    def free(self, row: int) -> None:
        self.free_slots.append(row)

    def available_size(self) -> int:
        return len(self.free_slots)


class MHATokenToKVPool:
    """Per-layer KV buffers of shape [num_slots + 1, 2, kv_heads, head_dim]; slot 0 is never handed out.

    A slot's key and value sit side by side, so a layer whose new keys and values are adjacent in memory (the k|v
    half of a fused qkv projection) writes both with one scatter. Keys and values are read through strided views.
    """

    def __init__(
        self, size: int, num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device
    ) -> None:
        self.size = size
        self.kv_buffer = [
            torch.zeros((size + 1, 2, num_kv_heads, head_dim), dtype=dtype, device=device) for _ in range(num_layers)
        ]
        self.k_buffer = [buf[:, 0] for buf in self.kv_buffer]
        self.v_buffer = [buf[:, 1] for buf in self.kv_buffer]

    def set_kv_buffer(self, layer_id: int, loc: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write keys and values [tokens, kv_heads, head_dim] into slots `loc`."""
        buf = self.kv_buffer[layer_id]
        pair = _adjacent_pair(k, v)
        if pair is not None and pair.dtype == buf.dtype:
            buf[loc] = pair
            return
        buf[loc, 0] = k.to(buf.dtype)
        buf[loc, 1] = v.to(buf.dtype)

    def get_key_buffer(self, layer_id: int) -> torch.Tensor:
        return self.k_buffer[layer_id]

    def get_value_buffer(self, layer_id: int) -> torch.Tensor:
        return self.v_buffer[layer_id]

    @staticmethod
    def bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        """Bytes of K plus V for one token over all layers."""
        return 2 * num_layers * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


def _adjacent_pair(k: torch.Tensor, v: torch.Tensor) -> torch.Tensor | None:
    """k and v as one [tokens, 2, heads, dim] view when each token's values directly follow its keys in memory."""
    if k.dtype != v.dtype or k.shape != v.shape or k.dim() != 3 or k.stride() != v.stride():
        return None
    tokens, heads, dim = k.shape
    if k.stride(2) != 1 or k.stride(1) != dim:
        return None
    if v.untyped_storage().data_ptr() != k.untyped_storage().data_ptr():
        return None
    if v.storage_offset() - k.storage_offset() != heads * dim:
        return None
    return k.as_strided((tokens, 2, heads, dim), (k.stride(0), heads * dim, dim, 1))
