"""Turn next-token logits into token ids: penalties, temperature, top-k/top-p/min-p, seeded sampling."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from sglang.srt.constrained.grammar_backend import GrammarBackend
    from sglang.srt.managers.schedule_batch import Req
    from sglang.srt.sampling.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


@dataclass
class SampleOutput:
    """Chosen tokens and, where asked, their log-probabilities."""

    token_ids: list[int | None]
    logprobs: list[float | None]
    top_logprobs: list[list[tuple[float, int]] | None]
    # Per row, a finish reason that the row's grammar decided (complete, or a token it could not accept), else None.
    grammar_finish: list[dict[str, Any] | None] = field(default_factory=list)
    errors: dict[int, str] = field(default_factory=dict)  # row -> why it could not be sampled (no token then)


class Sampler:
    """Samples one token per request, on the logits' device, with one device-to-host copy per batch. Rows with a
    seed draw from their own generator, so their tokens do not depend on what else is in the batch."""

    def __init__(self, seed: int, stop_ids_for: callable, grammar_backend: GrammarBackend | None = None) -> None:
        self.seed = seed
        self.generators: dict[torch.device, torch.Generator] = {}
        self.stop_ids_for = stop_ids_for
        self.grammar_backend = grammar_backend

    def __call__(self, logits: torch.Tensor, reqs: list[Req]) -> SampleOutput:
        logits = logits.float()
        raw = logits  # logprobs are those of the model, before biases, penalties and grammars
        biased = [i for i, r in enumerate(reqs) if r.sampling_params.logit_bias]
        penalised = any(r.sampling_params.has_penalties or r.sampling_params.min_new_tokens for r in reqs)
        constrained = [i for i, r in enumerate(reqs) if r.grammar is not None]
        if biased or penalised or constrained:
            logits = logits.clone()
        if biased:
            _apply_logit_bias(logits, biased, reqs)
        if penalised:
            for i, req in enumerate(reqs):
                _apply_penalties(logits[i], req, self.stop_ids_for(req))
        if constrained:
            # Masks are filled on the host while earlier device work may still run (nothing has synchronised yet),
            # and only for the constrained rows; free rows of the batch are not touched.
            self.grammar_backend.apply_masks(logits, constrained, [reqs[i].grammar for i in constrained])
        chosen = logits.argmax(dim=-1)  # the answer for greedy rows
        sampled = [i for i, r in enumerate(reqs) if not r.sampling_params.is_greedy]
        if sampled:
            rows = sampled if len(sampled) < len(reqs) else slice(None)
            chosen[rows] = self._sample(logits[rows], [reqs[i] for i in sampled])
        ids: list[int] = chosen.tolist()
        grammar_finish: list[dict[str, Any] | None] = [None] * len(reqs)
        for i in constrained:
            grammar_finish[i] = _advance_grammar(reqs[i], ids[i])
        logprobs: list[float | None] = [None] * len(reqs)
        tops: list[list[tuple[float, int]] | None] = [None] * len(reqs)
        if any(r.return_logprob for r in reqs):
            # Whole-batch gathers and one top-k, then one host copy each: per row, every float() would sync.
            lsm = torch.log_softmax(raw, dim=-1)
            chosen_logprobs = lsm.gather(1, chosen[:, None]).squeeze(1).tolist()
            k = max(r.top_logprobs_num for r in reqs if r.return_logprob)
            top_vals, top_ids = [], []
            if k:
                vals, idx = lsm.topk(k, dim=-1)
                top_vals, top_ids = vals.tolist(), idx.tolist()
            for i, req in enumerate(reqs):
                if not req.return_logprob:
                    continue
                logprobs[i] = chosen_logprobs[i]
                if req.top_logprobs_num:
                    n = req.top_logprobs_num
                    tops[i] = list(zip(top_vals[i][:n], top_ids[i][:n]))
        return SampleOutput(ids, logprobs, tops, grammar_finish)

    def sample_guarded(self, logits: torch.Tensor, reqs: list[Req]) -> SampleOutput:
        """As calling the sampler, but a request whose row cannot be sampled (input that slipped past validation, a
        bug) is reported in `errors` instead of raising: it ends alone, and the scheduler goes on serving the rest."""
        try:
            return self(logits, reqs)
        except Exception:
            logger.exception("Sampling a batch of %d failed; sampling its requests one at a time", len(reqs))
        out = SampleOutput([], [], [])
        for i, req in enumerate(reqs):
            try:
                one = self(logits[i : i + 1], [req])
            except Exception as e:
                out.errors[i] = f"sampling failed: {type(e).__name__}: {e}"
                one = SampleOutput([None], [None], [None], grammar_finish=[None])
            out.token_ids += one.token_ids
            out.logprobs += one.logprobs
            out.top_logprobs += one.top_logprobs
            out.grammar_finish += one.grammar_finish
        return out

    def _sample(self, logits: torch.Tensor, reqs: list[Req]) -> torch.Tensor:
        """One token per row of logits [n, vocab], all rows at once, with each request's temperature and filters:
        one uniform draw per row, located in the row's cumulative probabilities (what torch.multinomial does for a
        single sample, batched and without a host copy)."""
        params = [r.sampling_params for r in reqs]
        device = logits.device
        temperature = torch.tensor([p.temperature for p in params], dtype=torch.float32).to(device, non_blocking=True)
        probs = torch.softmax(logits / temperature[:, None], dim=-1)
        order = None
        if any(p.top_k > 0 or p.top_p < 1.0 or p.min_p > 0 for p in params):
            probs, order = _filtered_sorted(probs, params)
        draws = torch.rand(len(reqs), 1, device=device, generator=self._generator(device))
        for row, req in enumerate(reqs):
            seed = req.sampling_params.seed
            if seed is not None:
                if req.generator is None or req.generator.device != device:
                    req.generator = torch.Generator(device=device).manual_seed(seed)
                draws[row] = torch.rand(1, device=device, generator=req.generator)
        cum = probs.cumsum(dim=-1)
        pick = torch.searchsorted(cum, draws * cum[:, -1:], right=True).clamp_max_(probs.shape[-1] - 1)
        # Rounding can put a draw at the very top of a row, past its last possible token: take the likeliest then.
        pick = torch.where(probs.gather(1, pick) > 0, pick, probs.argmax(dim=-1, keepdim=True))
        return (pick if order is None else order.gather(1, pick)).squeeze(1)

    def _generator(self, device: torch.device) -> torch.Generator:
        # One per device, seeded with --random-seed (only rank 0 samples; the others take its choice).
        if device not in self.generators:
            self.generators[device] = torch.Generator(device=device).manual_seed(self.seed)
        return self.generators[device]


def _advance_grammar(req: Req, token_id: int) -> dict[str, Any] | None:
    """Feed the chosen token to req's grammar; a finish reason if the grammar is done (or broken), else None."""
    if not req.grammar.accept(token_id):
        # Cannot happen with the mask applied; if it did, the output would no longer match, so it ends here.
        logger.error("request %s: the grammar rejected token %d that its own mask allowed", req.rid, token_id)
        return {"type": "abort", "message": f"structured output: the grammar rejected token {token_id}"}
    if req.grammar.terminated:
        return {"type": "stop", "matched": token_id}
    return None


