"""The attention backend interface and its registry."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from sglang.srt.layers.radix_attention import RadixAttention
    from sglang.srt.model_executor.forward_batch_info import ForwardBatch
    from sglang.srt.model_executor.model_runner import ModelRunner


class AttentionBackend(ABC):
    """Stores a pass's keys/values in the KV pool and computes attention over each sequence's cache."""

    def init_forward_metadata(self, forward_batch: ForwardBatch) -> None:
        """Prepare per-batch metadata once, before the layers run."""
        return None

    @abstractmethod
    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: RadixAttention, forward_batch: ForwardBatch
    ) -> torch.Tensor:
        """q: [T, H*D], k/v: [T, KV*D] -> [T, H*D]."""


ATTENTION_BACKENDS: dict[str, Callable[[ModelRunner], AttentionBackend]] = {}


def register_attention_backend(name: str) -> Callable:
    """Class decorator adding a backend to the registry under name."""

    def wrap(cls: Callable[[ModelRunner], AttentionBackend]) -> Callable[[ModelRunner], AttentionBackend]:
        ATTENTION_BACKENDS[name] = cls
        return cls

    return wrap


def create_attention_backend(name: str, runner: ModelRunner) -> AttentionBackend:
    """Instantiate the named backend; import side effects fill the registry."""
    from sglang.srt.layers.attention import torch_native_backend  # noqa: F401

    if name == "flashinfer":
        from sglang.srt.layers.attention import flashinfer_backend  # noqa: F401
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"Unknown attention backend {name!r}; available: {', '.join(ATTENTION_BACKENDS)}.")
    return ATTENTION_BACKENDS[name](runner)
