"""Attention with torch's scaled_dot_product_attention, one sequence at a time; runs on CPU and CUDA."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from sglang.srt.layers.attention.base import AttentionBackend, register_attention_backend

if TYPE_CHECKING:
    from sglang.srt.layers.radix_attention import RadixAttention
    from sglang.srt.model_executor.forward_batch_info import ForwardBatch
    from sglang.srt.model_executor.model_runner import ModelRunner


@register_attention_backend("torch_native")
class TorchNativeAttnBackend(AttentionBackend):
    """Reference backend: gathers each sequence's cached K/V and calls SDPA."""

    def __init__(self, runner: ModelRunner) -> None:
        self.device = runner.device

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: RadixAttention, forward_batch: ForwardBatch
    ) -> torch.Tensor:
        pool = forward_batch.token_to_kv_pool
        num_tokens = q.shape[0]
        k = k.view(num_tokens, layer.tp_k_head_num, layer.head_dim)
        v = v.view(num_tokens, layer.tp_v_head_num, layer.head_dim)
        pool.set_kv_buffer(layer.layer_id, forward_batch.out_cache_loc, k, v)
        q = q.view(num_tokens, layer.tp_q_head_num, layer.head_dim)
        out = torch.empty_like(q)
        k_cache = pool.get_key_buffer(layer.layer_id)
        v_cache = pool.get_value_buffer(layer.layer_id)
        req_to_token = forward_batch.req_to_token_pool.req_to_token
        decode = forward_batch.forward_mode.is_decode()
        start = 0
        for i in range(forward_batch.batch_size):
            seq_len = forward_batch.seq_lens_cpu[i]
            n_new = 1 if decode else forward_batch.extend_seq_lens_cpu[i]
            slots = req_to_token[forward_batch.req_pool_indices[i], :seq_len]
            keys = k_cache[slots].transpose(0, 1)  # [KV, S, D]
            values = v_cache[slots].transpose(0, 1)
            query = q[start : start + n_new].transpose(0, 1)  # [H, n, D]
            mask = None
            if n_new > 1:
                # Query j sits at absolute position seq_len - n_new + j and sees keys up to it.
                qpos = torch.arange(seq_len - n_new, seq_len, device=q.device).unsqueeze(1)
                mask = torch.arange(seq_len, device=q.device).unsqueeze(0) <= qpos
            res = F.scaled_dot_product_attention(
                query.unsqueeze(0),
                keys.unsqueeze(0),
                values.unsqueeze(0),
                attn_mask=mask,
                scale=layer.scaling,
                enable_gqa=layer.tp_q_head_num != layer.tp_k_head_num,
            )
            out[start : start + n_new] = res.squeeze(0).transpose(0, 1)
            start += n_new
        return out.view(num_tokens, -1)
