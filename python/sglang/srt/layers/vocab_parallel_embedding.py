"""Embedding and LM head split over TP ranks along a padded vocabulary."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sglang.srt.distributed import get_tp_rank, get_tp_size, tensor_model_parallel_all_reduce
from sglang.srt.model_loader.weight_utils import WeightLoadingError

# Upstream pads the vocabulary to a multiple of 64 so that shard shapes (and hence parameter manifests) agree.
DEFAULT_VOCAB_PADDING_SIZE = 64


def pad_vocab_size(vocab_size: int, tp_size: int, pad_to: int = DEFAULT_VOCAB_PADDING_SIZE) -> int:
    """Vocabulary size rounded up so it is a multiple of pad_to and splits evenly over tp_size ranks."""
    padded = -(-vocab_size // pad_to) * pad_to
    if padded % tp_size:
        step = pad_to * tp_size
        padded = -(-vocab_size // step) * step
    return padded


class VocabParallelEmbedding(nn.Module):
    """Each rank holds a contiguous block of padded_vocab / tp rows; lookups are summed over ranks."""

    def __init__(self, num_embeddings: int, embedding_dim: int) -> None:
        super().__init__()
        self.tp_rank, self.tp_size = get_tp_rank(), get_tp_size()
        self.org_vocab_size = num_embeddings
        self.num_embeddings_padded = pad_vocab_size(num_embeddings, self.tp_size)
        self.num_embeddings_per_partition = self.num_embeddings_padded // self.tp_size
        self.vocab_start_index = self.tp_rank * self.num_embeddings_per_partition
        self.vocab_end_index = self.vocab_start_index + self.num_embeddings_per_partition
        self.embedding_dim = embedding_dim
        self.weight = nn.Parameter(torch.empty(self.num_embeddings_per_partition, embedding_dim), requires_grad=False)
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: Any = None) -> None:
        """Copy this rank's rows of the [vocab, dim] checkpoint tensor and zero the padding rows."""
        if tuple(loaded_weight.shape) != (self.org_vocab_size, self.embedding_dim):
            raise WeightLoadingError(
                f"shape mismatch: checkpoint {tuple(loaded_weight.shape)} vs expected "
                f"{(self.org_vocab_size, self.embedding_dim)}"
            )
        rows = max(0, min(self.vocab_end_index, self.org_vocab_size) - self.vocab_start_index)
        param.data[:rows].copy_(loaded_weight[self.vocab_start_index : self.vocab_start_index + rows])
        param.data[rows:].zero_()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.embedding(input_ids, self.weight)
        outside = (input_ids < self.vocab_start_index) | (input_ids >= self.vocab_end_index)
        local_ids = torch.where(outside, 0, input_ids - self.vocab_start_index)
        out = F.embedding(local_ids, self.weight)
        out.masked_fill_(outside.unsqueeze(-1), 0)
        return tensor_model_parallel_all_reduce(out)


class ParallelLMHead(VocabParallelEmbedding):
    """Output projection sharded like the embedding; LogitsProcessor multiplies by its weight."""

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("ParallelLMHead is applied by LogitsProcessor, not called directly")
