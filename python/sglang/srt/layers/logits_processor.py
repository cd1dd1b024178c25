"""From final hidden states to float32 logits over the real (unpadded) vocabulary."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from sglang.srt.distributed import tensor_model_parallel_all_gather

if TYPE_CHECKING:
    from sglang.srt.layers.vocab_parallel_embedding import VocabParallelEmbedding
    from sglang.srt.model_executor.forward_batch_info import ForwardBatch


@dataclass
class LogitsProcessorOutput:
    """Logits of each sequence's last token, and of every token when the batch asked for them."""

    next_token_logits: torch.Tensor  # [bs, vocab] float32
    full_logits: torch.Tensor | None = None  # [num_tokens, vocab] float32


class LogitsProcessor(nn.Module):
    """Applies the (vocab-sharded) LM head, gathers the shards and trims vocabulary padding."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.vocab_size = config.vocab_size

    def _logits(self, hidden_states: torch.Tensor, lm_head: VocabParallelEmbedding) -> torch.Tensor:
        logits = torch.matmul(hidden_states, lm_head.weight.t())
        logits = tensor_model_parallel_all_gather(logits, dim=-1)
        return logits[:, : self.vocab_size].float()

    def forward(
        self, hidden_states: torch.Tensor, lm_head: VocabParallelEmbedding, forward_batch: ForwardBatch
    ) -> LogitsProcessorOutput:
        """hidden_states [num_tokens, hidden] in the batch's flattened layout -> logits."""
        if forward_batch.forward_mode.is_decode() and not forward_batch.return_full_logits:
            # One token per sequence already: no index kernels in every decode step.
            return LogitsProcessorOutput(next_token_logits=self._logits(hidden_states, lm_head))
        last = forward_batch.last_token_indices()
        if forward_batch.return_full_logits:
            full = self._logits(hidden_states, lm_head)
            return LogitsProcessorOutput(next_token_logits=full[last], full_logits=full)
        return LogitsProcessorOutput(next_token_logits=self._logits(hidden_states[last], lm_head))
