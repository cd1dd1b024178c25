"""FlashInfer attention over the KV pool: paged prefill and decode kernels, planned once per batch."""

from __future__ import annotations

import itertools
import os
from typing import TYPE_CHECKING

import flashinfer
import torch

from sglang.srt.layers.attention.base import AttentionBackend, register_attention_backend
from sglang.srt.layers.radix_attention import RadixAttention

if TYPE_CHECKING:
    from sglang.srt.model_executor.forward_batch_info import ForwardBatch
    from sglang.srt.model_executor.model_runner import ModelRunner

# Scratch space for split-KV partial results, shared by every wrapper (only one runs at a time).
_WORKSPACE_BYTES = 256 << 20
# Each pool slot is its own page: the allocator hands out single slots, so pages of one token fit it as is.
_PAGE_SIZE = 1


# Largest decode batch that FlashInfer's tensor-core kernels serve by default (GQA models only; see below).
_TENSOR_CORE_DECODE_MAX_BS = 8


def tensor_core_decode_max_bs(num_qo_heads: int, num_kv_heads: int) -> int:
    """Decode batches up to this size use FlashInfer's tensor-core (prefill) kernels instead of its CUDA-core ones.

    SGLANG_FLASHINFER_DECODE_TENSOR_CORES: "1" for every batch, "0" for none, unset or "auto" for the measured
    default. With grouped-query attention (4 or more query heads per KV head) the tensor-core kernel shares each
    KV load between the group's heads; on one H200 with a Llama-3-8B shape it cut a batch-1 decode step from 5.84 to
    5.38 ms, while at batch 32 the step got slower (6.55 to 7.01 ms), so by default only small batches use it.
    """
    choice = os.environ.get("SGLANG_FLASHINFER_DECODE_TENSOR_CORES", "auto")
    if choice not in ("0", "1", "auto"):
        raise ValueError(f"SGLANG_FLASHINFER_DECODE_TENSOR_CORES must be 0, 1 or auto, got {choice!r}")
    if choice == "1":
        return 1 << 30
    if choice == "0" or num_qo_heads // num_kv_heads < 4:
        return 0
    return _TENSOR_CORE_DECODE_MAX_BS


def _layer_geometry(model: torch.nn.Module) -> RadixAttention:
    """The attention layer every layer of the model agrees with (heads per rank, head size, scaling)."""
    layers = [m for m in model.modules() if isinstance(m, RadixAttention)]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no RadixAttention layers for the flashinfer backend to serve.")
    first = layers[0]
    shape = (first.tp_q_head_num, first.tp_k_head_num, first.head_dim, first.scaling)
    for layer in layers[1:]:
        if (layer.tp_q_head_num, layer.tp_k_head_num, layer.head_dim, layer.scaling) != shape:
            raise ValueError(
                "The flashinfer backend plans one kernel per batch for all layers, so every layer needs the same "
                f"heads, head_dim and scaling; layer {layer.layer_id} differs from layer {first.layer_id}."
            )
    return first


