"""Req (one request's scheduling state) and ScheduleBatch (turns a list of Reqs into a ForwardBatch)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from sglang.srt.constrained.grammar_backend import GrammarMatcher
from sglang.srt.managers.io_struct import TokenizedGenerateReqInput
from sglang.srt.mem_cache.radix_cache import TreeNode
from sglang.srt.model_executor.forward_batch_info import ForwardBatch, ForwardMode
from sglang.srt.sampling.sampling_params import SamplingParams


@dataclass(eq=False)
class Req:
    """A request inside the scheduler: its tokens, KV row, progress and outputs."""

    rid: str
    origin_input_ids: list[int]
    sampling_params: SamplingParams
    return_logprob: bool = False
    top_logprobs_num: int = 0
    output_ids: list[int] = field(default_factory=list)
    req_pool_idx: int | None = None
    kv_len: int = 0  # tokens whose KV is in the pool (row req_pool_idx of req_to_token)
    cached_len: int = 0  # of kv_len, tokens that came from the radix cache (slots owned by the tree)
    cached_tokens: int = 0  # reported to the user: prompt tokens served from the cache
    last_node: TreeNode | None = None
    finished_reason: dict[str, Any] | None = None
    extend_len: int = 0  # tokens computed in the current extend pass
    generator: torch.Generator | None = None  # a seeded request's own, made by the Sampler on the logits' device
    new_logprobs: list[float] = field(default_factory=list)
    new_top_logprobs: list[list[tuple[float, int]]] = field(default_factory=list)
    sent_len: int = 0  # output tokens already sent to the TokenizerManager
    context_limit: int = 1 << 62  # the model's context length (the stop checker ends the request there)
    grammar: GrammarMatcher | None = None  # structured output; rank 0 only (it samples for every rank)
    needs_sync: bool = False  # its sampling needs the previous token on the host: no overlapped steps
    # Overlap scheduling: tokens sampled on the device and not in output_ids yet (a count, not a flag: a step's
    # tokens are applied after the next step, which samples this request again, was launched).
    tokens_in_flight: int = 0

    @classmethod
    def from_input(cls, recv: TokenizedGenerateReqInput) -> Req:
        req = cls(
            rid=recv.rid,
            origin_input_ids=list(recv.input_ids),
            sampling_params=recv.sampling_params,
            return_logprob=recv.return_logprob,
            top_logprobs_num=recv.top_logprobs_num,
        )
        return req

    @property
    def fill_ids(self) -> list[int]:
        """All tokens of the sequence so far: prompt plus generated (a new list: for once-per-request uses only)."""
        return self.origin_input_ids + self.output_ids

    @property
    def seqlen(self) -> int:
        """Tokens of the sequence so far, without building the list (the per-step question)."""
        return len(self.origin_input_ids) + len(self.output_ids)

    @property
    def finished(self) -> bool:
        return self.finished_reason is not None

    def last_token_in_flight(self) -> bool:
        """Whether a token in flight is certainly its last (a length limit): the next step need not decode it."""
        if not self.tokens_in_flight:
            return False
        n = self.tokens_in_flight
        limit = self.sampling_params.max_new_tokens
        return (limit is not None and len(self.output_ids) + n >= limit) or self.seqlen + n >= self.context_limit

    def remaining_prefill(self) -> int:
        """Tokens still to prefill before the request can decode."""
        return self.seqlen - self.kv_len

    def reset_for_retract(self) -> None:
        """Forget the KV state so the request is prefilled again (prompt plus outputs so far)."""
        self.req_pool_idx = None
        self.kv_len = self.cached_len = 0
        self.last_node = None


def alloc_kv_slots(reqs: list[Req], mode: ForwardMode, runner: Any) -> torch.Tensor | None:
    """One KV slot per new token of the batch, in batch order (CPU int64), or None, taking nothing, if the pool is
    short. With pages, each request first fills its partly written last page, then takes fresh ones."""
    allocator = runner.token_to_kv_pool_allocator
    if allocator.page_size == 1:
        return allocator.alloc(sum(r.extend_len for r in reqs) if mode.is_extend() else len(reqs))
    newest_slot = runner.req_to_token_pool.newest_slot
    rows = [r.req_pool_idx for r in reqs]
    held = [r.kv_len for r in reqs]
    last = [newest_slot[row] for row in rows]
    if mode.is_extend():
        got = allocator.alloc_extend(held, [r.extend_len for r in reqs], last)
    else:
        got = allocator.alloc_decode(held, last)
    if got is None:
        return None
    slots, newest = got
    for row, slot in zip(rows, newest):
        newest_slot[row] = slot
    return slots


def build_forward_batch(
    reqs: list[Req],
    mode: ForwardMode,
    out_cache_loc: torch.Tensor,
    runner: Any,
    return_full_logits: bool = False,
    token_source: torch.Tensor | None = None,
    host_slots: torch.Tensor | None = None,
) -> ForwardBatch:
    """Write the new slots into each request's KV row and build the flattened ForwardBatch.

    With token_source (overlap scheduling, decode only), each request's input token is read on the device from
    token_source[its row] instead of from its output_ids, whose newest token may not have reached the host yet.
    host_slots, a host copy of req_to_token, receives the new slots too.
    """
    device = runner.device
    req_to_token = runner.req_to_token_pool.req_to_token
    ids: list[int] = []
    positions: list[int] = []
    rows: list[int] = []
    seq_lens: list[int] = []
    prefix_lens: list[int] = []
    extend_lens: list[int] = []
    decode = mode.is_decode()
    token_source = token_source if decode else None
    for req in reqs:
        if token_source is not None:
            ids.append(0)  # replaced on the device
            positions.append(req.kv_len)
            rows.append(req.req_pool_idx)
            n = 1
        elif decode:
            # Only the newest token: no copy of the whole prompt + output list per request and step.
            ids.append(req.output_ids[-1] if req.output_ids else req.origin_input_ids[req.kv_len])
            positions.append(req.kv_len)
            rows.append(req.req_pool_idx)
            n = 1
        else:
            n = req.extend_len
            ids.extend(_token_range(req, req.kv_len, req.kv_len + n))
            positions.extend(range(req.kv_len, req.kv_len + n))
            rows.extend([req.req_pool_idx] * n)
        prefix_lens.append(req.kv_len)
        extend_lens.append(n)
        seq_lens.append(req.kv_len + n)
    num_tokens = len(ids)
    graphs = getattr(runner, "cuda_graph_runner", None)
    host_inputs = None
    if decode and graphs is not None and graphs.takes(len(reqs), return_full_logits):
        # No device work here: the graph runner copies these five rows to the device in one go, and its graph
        # writes the new slots into req_to_token (in decode, a token's row is its request's row).
        host_inputs = torch.tensor([ids, positions, rows, seq_lens, out_cache_loc.tolist()], dtype=torch.int64)
        ids_t, positions_t, req_pool_indices_t, seq_lens_t, out_cache_loc = host_inputs.unbind(0)
        if host_slots is not None:
            host_slots[req_pool_indices_t, positions_t] = out_cache_loc.to(host_slots.dtype)
    else:
        # Every integer input in one host tensor and one copy to the device: each separate small host-to-device
        # copy costs a launch and a staging copy, several per decode step otherwise.
        host = torch.tensor(ids + positions + rows + [r.req_pool_idx for r in reqs] + seq_lens, dtype=torch.int64)
        if host_slots is not None:
            token_rows, token_positions = host[2 * num_tokens : 3 * num_tokens], host[num_tokens : 2 * num_tokens]
            host_slots[token_rows, token_positions] = out_cache_loc.to(host_slots.dtype)
        packed = torch.cat([host, out_cache_loc.to(torch.int64)]).to(device, non_blocking=True)
        ids_t, positions_t, rows_t, req_pool_indices_t, seq_lens_t, out_cache_loc = packed.split(
            [num_tokens, num_tokens, num_tokens, len(reqs), len(reqs), num_tokens]
        )
        # One scatter for the whole batch: on a GPU, a copy per request would cost a launch and a sync each.
        req_to_token[rows_t, positions_t] = out_cache_loc
        if token_source is not None:
            ids_t = token_source[req_pool_indices_t]
    return ForwardBatch(
        forward_mode=mode,
        batch_size=len(reqs),
        input_ids=ids_t,
        positions=positions_t,
        req_pool_indices=req_pool_indices_t,
        seq_lens=seq_lens_t,
        out_cache_loc=out_cache_loc,
        seq_lens_cpu=seq_lens,
        extend_prefix_lens_cpu=prefix_lens,
        extend_seq_lens_cpu=extend_lens,
        return_full_logits=return_full_logits,
        req_to_token_pool=runner.req_to_token_pool,
        token_to_kv_pool=runner.token_to_kv_pool,
        attn_backend=runner.attn_backend,
        host_inputs=host_inputs,
        token_source=token_source if host_inputs is not None else None,
    )


def _token_range(req: Req, start: int, end: int) -> list[int]:
    """Tokens start..end of req's sequence, sliced from the prompt and the outputs without joining them."""
    prompt = req.origin_input_ids
    if end <= len(prompt):
        return prompt[start:end]
    if start >= len(prompt):
        return req.output_ids[start - len(prompt) : end - len(prompt)]
    return prompt[start:] + req.output_ids[: end - len(prompt)]
