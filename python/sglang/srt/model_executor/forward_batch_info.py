"""ForwardBatch: everything one forward pass of the model needs besides the weights."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from sglang.srt.layers.attention.base import AttentionBackend
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, ReqToTokenPool


class ForwardMode(enum.Enum):
    """EXTEND prefills new tokens (after an optional cached prefix); DECODE adds one token per sequence."""

    EXTEND = enum.auto()
    DECODE = enum.auto()

    def is_extend(self) -> bool:
        return self is ForwardMode.EXTEND

    def is_decode(self) -> bool:
        return self is ForwardMode.DECODE


@dataclass
class ForwardBatch:
    """Flattened token layout of a batch: sequence i contributes extend_seq_lens[i] tokens (1 in decode)."""

    forward_mode: ForwardMode
    batch_size: int
    input_ids: torch.Tensor  # [num_tokens]
    positions: torch.Tensor  # [num_tokens]
    req_pool_indices: torch.Tensor  # [bs] rows of req_to_token
    seq_lens: torch.Tensor  # [bs] total tokens per sequence after this pass
    out_cache_loc: torch.Tensor  # [num_tokens] KV slots that receive this pass's keys/values
    seq_lens_cpu: list[int]
    extend_prefix_lens_cpu: list[int] = field(default_factory=list)  # tokens already in the cache
    extend_seq_lens_cpu: list[int] = field(default_factory=list)  # tokens computed in this pass
    return_full_logits: bool = False  # also return logits of every token (for logprobs and tests)
    # Decode batches a CUDA graph will run stay on the host until the graph runner stages them: rows input_ids,
    # positions, req_pool_indices, seq_lens, out_cache_loc of one [5, bs] int64 tensor (the fields above are views
    # of it). The graph itself records out_cache_loc in req_to_token. None: the fields are on the model's device
    # and req_to_token already holds the new slots.
    host_inputs: torch.Tensor | None = None
    # Overlap scheduling: the decode inputs are token_source[req_pool_indices], gathered on the device from the
    # newest sampled token of each request row (input_ids is then a placeholder until that gather).
    token_source: torch.Tensor | None = None
    req_to_token_pool: ReqToTokenPool | None = None
    token_to_kv_pool: MHATokenToKVPool | None = None
    attn_backend: AttentionBackend | None = None

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    def last_token_indices(self) -> torch.Tensor:
        """Index (in the flattened layout) of each sequence's last token in this pass."""
        if self.forward_mode.is_decode():
            return torch.arange(self.batch_size, device=self.input_ids.device)
        # Staged without waiting for the device (a plain copy would wait for the steps in flight).
        lens = torch.tensor(self.extend_seq_lens_cpu).to(self.input_ids.device, non_blocking=True)
        return torch.cumsum(lens, 0) - 1
