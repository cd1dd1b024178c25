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
        """Plan a padded batch into the buffers its graph reads (host side, before the replay)."""

    def prepare_graph_inputs(self, forward_batch: ForwardBatch) -> None:
        """Device-side part of the plan, recorded at the start of the graph (e.g. gathering the KV page list)."""


def graph_batch_sizes(max_bs: int) -> list[int]:
    """Captured sizes: dense for small batches (padding a batch of 3 to 32 would waste most of the step)."""
    sizes = {1, 2, 4, 8, *range(16, max_bs + 1, 8), max_bs}
    return sorted(s for s in sizes if s <= max_bs)


# Rows of the graphs' integer inputs, in the order of ForwardBatch.host_inputs.
_INPUT_ROWS = ("input_ids", "positions", "req_pool_indices", "seq_lens", "out_cache_loc")


class CudaGraphRunner:
    """Captures the model's decode pass per batch size and replays it with a batch padded to the next size.

    A step costs the host one copy to the device and the attention plan: the graph of size bs reads its integer
    inputs from the first 5 * bs elements of one device buffer, records the new KV slots in req_to_token itself, and
    gathers the attention backend's page list itself.
    """

    def __init__(self, runner: ModelRunner, max_bs: int) -> None:
        self.runner = runner
        self.backend = runner.attn_backend
        self.batch_sizes = graph_batch_sizes(max_bs)
        self.max_bs = self.batch_sizes[-1]
        device = runner.device
        rows = len(_INPUT_ROWS)
        self.inputs = torch.zeros(rows * self.max_bs, dtype=torch.int64, device=device)
        self.host_inputs = torch.zeros(rows * self.max_bs, dtype=torch.int64).pin_memory()
        # The staging buffer is rewritten each step only after the previous copy out of it has finished.
        self.staged = torch.cuda.Event()
        # A pad row decodes token 0 at position 0 of the scratch request row into the scratch slot 0.
        self.pad = torch.tensor([0, 0, runner.req_to_token_pool.scratch_row, 1, 0], dtype=torch.int64)
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
        ids, positions, req_pool_indices, seq_lens, out_cache_loc = self.inputs[: len(_INPUT_ROWS) * bs].view(-1, bs)
        return ForwardBatch(
            forward_mode=ForwardMode.DECODE,
            batch_size=bs,
            input_ids=ids,
            positions=positions,
            req_pool_indices=req_pool_indices,
            seq_lens=seq_lens,
            out_cache_loc=out_cache_loc,
            seq_lens_cpu=seq_lens_cpu,
            req_to_token_pool=self.runner.req_to_token_pool,
            token_to_kv_pool=self.runner.token_to_kv_pool,
            attn_backend=self.backend,
        )

    def _step(self, batch: ForwardBatch) -> LogitsProcessorOutput:
        """What a graph records: the slot bookkeeping, the device half of the attention plan, the model."""
        req_to_token = self.runner.req_to_token_pool.req_to_token
        req_to_token[batch.req_pool_indices, batch.positions] = batch.out_cache_loc
        self.backend.prepare_graph_inputs(batch)
        return self.runner.model(batch.input_ids, batch.positions, batch)

    @torch.inference_mode()
    def capture(self) -> None:
        """Record one graph per size, largest first so the smaller ones reuse its memory pool."""
        pool = None
        for bs in reversed(self.batch_sizes):
            self.inputs[: len(_INPUT_ROWS) * bs].view(-1, bs).copy_(self.pad.unsqueeze(1).expand(-1, bs))
            batch = self._static_batch(bs, [1] * bs)
            self.backend.init_forward_metadata_capture(batch)
            # Run eagerly first: lazy setup (cuBLAS handles, kernel selection) must not happen while recording.
            for _ in range(2):
                self._step(batch)
            torch.cuda.synchronize(self.runner.device)
            graph = torch.cuda.CUDAGraph()
            # thread_local: work other threads of this rank do meanwhile (an R-Fork pair group closing in the
            # background, Mooncake, a kernel build) must not invalidate the capture; seen with a forked NCCL client
            # whose group's teardown thread ran while its first graph was being recorded.
            with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
                self.outputs[bs] = self._step(batch)
            pool = graph.pool()
            self.graphs[bs] = graph
        torch.cuda.synchronize(self.runner.device)

    def takes(self, batch_size: int, return_full_logits: bool) -> bool:
        """Whether a decode batch of this size will be replayed (so it may be built on the host)."""
        return batch_size <= self.max_bs and not return_full_logits

    def can_run(self, forward_batch: ForwardBatch) -> bool:
        """Whether a captured graph covers this batch."""
        return forward_batch.forward_mode.is_decode() and self.takes(
            forward_batch.batch_size, forward_batch.return_full_logits
        )

    def _stage(self, forward_batch: ForwardBatch, padded: int) -> None:
        """Put the batch's integer inputs, padded to the graph's size, into the graph's input buffer."""
        bs = forward_batch.batch_size
        n = len(_INPUT_ROWS) * padded
        if forward_batch.host_inputs is not None:
            self.staged.synchronize()
            host = self.host_inputs[:n].view(-1, padded)
            host[:, :bs] = forward_batch.host_inputs
            host[:, bs:] = self.pad.unsqueeze(1)
            self.inputs[:n].copy_(self.host_inputs[:n], non_blocking=True)
            self.staged.record()
            if forward_batch.token_source is not None:
                ids, _, rows = self.inputs[: 3 * padded].view(3, padded)[:, :bs]
                ids.copy_(forward_batch.token_source[rows])
            return
        # Built on the device (tests, tools): one copy per row.
        dest = self.inputs[:n].view(-1, padded)
        for row, name in enumerate(_INPUT_ROWS):
            dest[row, :bs].copy_(getattr(forward_batch, name))
        if padded > bs:
            dest[:, bs:].copy_(self.pad.to(dest.device).unsqueeze(1).expand(-1, padded - bs))

    def replay(self, forward_batch: ForwardBatch) -> LogitsProcessorOutput:
        """Stage the batch into the graph's inputs, re-plan attention, replay, and return the real rows' logits."""
        bs = forward_batch.batch_size
        padded = self.batch_sizes[bisect.bisect_left(self.batch_sizes, bs)]
        self._stage(forward_batch, padded)
        batch = self._static_batch(padded, list(forward_batch.seq_lens_cpu) + [1] * (padded - bs))
        self.backend.init_forward_metadata_replay(batch)
        plan_done = getattr(self.runner, "plan_done", None)
        if plan_done is not None:
            plan_done.record()  # the plan's copies are enqueued: the next step may plan once they have run
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
