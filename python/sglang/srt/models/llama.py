"""Llama decoder-only model with tensor-parallel layers; the base that Qwen2 and Qwen3 specialise."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from sglang.srt.configs.hf_files import HFConfig
from sglang.srt.layers.activation import SiluAndMul
from sglang.srt.layers.layernorm import RMSNorm
from sglang.srt.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from sglang.srt.layers.logits_processor import LogitsProcessor, LogitsProcessorOutput
from sglang.srt.layers.radix_attention import RadixAttention
from sglang.srt.layers.rotary_embedding import RotaryEmbedding, rope_config
from sglang.srt.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from sglang.srt.model_executor.forward_batch_info import ForwardBatch
from sglang.srt.model_loader.weight_utils import WeightLoadingError, default_weight_loader


def head_dim_of(config: HFConfig) -> int:
    """Per-head size: explicit in the config (Qwen3) or hidden_size / num_attention_heads."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


class LlamaMLP(nn.Module):
    """down(silu(gate(x)) * up(x)) with gate and up fused into one column-parallel matmul."""

    def __init__(self, hidden_size: int, intermediate_size: int, hidden_act: str, bias: bool = False) -> None:
        super().__init__()
        if hidden_act != "silu":
            raise ValueError(f"hidden_act {hidden_act!r} is not supported; only 'silu' is implemented")
        self.gate_up_proj = MergedColumnParallelLinear(hidden_size, [intermediate_size] * 2, bias=bias)
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size, bias=bias)
        self.act_fn = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_up_proj(x)))


