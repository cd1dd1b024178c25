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


def tensor_core_decode(num_qo_heads: int, num_kv_heads: int) -> bool:
    """Whether decode uses FlashInfer's tensor-core (prefill) kernels instead of its CUDA-core decode kernels.

    SGLANG_FLASHINFER_DECODE_TENSOR_CORES: "1" always, "0" never, unset or "auto" when there are 4 or more query
    heads per KV head (grouped-query attention), where the tensor-core kernel shares each KV load across the group.
    Measured on one H200, Llama-3-8B shape, CUDA graphs, 512-token prompts, median decode step in ms:
    batch 1: 5.34 vs 5.69, 2: 5.74 vs 6.00, 4: 5.81 vs 6.19, 8: 6.00 vs 6.18, 16: 6.31 vs 6.27, 32: 6.55 vs 6.67.
    """
    choice = os.environ.get("SGLANG_FLASHINFER_DECODE_TENSOR_CORES", "auto")
    if choice not in ("0", "1", "auto"):
        raise ValueError(f"SGLANG_FLASHINFER_DECODE_TENSOR_CORES must be 0, 1 or auto, got {choice!r}")
    return choice == "1" or (choice == "auto" and num_qo_heads // num_kv_heads >= 4)


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
        # The allocator keeps token j of every request at offset j % page_size of its page, so a request's pages are
        # req_to_token[row, ::page_size] // page_size (see mem_cache/allocator.py).
        self.page_size = runner.token_to_kv_pool_allocator.page_size
        layer = _layer_geometry(runner.model)
        self.num_qo_heads = layer.tp_q_head_num
        self.num_kv_heads = layer.tp_k_head_num
        self.head_dim = layer.head_dim
        self.sm_scale = layer.scaling
        self.q_dtype = runner.model_config.dtype
        self.kv_dtype = runner.token_to_kv_pool.get_key_buffer(0).dtype
        self.workspace = torch.zeros(_WORKSPACE_BYTES, dtype=torch.uint8, device=self.device)
        self.tensor_cores = tensor_core_decode(self.num_qo_heads, self.num_kv_heads)
        self.prefill_wrapper = flashinfer.BatchPrefillWithPagedKVCacheWrapper(self.workspace, "NHD")
        self.decode_wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
            self.workspace, "NHD", use_tensor_cores=self.tensor_cores
        )
        self.graph_decode_wrappers: dict[int, flashinfer.BatchDecodeWithPagedKVCacheWrapper] = {}
        # The decode wrapper forward() runs; a graph wrapper while a CUDA graph is being captured.
        self.active_decode_wrapper = self.decode_wrapper
        self.max_graph_kv_tokens = 0

    # ---- per-batch planning ------------------------------------------------------------------------------

    def _page_lens(self, seq_lens_cpu: list[int]) -> tuple[list[int], torch.Tensor, torch.Tensor]:
        """(pages per sequence, kv_indptr over pages, last_page_len), the latter two int32 on the host."""
        size = self.page_size
        pages = [(n + size - 1) // size for n in seq_lens_cpu]
        indptr = torch.tensor([0, *itertools.accumulate(pages)], dtype=torch.int32)
        last = torch.tensor([(n - 1) % size + 1 for n in seq_lens_cpu], dtype=torch.int32)
        return pages, indptr, last

    def _kv_pages(
        self, req_pool_indices: torch.Tensor, seq_lens_cpu: list[int]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(kv_indptr on the host, kv page indices on the device, last_page_len on the host), int32.

        Sequence i's pages are req_to_token[req_pool_indices[i], 0:seq_lens[i]:page_size] // page_size, laid end to
        end; the gather is sized from the host lengths so it never waits for the device.
        """
        pages, indptr, last = self._page_lens(seq_lens_cpu)
        total = int(indptr[-1])
        counts = torch.tensor(pages, device=self.device)
        owner = torch.repeat_interleave(torch.arange(len(pages), device=self.device), counts, output_size=total)
        starts = torch.cumsum(counts, 0) - counts
        column = (torch.arange(total, device=self.device) - starts[owner]) * self.page_size
        indices = (self.req_to_token[req_pool_indices[owner], column] // self.page_size).to(torch.int32)
        return indptr, indices, last

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
            self.page_size,
            q_data_type=self.q_dtype,
            kv_data_type=self.kv_dtype,
            sm_scale=self.sm_scale,
        )

    def _plan_prefill(self, forward_batch: ForwardBatch) -> None:
        indptr, indices, last_page_len = self._kv_pages(forward_batch.req_pool_indices, forward_batch.seq_lens_cpu)
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
            self.page_size,
            causal=True,
            sm_scale=self.sm_scale,
            q_data_type=self.q_dtype,
            kv_data_type=self.kv_dtype,
        )

    def init_forward_metadata(self, forward_batch: ForwardBatch) -> None:
        """Plan the prefill or decode kernels for this batch; every layer reuses the plan."""
        if forward_batch.forward_mode.is_decode():
            self.active_decode_wrapper = self.decode_wrapper
            self._plan_decode(
                self.active_decode_wrapper,
                *self._kv_pages(forward_batch.req_pool_indices, forward_batch.seq_lens_cpu),
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
        # Slot columns of each page's first token, and their page ordinals.
        self.graph_page_columns = torch.arange(0, self.req_to_token.shape[1], self.page_size, device=self.device)
        self.graph_page_ordinals = torch.arange(self.graph_page_columns.numel(), device=self.device)
        last_page_len = torch.ones(max_bs, dtype=torch.int32, device=self.device)
        for bs in batch_sizes:
            self.graph_decode_wrappers[bs] = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
                self.workspace,
                "NHD",
                use_cuda_graph=True,
                use_tensor_cores=self.tensor_cores,
                paged_kv_indptr_buffer=self.graph_indptr[: bs + 1],
                paged_kv_indices_buffer=self.graph_indices,
                paged_kv_last_page_len_buffer=last_page_len[:bs],
            )

    def _plan_graph(self, forward_batch: ForwardBatch) -> None:
        """Plan from the host lengths alone; the page list itself is gathered inside the graph.

        Handing FlashInfer a view of its own indices buffer makes its copy a no-op (same memory, same layout).
        """
        lens = forward_batch.seq_lens_cpu
        if sum(lens) > self.max_graph_kv_tokens:
            raise RuntimeError(
                f"decode batch holds {sum(lens)} KV tokens, more than the {self.max_graph_kv_tokens} the CUDA graph "
                "buffers were sized for"
            )
        _, indptr, last_page_len = self._page_lens(lens)
        # Pinned, so FlashInfer's copies of indptr and last_page_len into the graph buffers are true async copies.
        indptr, last_page_len = indptr.pin_memory(), last_page_len.pin_memory()
        wrapper = self.graph_decode_wrappers[forward_batch.batch_size]
        self._plan_decode(wrapper, indptr, self.graph_indices[: int(indptr[-1])], last_page_len)

    def init_forward_metadata_capture(self, forward_batch: ForwardBatch) -> None:
        """Plan the graph wrapper of this batch size and make forward() record it."""
        self.active_decode_wrapper = self.graph_decode_wrappers[forward_batch.batch_size]
        self._plan_graph(forward_batch)

    def init_forward_metadata_replay(self, forward_batch: ForwardBatch) -> None:
        """Re-plan before a replay: new lengths land in the buffers the graph reads."""
        self._plan_graph(forward_batch)

    def prepare_graph_inputs(self, forward_batch: ForwardBatch) -> None:
        """Inside the graph: lay each sequence's pages end to end in the indices buffer, at its indptr offset.

        Fixed shapes ([bs, pages per row]) so it can be recorded: the entries past a sequence's last page are all
        written to the spare last element. Doing this on the device replaces a handful of host-launched kernels per
        step.
        """
        bs = forward_batch.batch_size
        rows = self.req_to_token.index_select(0, forward_batch.req_pool_indices)
        num_pages = forward_batch.seq_lens.unsqueeze(1)
        if self.page_size == 1:  # a slot is a page: two kernels fewer per step
            pages = rows
        else:
            pages = rows.index_select(1, self.graph_page_columns) // self.page_size
            num_pages = (num_pages + self.page_size - 1) // self.page_size
        ordinals = self.graph_page_ordinals.unsqueeze(0)
        dest = self.graph_indptr[:bs].unsqueeze(1).to(torch.int64) + ordinals
        dest = torch.where(ordinals < num_pages, dest, self.graph_indices.numel() - 1)
        self.graph_indices.scatter_(0, dest.view(-1), pages.view(-1).to(torch.int32))

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
        # [slots, heads, dim] seen as [pages, page_size, heads, dim] (FlashInfer's NHD paged layout; the strides
        # between slots are kept, K and V being interleaved slot by slot).
        kv_cache = (
            pool.get_key_buffer(layer.layer_id).unflatten(0, (-1, self.page_size)),
            pool.get_value_buffer(layer.layer_id).unflatten(0, (-1, self.page_size)),
        )
        query = q.view(num_tokens, layer.tp_q_head_num, layer.head_dim)
        if forward_batch.forward_mode.is_decode():
            out = self.active_decode_wrapper.run(query, kv_cache)
        else:
            out = self.prefill_wrapper.run(query, kv_cache)
        return out.view(num_tokens, layer.tp_q_head_num * layer.head_dim)
