"""Overlap scheduling: a step's tokens stay on the device as the next step's input, and reach the host a step late.

While step N runs on the device the host prepares and launches step N+1, then applies step N's tokens (stop checks,
outputs, releases). Step N+1's decode inputs are read on the device from `TokenRelay`, which every step's sampled ids
are written into, so no host round trip sits between two steps. Requests whose sampling needs the host's view of
the previous token (a grammar, penalties, min_new_tokens, logit_bias, logprobs) make their batches synchronous.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from sglang.srt.distributed.parallel_state import get_tp_group
from sglang.srt.layers.sampler import SampleOutput

if TYPE_CHECKING:
    from sglang.srt.layers.sampler import Sampler
    from sglang.srt.managers.schedule_batch import Req


def needs_sync(req: Req) -> bool:
    """Whether req's next token can only be sampled once its previous one is on the host."""
    params = req.sampling_params
    return bool(
        req.grammar is not None
        or req.return_logprob
        or params.has_penalties
        or params.min_new_tokens
        or params.logit_bias
    )


class TokenRelay:
    """Per request-table row, the newest token sampled for it, on the device: the input of its next decode step."""

    def __init__(self, rows: int, device: torch.device) -> None:
        self.device = device
        self.ids = torch.zeros(rows, dtype=torch.int64, device=device)

    def write(self, reqs: list[Req], token_ids: torch.Tensor) -> None:
        """Record token_ids[j] as the newest token of reqs[j] (ids < 0 mark failed rows; they store 0)."""
        rows = torch.tensor([r.req_pool_idx for r in reqs], dtype=torch.int64).to(self.device, non_blocking=True)
        self.ids[rows] = token_ids.to(self.device, torch.int64).clamp_min(0)


@dataclass
class LaunchedStep:
    """A step whose forward (and, under overlap, sampling) is enqueued; its results are applied later."""

    live: list[Req]  # the batch's requests that were not finished when it was launched
    sampled: list[Req]  # the requests that take a token from this step, in the order of its ids
    sample: SampleOutput | None = None  # set at once without overlap, by resolve() under it
    ids_host: torch.Tensor | None = None  # the ids' host copy, complete once `ready` has passed
    ready: torch.cuda.Event | None = None
    errors: dict[int, str] = field(default_factory=dict)  # rank 0: row -> why its sampling failed

    def resolve(self) -> SampleOutput:
        """The step's tokens on the host, waiting for its device work if it still runs."""
        if self.sample is None:
            if self.ready is not None:
                self.ready.synchronize()
            ids = self.ids_host.tolist() if self.ids_host is not None else []
            errors = {j: self.errors.get(j, "sampling failed") for j, t in enumerate(ids) if t < 0}
            n = len(ids)
            self.sample = SampleOutput(ids, [None] * n, [None] * n, [None] * n, errors)
        return self.sample


def sample_on_device(sampler: Sampler, logits: torch.Tensor, reqs: list[Req]) -> tuple[torch.Tensor, dict[int, str]]:
    """Rank 0's choice of one token per row of logits, left on the device (no host copy, no wait).

    The same draws as the Sampler's own call for rows without grammar, penalties or biases (only those come here).
    If that raises, the sampler's guarded path (which waits for the device) picks the tokens instead and the rows it
    could not sample are marked -1.
    """
    try:
        return sampler.choose_on_device(logits, reqs), {}
    except Exception:
        out = sampler.sample_guarded(logits, reqs)
        ids = [-1 if t is None else t for t in out.token_ids]
        return torch.tensor(ids, dtype=torch.int64, device=logits.device), dict(out.errors)


def share_token_ids(ids: torch.Tensor | None, n: int, device: torch.device) -> torch.Tensor:
    """Rank 0's ids on every TP rank, as a device tensor (a broadcast on the TP device group; no host copy)."""
    group = get_tp_group()
    if group.size == 1:
        return ids
    if ids is None:
        ids = torch.empty(n, dtype=torch.int64, device=device)
    dist.broadcast(ids, src=0, group=group.device_group)
    return ids


def copy_to_host(ids: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event | None]:
    """Start the ids' copy to the host; on CUDA into pinned memory, with an event that marks it done."""
    if ids.device.type != "cuda":
        return ids.clone(), None
    host = torch.empty(ids.shape, dtype=ids.dtype, pin_memory=True)
    host.copy_(ids, non_blocking=True)
    event = torch.cuda.Event()
    event.record()
    return host, event