def _apply_logit_bias(logits: torch.Tensor, rows: list[int], reqs: list[Req]) -> None:
    """Add each request's logit_bias to its row: one scatter for the whole batch."""
    pairs = [(i, int(token), bias) for i in rows for token, bias in reqs[i].sampling_params.logit_bias.items()]
    index = torch.tensor([[i for i, _, _ in pairs], [t for _, t, _ in pairs]], dtype=torch.int64)
    values = torch.tensor([b for _, _, b in pairs], dtype=logits.dtype)
    index, values = index.to(logits.device, non_blocking=True), values.to(logits.device, non_blocking=True)
    logits.index_put_((index[0], index[1]), values, accumulate=True)


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


# Largest top_k served from torch.topk instead of a sort of the whole vocabulary.
TOPK_INSTEAD_OF_SORT = 1024


def _filtered_sorted(probs: torch.Tensor, params: list[SamplingParams]) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's probabilities from high to low with top-k, then top-p (of what top-k kept), then min-p (against
    the top one) applied, and the tokens in that order. The top token always survives; rows need not sum to 1."""
    device = probs.device
    vocab = probs.shape[-1]
    top_k = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]
    if max(top_k) <= TOPK_INSTEAD_OF_SORT:
        sorted_probs, order = torch.topk(probs, max(top_k), dim=-1)  # every row has a small top_k
    else:
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
    knobs = torch.tensor([[k, p.top_p, p.min_p] for k, p in zip(top_k, params)], dtype=torch.float32)
    knobs = knobs.to(device, non_blocking=True)
    top_k_t, top_p, min_p = knobs[:, 0:1], knobs[:, 1:2], knobs[:, 2:3]
    rank = torch.arange(sorted_probs.shape[-1], device=device, dtype=torch.float32)
    sorted_probs = sorted_probs.masked_fill(rank >= top_k_t, 0.0)
    cum = sorted_probs.cumsum(dim=-1)
    # Keep the smallest prefix whose mass reaches top_p: a token goes if what comes before it already exceeds it.
    sorted_probs = sorted_probs.masked_fill(cum - sorted_probs > top_p * cum[:, -1:], 0.0)
    sorted_probs = sorted_probs.masked_fill(sorted_probs < min_p * sorted_probs[:, :1], 0.0)
    return sorted_probs, order
