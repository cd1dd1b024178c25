"""Qwen2: Llama with a bias on the q/k/v projections (and none on o_proj)."""

from __future__ import annotations

from sglang.srt.configs.hf_files import HFConfig
from sglang.srt.models.llama import LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM


class Qwen2Attention(LlamaAttention):
    """Llama attention with Qwen2's projection biases."""

    @staticmethod
    def projection_biases(config: HFConfig) -> tuple[bool, bool]:
        """Qwen2 always biases q/k/v and never o_proj, whatever attention_bias says."""
        return True, False


class Qwen2DecoderLayer(LlamaDecoderLayer):
    """Llama decoder layer using Qwen2Attention."""

    attention_cls = Qwen2Attention


class Qwen2ForCausalLM(LlamaForCausalLM):
    """Qwen2 causal LM."""

    layer_cls = Qwen2DecoderLayer
