"""Decode passes replayed from CUDA graphs, one captured per batch size up to --cuda-graph-max-bs."""

from __future__ import annotations

import bisect
import logging
import time
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import torch

from sglang.srt.layers.logits_processor import LogitsProcessorOutput
from sglang.srt.model_executor.forward_batch_info import ForwardBatch, ForwardMode

if TYPE_CHECKING:
    from sglang.srt.model_executor.model_runner import ModelRunner

logger = logging.getLogger(__name__)


@runtime_checkable
class GraphableAttentionBackend(Protocol):
    """An attention backend whose decode kernels read their plan from fixed buffers, so a graph can replay them."""

    def init_cuda_graph_state(self, batch_sizes: list[int], max_kv_tokens: int) -> None:
        """Allocate the fixed buffers for every captured batch size."""

    def init_forward_metadata_capture(self, forward_batch: ForwardBatch) -> None:
        """Plan a batch of a captured size and make the layers record that plan's kernels."""

    def init_forward_metadata_replay(self, forward_batch: ForwardBatch) -> None:
        """Plan a padded batch into the buffers its graph reads."""


def graph_batch_sizes(max_bs: int) -> list[int]:
    """Captured sizes: dense for small batches (padding a batch of 3 to 32 would waste most of the step)."""
    sizes = {1, 2, 4, 8, *range(16, max_bs + 1, 8), max_bs}
    return sorted(s for s in sizes if s <= max_bs)


class CudaGraphRunner:
    """Captures the model's decode pass per batch size and replays it with a batch padded to the next size."""

    def __init__(self, runner: ModelRunner, max_bs: int) -> None:
        self.runner = runner
        self.backend = runner.attn_backend
        self.batch_sizes = graph_batch_sizes(max_bs)
        self.max_bs = self.batch_sizes[-1]
        device = runner.device
        # Pad rows write their key/value into slot 0, which the allocator never hands out.
        self.input_ids = torch.zeros(self.max_bs, dtype=torch.int64, device=device)
        self.positions = torch.zeros(self.max_bs, dtype=torch.int64, device=device)
        self.out_cache_loc = torch.zeros(self.max_bs, dtype=torch.int64, device=device)
        self.req_pool_indices = torch.zeros(self.max_bs, dtype=torch.int64, device=device)
        self.seq_lens = torch.ones(self.max_bs, dtype=torch.int64, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, LogitsProcessorOutput] = {}
        row_width = runner.req_to_token_pool.req_to_token.shape[1]
        self.backend.init_cuda_graph_state(self.batch_sizes, self.max_bs * row_width)
        start = time.perf_counter()
        self.capture()
        self.capture_seconds = time.perf_counter() - start
        logger.info(
            "Captured %d decode CUDA graphs (batch sizes %s) in %.2f s",
            len(self.graphs),
            self.batch_sizes,
            self.capture_seconds,
        )

    def _static_batch(self, bs: int, seq_lens_cpu: list[int]) -> ForwardBatch:
        return ForwardBatch(
            forward_mode=ForwardMode.DECODE,
            batch_size=bs,
            input_ids=self.input_ids[:bs],
            positions=self.positions[:bs],
            req_pool_indices=self.req_pool_indices[:bs],
            seq_lens=self.seq_lens[:bs],
            out_cache_loc=self.out_cache_loc[:bs],
            seq_lens_cpu=seq_lens_cpu,
            req_to_token_pool=self.runner.req_to_token_pool,
            token_to_kv_pool=self.runner.token_to_kv_pool,
            attn_backend=self.backend,
        )

    @torch.inference_mode()
    def capture(self) -> None:
        """Record one graph per size, largest first so the smaller ones reuse its memory pool."""
        model = self.runner.model
        pool = None
        for bs in reversed(self.batch_sizes):
            batch = self._static_batch(bs, [1] * bs)
            self.backend.init_forward_metadata_capture(batch)
            # Run eagerly first: lazy setup (cuBLAS handles, kernel selection) must not happen while recording.
            for _ in range(2):
                model(batch.input_ids, batch.positions, batch)
            torch.cuda.synchronize(self.runner.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[bs] = model(batch.input_ids, batch.positions, batch)
            pool = graph.pool()
            self.graphs[bs] = graph
        torch.cuda.synchronize(self.runner.device)

    def can_run(self, forward_batch: ForwardBatch) -> bool:
        """Whether a captured graph covers this batch."""
        return (
            forward_batch.forward_mode.is_decode()
            and forward_batch.batch_size <= self.max_bs
            and not forward_batch.return_full_logits
        )

    def replay(self, forward_batch: ForwardBatch) -> LogitsProcessorOutput:
        """Copy the batch into the graph's inputs, re-plan attention, replay, and return the real rows' logits."""
        bs = forward_batch.batch_size
        padded = self.batch_sizes[bisect.bisect_left(self.batch_sizes, bs)]
        self.input_ids[:bs].copy_(forward_batch.input_ids)
        self.positions[:bs].copy_(forward_batch.positions)
        self.out_cache_loc[:bs].copy_(forward_batch.out_cache_loc)
        self.req_pool_indices[:bs].copy_(forward_batch.req_pool_indices)
        self.seq_lens[:bs].copy_(forward_batch.seq_lens)
        if padded > bs:
            # A larger batch may have left real values in the pad rows; reset them to one scratch token each.
            for buf in (self.input_ids, self.positions, self.out_cache_loc, self.req_pool_indices):
                buf[bs:padded].zero_()
            self.seq_lens[bs:padded].fill_(1)
        batch = self._static_batch(padded, list(forward_batch.seq_lens_cpu) + [1] * (padded - bs))
        self.backend.init_forward_metadata_replay(batch)
        self.graphs[padded].replay()
        return LogitsProcessorOutput(next_token_logits=self.outputs[padded].next_token_logits[:bs])


def maybe_create_cuda_graph_runner(runner: ModelRunner) -> CudaGraphRunner | None:
    """A graph runner when the device, the flags and the attention backend allow one; else None (eager decode)."""
    args = runner.server_args
    if runner.device.type != "cuda" or args.disable_cuda_graph:
        return None
    if not isinstance(runner.attn_backend, GraphableAttentionBackend):
        logger.info("CUDA graphs off: the %s attention backend cannot be captured.", args.attention_backend)
        return None
    max_bs = min(args.cuda_graph_max_bs, args.max_running_requests)
    return CudaGraphRunner(runner, max_bs) if max_bs >= 1 else None
