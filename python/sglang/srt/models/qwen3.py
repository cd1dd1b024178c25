"""Qwen3 (dense): Llama with a per-head RMSNorm on queries and keys before RoPE."""

from __future__ import annotations

import torch

from sglang.srt.configs.hf_files import HFConfig
from sglang.srt.layers.layernorm import RMSNorm
from sglang.srt.models.llama import LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM


class Qwen3Attention(LlamaAttention):
    """Llama attention plus q_norm / k_norm over each head's channels."""

    def add_qk_norms(self, config: HFConfig) -> None:
        """q_norm and k_norm, registered before qkv_proj as upstream SGLang's Qwen3 does."""
        self.q_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps)

    def normalize_qk(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """RMS-normalise every head of q and k separately."""
        # [T, heads, head_dim] views of the fused qkv output: no copy, and FlashInfer's per-head kernel takes them.
        q = self.q_norm(q.view(q.shape[0], -1, self.head_dim)).view(q.shape)
        k = self.k_norm(k.view(k.shape[0], -1, self.head_dim)).view(k.shape)
        return q, k


class Qwen3DecoderLayer(LlamaDecoderLayer):
    """Llama decoder layer using Qwen3Attention."""

    attention_cls = Qwen3Attention


class Qwen3ForCausalLM(LlamaForCausalLM):
    """Qwen3 dense causal LM."""

    layer_cls = Qwen3DecoderLayer
