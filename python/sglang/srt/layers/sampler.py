"""Turn next-token logits into token ids: penalties, temperature, top-k/top-p/min-p, seeded sampling."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from sglang.srt.managers.schedule_batch import Req


@dataclass
class SampleOutput:
    """Chosen tokens and, where asked, their log-probabilities."""

    token_ids: list[int]
    logprobs: list[float | None]
    top_logprobs: list[list[tuple[float, int]] | None]


class Sampler:
    """Samples one token per request; rows with a seed use their own generator so results do not
    depend on what else is in the batch."""

    def __init__(self, seed: int, stop_ids_for: callable) -> None:
        self.generator = torch.Generator().manual_seed(seed)
        self.stop_ids_for = stop_ids_for

    def __call__(self, logits: torch.Tensor, reqs: list[Req]) -> SampleOutput:
        logits = logits.float()
        raw = logits
        if any(r.sampling_params.has_penalties or r.sampling_params.min_new_tokens for r in reqs):
            logits = logits.clone()
            for i, req in enumerate(reqs):
                _apply_penalties(logits[i], req, self.stop_ids_for(req))
        ids: list[int] = []
        # One argmax and one device-to-host copy for the whole batch, not one per greedy row.
        greedy = logits.argmax(dim=-1).tolist() if any(r.sampling_params.is_greedy for r in reqs) else []
        for i, req in enumerate(reqs):
            params = req.sampling_params
            if params.is_greedy:
                ids.append(greedy[i])
                continue
            probs = _filtered_probs(logits[i] / params.temperature, params.top_k, params.top_p, params.min_p)
            gen = req.generator or self.generator
            ids.append(int(torch.multinomial(probs.cpu(), 1, generator=gen)))
        logprobs: list[float | None] = [None] * len(reqs)
        tops: list[list[tuple[float, int]] | None] = [None] * len(reqs)
        if any(r.return_logprob for r in reqs):
            lsm = torch.log_softmax(raw, dim=-1)
            for i, req in enumerate(reqs):
                if not req.return_logprob:
                    continue
                logprobs[i] = float(lsm[i, ids[i]])
                if req.top_logprobs_num:
                    vals, idx = torch.topk(lsm[i], req.top_logprobs_num)
                    tops[i] = [(float(v), int(t)) for v, t in zip(vals.tolist(), idx.tolist())]
        return SampleOutput(ids, logprobs, tops)


def _apply_penalties(row: torch.Tensor, req: Req, stop_ids: set[int]) -> None:
    params = req.sampling_params
    if params.repetition_penalty != 1:
        # Same rule as HF: every token seen so far (prompt and output) is made less likely.
        seen = torch.tensor(sorted(set(req.fill_ids)), dtype=torch.int64, device=row.device)
        vals = row[seen]
        row[seen] = torch.where(vals > 0, vals / params.repetition_penalty, vals * params.repetition_penalty)
    if req.output_ids and (params.frequency_penalty or params.presence_penalty):
        out = torch.tensor(req.output_ids, dtype=torch.int64, device=row.device)
        counts = torch.zeros_like(row).scatter_add_(0, out, torch.ones_like(out, dtype=row.dtype))
        row -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0).to(row.dtype)
    if len(req.output_ids) < params.min_new_tokens and stop_ids:
        row[torch.tensor(sorted(stop_ids), dtype=torch.int64, device=row.device)] = float("-inf")


def _filtered_probs(logits: torch.Tensor, top_k: int, top_p: float, min_p: float) -> torch.Tensor:
    probs = torch.softmax(logits, dim=-1)
    if top_k > 0 and top_k < probs.numel():
        kth = torch.topk(probs, top_k).values[-1]
        probs = torch.where(probs >= kth, probs, torch.zeros_like(probs))
    if top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        cum = torch.cumsum(sorted_probs, 0)
        # Keep the smallest prefix whose mass reaches top_p (the first token always survives).
        drop = (cum - sorted_probs) > top_p * cum[-1]
        sorted_probs[drop] = 0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    if min_p > 0:
        probs = torch.where(probs >= min_p * probs.max(), probs, torch.zeros_like(probs))
    return probs / probs.sum()
