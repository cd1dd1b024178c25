"""A small model runner for tests: loader-built model, real KV pools, torch_native attention, greedy decoding."""

from __future__ import annotations

import queue as queue_mod
import socket
import traceback
from dataclasses import dataclass
from typing import Any

import torch

from sglang.srt.configs.load_config import LoadConfig, LoadFormat
from sglang.srt.configs.model_config import ModelConfig
from sglang.srt.distributed import get_tp_size
from sglang.srt.distributed.parallel_state import destroy_distributed, init_distributed
from sglang.srt.layers.attention import create_attention_backend
from sglang.srt.layers.logits_processor import LogitsProcessorOutput
from sglang.srt.mem_cache.allocator import TokenToKVPoolAllocator
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, ReqToTokenPool
from sglang.srt.model_executor.forward_batch_info import ForwardBatch, ForwardMode
from sglang.srt.model_loader import get_model_loader


@dataclass
class Sequence:
    """One request's row in req_to_token and how many of its tokens are in the KV cache."""

    row: int
    cached_len: int = 0


class ModelHarness:
    """Runs prefill and batched decode passes the way the scheduler would, minus scheduling."""

    def __init__(
        self,
        model_path: str,
        load_format: str = "auto",
        dtype: str = "float32",
        device: str = "cpu",
        max_total_tokens: int = 4096,
        max_running: int = 8,
        max_context_len: int = 256,
    ) -> None:
        self.device = torch.device(device)
        self.model_config = ModelConfig.from_path(model_path, dtype, None, self.device.type)
        load_config = LoadConfig(load_format=LoadFormat(load_format))
        self.model = get_model_loader(load_config).load_model(self.model_config, self.device)
        cfg = self.model_config
        self.req_to_token_pool = ReqToTokenPool(max_running, max_context_len, self.device)
        self.token_to_kv_pool = MHATokenToKVPool(
            max_total_tokens,
            cfg.num_layers,
            cfg.num_kv_heads_per_rank(get_tp_size()),
            cfg.head_dim,
            cfg.dtype,
            self.device,
        )
        self.allocator = TokenToKVPoolAllocator(max_total_tokens, self.device)
        self.attn_backend = create_attention_backend("torch_native", self)

    def _alloc_slots(self, n: int) -> torch.Tensor:
        slots = self.allocator.alloc(n)
        if slots is None:
            raise RuntimeError(f"KV pool exhausted: {n} slots asked, {self.allocator.available_size()} free")
        return slots

    @torch.inference_mode()
    def _run(
        self, mode: ForwardMode, seqs: list[Sequence], chunks: list[list[int]], full_logits: bool
    ) -> LogitsProcessorOutput:
        lens = [len(c) for c in chunks]
        out_cache_loc = self._alloc_slots(sum(lens))
        positions, start = [], 0
        for seq, n in zip(seqs, lens):
            self.req_to_token_pool.req_to_token[seq.row, seq.cached_len : seq.cached_len + n] = out_cache_loc[
                start : start + n
            ].to(self.device)
            positions.extend(range(seq.cached_len, seq.cached_len + n))
            start += n
        prefix_lens = [s.cached_len for s in seqs]
        for seq, n in zip(seqs, lens):
            seq.cached_len += n
        seq_lens = [s.cached_len for s in seqs]

        def tensor(values: list[int]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.int64, device=self.device)

        batch = ForwardBatch(
            forward_mode=mode,
            batch_size=len(seqs),
            input_ids=tensor([t for c in chunks for t in c]),
            positions=tensor(positions),
            req_pool_indices=tensor([s.row for s in seqs]),
            seq_lens=tensor(seq_lens),
            out_cache_loc=out_cache_loc.to(self.device),
            seq_lens_cpu=seq_lens,
            extend_prefix_lens_cpu=prefix_lens,
            extend_seq_lens_cpu=lens,
            return_full_logits=full_logits,
            req_to_token_pool=self.req_to_token_pool,
            token_to_kv_pool=self.token_to_kv_pool,
            attn_backend=self.attn_backend,
        )
        self.attn_backend.init_forward_metadata(batch)
        return self.model(batch.input_ids, batch.positions, batch)

    def prefill(
        self, prompts: list[list[int]], full_logits: bool = False
    ) -> tuple[list[Sequence], LogitsProcessorOutput]:
        """Start one sequence per prompt and run them as a single extend batch."""
        seqs = []
        for _ in prompts:
            row = self.req_to_token_pool.alloc()
            if row is None:
                raise RuntimeError("no free request rows; raise max_running")
            seqs.append(Sequence(row))
        return seqs, self._run(ForwardMode.EXTEND, seqs, prompts, full_logits)

    def decode(self, seqs: list[Sequence], token_ids: list[int]) -> LogitsProcessorOutput:
        """Append one token to each sequence as a decode batch."""
        return self._run(ForwardMode.DECODE, seqs, [[t] for t in token_ids], False)

    def release(self, seqs: list[Sequence]) -> None:
        """Return the sequences' KV slots and rows."""
        table = self.req_to_token_pool.req_to_token
        for seq in seqs:
            self.allocator.free(table[seq.row, : seq.cached_len])
            self.req_to_token_pool.free(seq.row)

    def prefill_logits(self, prompts: list[list[int]]) -> list[torch.Tensor]:
        """Logits [len(prompt), vocab] of every prompt token, from one batched prefill."""
        seqs, out = self.prefill(prompts, full_logits=True)
        self.release(seqs)
        assert out.full_logits is not None
        return list(out.full_logits.split([len(p) for p in prompts]))

    def greedy_generate(self, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        """Greedy continuation of every prompt, decoding all of them together through the KV cache."""
        seqs, out = self.prefill(prompts)
        generated: list[list[int]] = [[] for _ in prompts]
        for step in range(max_new_tokens):
            next_ids = out.next_token_logits.argmax(dim=-1).tolist()
            for tokens, token in zip(generated, next_ids):
                tokens.append(token)
            if step + 1 < max_new_tokens:
                out = self.decode(seqs, next_ids)
        self.release(seqs)
        return generated


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tp_worker(
    rank: int,
    tp_size: int,
    init_method: str,
    model_paths: list[str],
    prompts: list[list[int]],
    max_new_tokens: int,
    results: Any,
) -> None:
    # Each rank gets one thread so that ranks sharing a small CI machine do not oversubscribe its cores.
    torch.set_num_threads(1)
    try:
        init_distributed(rank, tp_size, init_method, torch.device("cpu"), timeout_s=120)
        out: dict[str, dict[str, Any]] = {}
        for path in model_paths:
            harness = ModelHarness(path)
            out[path] = {
                "param_shapes": {n: tuple(p.shape) for n, p in harness.model.named_parameters()},
                "logits": [x.numpy() for x in harness.prefill_logits(prompts)],
                "tokens": harness.greedy_generate(prompts, max_new_tokens),
            }
        results.put((rank, out, None))
    except BaseException:
        results.put((rank, None, traceback.format_exc()))
    finally:
        destroy_distributed()


def run_tp_ranks(
    model_paths: list[str],
    prompts: list[list[int]],
    tp_size: int,
    max_new_tokens: int,
    timeout_s: float = 300,
) -> list[dict[str, dict[str, Any]]]:
    """Run every model at the given TP size on CPU (gloo), one spawned process per rank; results by rank."""
    ctx = torch.multiprocessing.get_context("spawn")
    results = ctx.Queue()
    init_method = f"tcp://127.0.0.1:{free_port()}"
    procs = [
        ctx.Process(
            target=_tp_worker,
            args=(rank, tp_size, init_method, model_paths, prompts, max_new_tokens, results),
        )
        for rank in range(tp_size)
    ]
    for proc in procs:
        proc.start()
    by_rank: dict[int, dict[str, dict[str, Any]]] = {}
    try:
        for _ in procs:
            try:
                rank, out, error = results.get(timeout=timeout_s)
            except queue_mod.Empty:
                raise TimeoutError(f"TP ranks did not finish within {timeout_s}s") from None
            if error is not None:
                raise RuntimeError(f"TP rank {rank} failed:\n{error}")
            by_rank[rank] = out
    finally:
        for proc in procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.terminate()
    return [by_rank[r] for r in range(tp_size)]
