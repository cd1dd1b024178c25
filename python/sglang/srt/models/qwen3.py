"""Qwen3 (dense): Llama with a per-head RMSNorm on queries and keys before RoPE."""

from __future__ import annotations

import torch
from transformers import PretrainedConfig

from sglang.srt.layers.layernorm import RMSNorm
from sglang.srt.layers.rotary_embedding import RotaryEmbedding
from sglang.srt.models.llama import LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM


class Qwen3Attention(LlamaAttention):
    """Llama attention plus q_norm / k_norm over each head's channels."""

    def __init__(self, config: PretrainedConfig, layer_id: int, rotary_emb: RotaryEmbedding) -> None:
        super().__init__(config, layer_id, rotary_emb)
        self.q_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps)

    def normalize_qk(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """RMS-normalise every head of q and k separately."""
        q = self.q_norm(q.reshape(-1, self.head_dim)).view(q.shape)
        k = self.k_norm(k.reshape(-1, self.head_dim)).view(k.shape)
        return q, k


class Qwen3DecoderLayer(LlamaDecoderLayer):
    """Llama decoder layer using Qwen3Attention."""

    attention_cls = Qwen3Attention


class Qwen3ForCausalLM(LlamaForCausalLM):
    """Qwen3 dense causal LM."""

    layer_cls = Qwen3DecoderLayer