@register_attention_backend("flashinfer")
class FlashInferAttnBackend(AttentionBackend):
    """Paged prefill (causal, after any cached prefix) and decode through FlashInfer; decode is graph-capturable."""

    def __init__(self, runner: ModelRunner) -> None:
        if runner.device.type != "cuda":
            raise ValueError(
                "The flashinfer attention backend needs a CUDA device; use --attention-backend torch_native."
            )
        self.device = runner.device
        self.req_to_token = runner.req_to_token_pool.req_to_token
        layer = _layer_geometry(runner.model)
        self.num_qo_heads = layer.tp_q_head_num
        self.num_kv_heads = layer.tp_k_head_num
        self.head_dim = layer.head_dim
        self.sm_scale = layer.scaling
        self.q_dtype = runner.model_config.dtype
        self.kv_dtype = runner.token_to_kv_pool.get_key_buffer(0).dtype
        self.workspace = torch.zeros(_WORKSPACE_BYTES, dtype=torch.uint8, device=self.device)
        self.tensor_core_max_bs = tensor_core_decode_max_bs(self.num_qo_heads, self.num_kv_heads)
        self.prefill_wrapper = flashinfer.BatchPrefillWithPagedKVCacheWrapper(self.workspace, "NHD")
        # Eager decode: one wrapper per kernel family, picked by batch size.
        self.decode_wrappers = {
            tc: flashinfer.BatchDecodeWithPagedKVCacheWrapper(self.workspace, "NHD", use_tensor_cores=tc)
            for tc in (False, True)
        }
        self.graph_decode_wrappers: dict[int, flashinfer.BatchDecodeWithPagedKVCacheWrapper] = {}
        # The decode wrapper forward() runs; a graph wrapper while a CUDA graph is being captured.
        self.active_decode_wrapper = self.decode_wrappers[False]
        self.max_graph_kv_tokens = 0

    # ---- per-batch planning ------------------------------------------------------------------------------

    def _kv_pages(
        self, req_pool_indices: torch.Tensor, seq_lens: torch.Tensor, seq_lens_cpu: list[int]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(kv_indptr on the host, kv page indices on the device, last_page_len on the host), int32.

        Sequence i's pages are req_to_token[req_pool_indices[i], :seq_lens[i]], laid end to end; the gather
        is sized from the host copy of the lengths so it never waits for the device.
        """
        bs = len(seq_lens_cpu)
        lens = torch.tensor(seq_lens_cpu)
        indptr = torch.zeros(bs + 1, dtype=torch.int32)
        indptr[1:] = torch.cumsum(lens, 0)
        total = int(indptr[-1])
        owner = torch.repeat_interleave(torch.arange(bs, device=self.device), seq_lens, output_size=total)
        starts = torch.cumsum(seq_lens, 0) - seq_lens
        column = torch.arange(total, device=self.device) - starts[owner]
        indices = self.req_to_token[req_pool_indices[owner], column].to(torch.int32)
        return indptr, indices, torch.ones(bs, dtype=torch.int32)

    def _plan_decode(
        self,
        wrapper: flashinfer.BatchDecodeWithPagedKVCacheWrapper,
        indptr: torch.Tensor,
        indices: torch.Tensor,
        last_page_len: torch.Tensor,
    ) -> None:
        wrapper.plan(
            indptr,
            indices,
            last_page_len,
            self.num_qo_heads,
            self.num_kv_heads,
            self.head_dim,
            _PAGE_SIZE,
            q_data_type=self.q_dtype,
            kv_data_type=self.kv_dtype,
            sm_scale=self.sm_scale,
        )

    def _plan_prefill(self, forward_batch: ForwardBatch) -> None:
        indptr, indices, last_page_len = self._kv_pages(
            forward_batch.req_pool_indices, forward_batch.seq_lens, forward_batch.seq_lens_cpu
        )
        qo_indptr = torch.zeros(forward_batch.batch_size + 1, dtype=torch.int32)
        qo_indptr[1:] = torch.cumsum(torch.tensor(forward_batch.extend_seq_lens_cpu), 0)
        # Causal masks align queries with the end of each sequence, so a cached prefix is attended in full.
        self.prefill_wrapper.plan(
            qo_indptr,
            indptr,
            indices,
            last_page_len,
            self.num_qo_heads,
            self.num_kv_heads,
            self.head_dim,
            _PAGE_SIZE,
            causal=True,
            sm_scale=self.sm_scale,
            q_data_type=self.q_dtype,
            kv_data_type=self.kv_dtype,
        )

    def init_forward_metadata(self, forward_batch: ForwardBatch) -> None:
        """Plan the prefill or decode kernels for this batch; every layer reuses the plan."""
        if forward_batch.forward_mode.is_decode():
            self.active_decode_wrapper = self.decode_wrappers[forward_batch.batch_size <= self.tensor_core_max_bs]
            self._plan_decode(
                self.active_decode_wrapper,
                *self._kv_pages(forward_batch.req_pool_indices, forward_batch.seq_lens, forward_batch.seq_lens_cpu),
            )
        else:
            self._plan_prefill(forward_batch)

    # ---- CUDA graphs ---------------------------------------------------------------------------------------

    def init_cuda_graph_state(self, batch_sizes: list[int], max_kv_tokens: int) -> None:
        """One decode wrapper per captured batch size, with fixed device buffers a graph can point at."""
        max_bs = max(batch_sizes)
        self.max_graph_kv_tokens = max_kv_tokens
        self.graph_indptr = torch.zeros(max_bs + 1, dtype=torch.int32, device=self.device)
        # One element more than any batch needs: prepare_graph_inputs parks the columns past a sequence's end there.
        self.graph_indices = torch.zeros(max_kv_tokens + 1, dtype=torch.int32, device=self.device)
        self.graph_columns = torch.arange(self.req_to_token.shape[1], device=self.device)
        self.ones_host = torch.ones(max_bs, dtype=torch.int32).pin_memory()
        last_page_len = torch.ones(max_bs, dtype=torch.int32, device=self.device)
        for bs in batch_sizes:
            self.graph_decode_wrappers[bs] = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
                self.workspace,
                "NHD",
                use_cuda_graph=True,
                use_tensor_cores=bs <= self.tensor_core_max_bs,
                paged_kv_indptr_buffer=self.graph_indptr[: bs + 1],
                paged_kv_indices_buffer=self.graph_indices,
                paged_kv_last_page_len_buffer=last_page_len[:bs],
            )

    def _plan_graph(self, forward_batch: ForwardBatch) -> None:
        """Plan from the host lengths alone; the page list itself is gathered inside the graph.

        Handing FlashInfer a view of its own indices buffer makes its copy a no-op (same memory, same layout).
        """
        lens = forward_batch.seq_lens_cpu
        total = sum(lens)
        if total > self.max_graph_kv_tokens:
            raise RuntimeError(
                f"decode batch holds {total} KV tokens, more than the {self.max_graph_kv_tokens} the CUDA graph "
                "buffers were sized for"
            )
        # Pinned, so FlashInfer's copies of indptr and last_page_len into the graph buffers are true async copies.
        indptr = torch.tensor([0, *itertools.accumulate(lens)], dtype=torch.int32, pin_memory=True)
        bs = forward_batch.batch_size
        self._plan_decode(self.graph_decode_wrappers[bs], indptr, self.graph_indices[:total], self.ones_host[:bs])

    def init_forward_metadata_capture(self, forward_batch: ForwardBatch) -> None:
        """Plan the graph wrapper of this batch size and make forward() record it."""
        self.active_decode_wrapper = self.graph_decode_wrappers[forward_batch.batch_size]
        self._plan_graph(forward_batch)

    def init_forward_metadata_replay(self, forward_batch: ForwardBatch) -> None:
        """Re-plan before a replay: new lengths land in the buffers the graph reads."""
        self._plan_graph(forward_batch)

    def prepare_graph_inputs(self, forward_batch: ForwardBatch) -> None:
        """Inside the graph: lay each sequence's slots end to end in the indices buffer, at its indptr offset.

        Fixed shapes ([bs, row width]) so it can be recorded: columns past a sequence's length are all written to
        the spare last element. Doing this on the device replaces a handful of host-launched kernels per step.
        """
        bs = forward_batch.batch_size
        slots = self.req_to_token.index_select(0, forward_batch.req_pool_indices)
        columns = self.graph_columns.unsqueeze(0)
        dest = self.graph_indptr[:bs].unsqueeze(1).to(torch.int64) + columns
        spare = self.graph_indices.numel() - 1
        dest = torch.where(columns < forward_batch.seq_lens.unsqueeze(1), dest, spare)
        self.graph_indices.scatter_(0, dest.view(-1), slots.view(-1).to(torch.int32))

    # ---- the layers' call ------------------------------------------------------------------------------------

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: RadixAttention, forward_batch: ForwardBatch
    ) -> torch.Tensor:
        pool = forward_batch.token_to_kv_pool
        num_tokens = q.shape[0]
        pool.set_kv_buffer(
            layer.layer_id,
            forward_batch.out_cache_loc,
            k.view(num_tokens, layer.tp_k_head_num, layer.head_dim),
            v.view(num_tokens, layer.tp_v_head_num, layer.head_dim),
        )
        # [slots, heads, dim] seen as [pages, page_size=1, heads, dim] (FlashInfer's NHD paged layout).
        kv_cache = (
            pool.get_key_buffer(layer.layer_id).unsqueeze(1),
            pool.get_value_buffer(layer.layer_id).unsqueeze(1),
        )
        query = q.view(num_tokens, layer.tp_q_head_num, layer.head_dim)
        if forward_batch.forward_mode.is_decode():
            out = self.active_decode_wrapper.run(query, kv_cache)
        else:
            out = self.prefill_wrapper.run(query, kv_cache)
        return out.view(num_tokens, layer.tp_q_head_num * layer.head_dim)