class LlamaAttention(nn.Module):
    """Self-attention over this rank's heads: fused qkv, RoPE, paged attention, row-parallel output."""

    def __init__(self, config: HFConfig, layer_id: int, rotary_emb: RotaryEmbedding) -> None:
        super().__init__()
        num_heads = config.num_attention_heads
        num_kv_heads = getattr(config, "num_key_value_heads", None) or num_heads
        self.head_dim = head_dim_of(config)
        # Before the projections: registration order is parameter order, which an NCCL fork sends by position.
        self.add_qk_norms(config)
        qkv_bias, o_bias = self.projection_biases(config)
        self.qkv_proj = QKVParallelLinear(config.hidden_size, self.head_dim, num_heads, num_kv_heads, bias=qkv_bias)
        self.o_proj = RowParallelLinear(num_heads * self.head_dim, config.hidden_size, bias=o_bias)
        self.q_size, self.kv_size = self.qkv_proj.q_size, self.qkv_proj.kv_size
        self.rotary_emb = rotary_emb
        self.attn = RadixAttention(
            self.qkv_proj.num_heads, self.head_dim, self.head_dim**-0.5, self.qkv_proj.num_kv_heads, layer_id
        )

    def add_qk_norms(self, config: HFConfig) -> None:
        """Hook for per-head q/k norm modules; Llama has none."""

    @staticmethod
    def projection_biases(config: HFConfig) -> tuple[bool, bool]:
        """Whether qkv_proj and o_proj carry a bias."""
        bias = bool(getattr(config, "attention_bias", False))
        return bias, bias

    def normalize_qk(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Hook applied to q and k before RoPE; Llama leaves them as they are."""
        return q, k

    def forward(
        self, positions: torch.Tensor, hidden_states: torch.Tensor, forward_batch: ForwardBatch
    ) -> torch.Tensor:
        q, k, v = self.qkv_proj(hidden_states).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q, k = self.rotary_emb(positions, *self.normalize_qk(q, k))
        # v stays a strided view of the qkv output: the KV-cache write reads it in place, no copy kernel.
        return self.o_proj(self.attn(q, k, v, forward_batch))


class LlamaDecoderLayer(nn.Module):
    """Pre-norm attention block then pre-norm MLP block, with the residual add fused into the norms."""

    attention_cls: type[LlamaAttention] = LlamaAttention

    def __init__(self, config: HFConfig, layer_id: int, rotary_emb: RotaryEmbedding) -> None:
        super().__init__()
        self.self_attn = self.attention_cls(config, layer_id, rotary_emb)
        self.mlp = self.make_mlp(config, layer_id)
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    @staticmethod
    def make_mlp(config: HFConfig, layer_id: int) -> nn.Module:
        """The feed-forward block of layer layer_id; a mixture-of-experts model overrides this."""
        return LlamaMLP(
            config.hidden_size,
            config.intermediate_size,
            config.hidden_act,
            bool(getattr(config, "mlp_bias", False)),
        )

    def forward(
        self,
        positions: torch.Tensor,
        hidden_states: torch.Tensor,
        forward_batch: ForwardBatch,
        residual: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (this block's output, the residual stream before it is added) like upstream."""
        if residual is None:
            residual = hidden_states
            hidden_states = self.input_layernorm(hidden_states)
        else:
            hidden_states, residual = self.input_layernorm(hidden_states, residual)
        hidden_states = self.self_attn(positions, hidden_states, forward_batch)
        hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
        return self.mlp(hidden_states), residual


class LlamaModel(nn.Module):
    """Embedding, decoder layers and final norm; one rotary table is shared by every layer."""

    def __init__(self, config: HFConfig, layer_cls: type[LlamaDecoderLayer]) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        head_dim = head_dim_of(config)
        rope_theta, rope_scaling = rope_config(config)
        rotary_emb = RotaryEmbedding(head_dim, head_dim, config.max_position_embeddings, rope_theta, rope_scaling)
        self.layers = nn.ModuleList(layer_cls(config, i, rotary_emb) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, forward_batch: ForwardBatch) -> torch.Tensor:
        hidden_states = self.embed_tokens(input_ids)
        residual = None
        for layer in self.layers:
            hidden_states, residual = layer(positions, hidden_states, forward_batch, residual)
        hidden_states, _ = self.norm(hidden_states, residual)
        return hidden_states


class LlamaForCausalLM(nn.Module):
    """Llama causal LM: parameter names follow upstream SGLang's runtime names."""

    layer_cls: type[LlamaDecoderLayer] = LlamaDecoderLayer
    # (fused parameter, checkpoint projection, shard id) for checkpoints that store projections separately.
    stacked_params_mapping: tuple[tuple[str, str, Any], ...] = (
        ("qkv_proj", "q_proj", "q"),
        ("qkv_proj", "k_proj", "k"),
        ("qkv_proj", "v_proj", "v"),
        ("gate_up_proj", "gate_proj", 0),
        ("gate_up_proj", "up_proj", 1),
    )

    def __init__(self, config: HFConfig) -> None:
        super().__init__()
        self.config = config
        self.model = LlamaModel(config, self.layer_cls)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        # Tied: the head is the embedding module itself, so named_parameters() lists the weight once.
        if self.tie_word_embeddings:
            self.lm_head = self.model.embed_tokens
        else:
            self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size)
        self.logits_processor = LogitsProcessor(config)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, forward_batch: ForwardBatch
    ) -> LogitsProcessorOutput:
        """Run the flattened batch and return its logits."""
        hidden_states = self.model(input_ids, positions, forward_batch)
        return self.logits_processor(hidden_states, self.lm_head, forward_batch)

    def checkpoint_destination(self, ckpt_name: str) -> tuple[str, Any]:
        """(runtime parameter, shard id) that checkpoint tensor ckpt_name loads into; shard id None: the whole one."""
        parts = ckpt_name.split(".")
        for fused, separate, shard_id in self.stacked_params_mapping:
            if separate in parts:
                parts[parts.index(separate)] = fused
                return ".".join(parts), shard_id
        return ckpt_name, None

    def required_shards(self, param_name: str) -> set[Any]:
        """Shard ids that must all be loaded into param_name; {None} for a parameter loaded whole."""
        kind = param_name.split(".")[-2]
        return {shard for fused, _, shard in self.stacked_params_mapping if fused == kind} or {None}

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy HF checkpoint tensors into the fused, TP-sharded parameters; every tensor and parameter must match."""
        params = dict(self.named_parameters())
        loaded: dict[str, set[Any]] = defaultdict(set)
        unexpected: list[str] = []
        for ckpt_name, tensor in weights:
            # Rotary tables are recomputed from the config; a tied head is the embedding already loaded.
            if "rotary_emb." in ckpt_name or (self.tie_word_embeddings and ckpt_name == "lm_head.weight"):
                continue
            name, shard_id = self.checkpoint_destination(ckpt_name)
            param = params.get(name)
            if param is None:
                unexpected.append(ckpt_name)
                continue
            loader = getattr(param, "weight_loader", default_weight_loader)
            try:
                if shard_id is None:
                    loader(param, tensor)
                else:
                    loader(param, tensor, shard_id)
            except (RuntimeError, ValueError) as e:
                raise WeightLoadingError(f"cannot load checkpoint tensor {ckpt_name!r} into {name!r}: {e}") from e
            loaded[name] |= self.required_shards(name) if shard_id is None else {shard_id}
        model_name = type(self).__name__
        if unexpected:
            raise WeightLoadingError(f"checkpoint tensors with no destination in {model_name}: {', '.join(unexpected)}")
        missing = [n for n in params if not self.required_shards(n) <= loaded[n]]
        if missing:
            raise WeightLoadingError(f"{model_name} parameters not found in the checkpoint: {', '.join(missing)}")

    def post_load_weights(self) -> None:
        """No-op: nothing here is derived from weights (the rotary table comes from the config)."""
