"""Turn next-token logits into token ids: penalties, temperature, top-k/top-p/min-p, seeded sampling."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from sglang.srt.constrained.mask_prefetch import MaskPrefetcher
from sglang.srt.sampling.penalties import PENALTY_IMPLS, Penalties
from sglang.srt.sampling.step_upload import KNOB, StepUpload, knob_row

if TYPE_CHECKING:
    from sglang.srt.constrained.grammar_backend import GrammarBackend
    from sglang.srt.managers.schedule_batch import Req

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
    seed draw from their own generator, so their tokens do not depend on what else is in the batch. The step's
    per-row knobs and penalty indices reach the device in one pinned copy per dtype (StepUpload)."""

    def __init__(
        self,
        seed: int,
        stop_ids_for: callable,
        grammar_backend: GrammarBackend | None = None,
        penalties: str = "batched",
    ) -> None:
        self.seed = seed
        self.generators: dict[torch.device, torch.Generator] = {}
        self.stop_ids_for = stop_ids_for
        self.grammar_backend = grammar_backend
        if penalties not in PENALTY_IMPLS:
            raise ValueError(f"penalties={penalties!r} is not one of {', '.join(PENALTY_IMPLS)}")
        self.penalties: Penalties = PENALTY_IMPLS[penalties]()
        self.masks = MaskPrefetcher(grammar_backend) if grammar_backend is not None else None

    def prefetch_masks(self, reqs: list[Req]) -> None:
        """Start filling the grammar masks of reqs' constrained rows on a worker thread; call right before the
        forward whose logits this sampler gets next, so the fill runs while the device computes them."""
        if self.masks is not None:
            self.masks.start(reqs)

    def __call__(self, logits: torch.Tensor, reqs: list[Req]) -> SampleOutput:
        logits = logits.float()
        raw = logits  # logprobs are those of the model, before biases, penalties and grammars
        vocab = logits.shape[-1]
        biased = [i for i, r in enumerate(reqs) if r.sampling_params.logit_bias]
        constrained = [i for i, r in enumerate(reqs) if r.grammar is not None]
        sampled = [i for i, r in enumerate(reqs) if not r.sampling_params.is_greedy]
        upload = StepUpload()
        penalised = self.penalties.plan(logits, reqs, self.stop_ids_for, upload)
        if sampled or penalised:
            upload.add_floats("knobs", [knob_row(r.sampling_params, vocab) for r in reqs])
        if sampled and len(sampled) < len(reqs):
            upload.add_ints("sampled_rows", sampled)
        tensors = upload.upload(logits.device)
        if biased or penalised or constrained:
            logits = logits.clone()
        if biased:
            _apply_logit_bias(logits, biased, reqs)
        if penalised:
            self.penalties.apply(logits, reqs, self.stop_ids_for, tensors)
        if constrained:
            # Usually filled while the forward ran (prefetch_masks); only the constrained rows are touched.
            bitmask = self.masks.take(reqs, constrained)
            self.grammar_backend.apply_masks(logits, bitmask, constrained)
        chosen = self._choose(logits, reqs, sampled, tensors)
        ids: list[int] = chosen.tolist()
        grammar_finish: list[dict[str, Any] | None] = [None] * len(reqs)
        for i in constrained:
            grammar_finish[i] = _advance_grammar(reqs[i], ids[i], lambda i=i: bool(torch.isneginf(logits[i, ids[i]])))
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

    def choose_on_device(self, logits: torch.Tensor, reqs: list[Req]) -> torch.Tensor:
        """One token id per row, left on the device (no host copy, no wait), for rows without grammar, penalties,
        min_new_tokens or logit_bias (overlap scheduling samples only those this way): the same draws as calling
        the sampler."""
        logits = logits.float()
        sampled = [i for i, r in enumerate(reqs) if not r.sampling_params.is_greedy]
        upload = StepUpload()
        if sampled:
            upload.add_floats("knobs", [knob_row(r.sampling_params, logits.shape[-1]) for r in reqs])
            if len(sampled) < len(reqs):
                upload.add_ints("sampled_rows", sampled)
        return self._choose(logits, reqs, sampled, upload.upload(logits.device))

    def _choose(
        self, logits: torch.Tensor, reqs: list[Req], sampled: list[int], tensors: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """Argmax for greedy rows, a draw for the `sampled` rows (their knobs in tensors), on the device."""
        if len(sampled) == len(reqs):
            return self._sample(logits, reqs, tensors["knobs"])
        chosen = logits.argmax(dim=-1)
        if sampled:
            rows = tensors["sampled_rows"]
            knobs = tensors["knobs"].index_select(0, rows)
            picked = self._sample(logits.index_select(0, rows), [reqs[i] for i in sampled], knobs)
            chosen.index_copy_(0, rows, picked)
        return chosen

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

    def _sample(self, logits: torch.Tensor, reqs: list[Req], knobs: torch.Tensor) -> torch.Tensor:
        """One token per row of logits [n, vocab], all rows at once, with each request's temperature and filters
        (knobs: their [n, len(KNOB_COLUMNS)] values on the device): one uniform draw per row, located in the row's
        cumulative probabilities (what torch.multinomial does for a single sample, batched and without a host
        copy)."""
        params = [r.sampling_params for r in reqs]
        device = logits.device
        probs = torch.softmax(logits / knobs[:, KNOB["temperature"], None], dim=-1)
        order = None
        if any(p.top_k > 0 or p.top_p < 1.0 or p.min_p > 0 for p in params):
            vocab = probs.shape[-1]
            max_k = max(p.top_k if 0 < p.top_k < vocab else vocab for p in params)
            probs, order = _filtered_sorted(probs, max_k, knobs)
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


def _advance_grammar(req: Req, token_id: int, masked_out: Callable[[], bool]) -> dict[str, Any] | None:
    """Feed the chosen token to req's grammar; a finish reason if the grammar is done (or broken), else None.
    masked_out says whether the chosen token's logit was forbidden (asked only when the grammar refuses it)."""
    if not req.grammar.accept(token_id):
        # The output would no longer match, so it ends here. The usual cause: the mask allowed no token at all (no
        # token of this vocabulary can continue the grammar), and the pick over an all -inf row is arbitrary.
        if masked_out():
            message = (
                "structured output: no token of this model's vocabulary can continue the grammar here; "
                "loosen the grammar or check that its tokens can be produced by this tokenizer"
            )
            logger.warning("request %s: %s", req.rid, message)
        else:
            message = f"structured output: the grammar rejected token {token_id}"
            logger.error("request %s: the grammar rejected token %d that its own mask allowed", req.rid, token_id)
        return {"type": "abort", "message": message}
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


# Largest top_k served from torch.topk instead of a sort of the whole vocabulary.
TOPK_INSTEAD_OF_SORT = 1024


def _filtered_sorted(probs: torch.Tensor, max_k: int, knobs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's probabilities from high to low with top-k, then top-p (of what top-k kept), then min-p (against
    the top one) applied, and the tokens in that order; max_k is the largest top_k of the rows (the vocabulary
    size if one keeps all). The top token always survives; rows need not sum to 1."""
    if max_k <= TOPK_INSTEAD_OF_SORT:
        sorted_probs, order = torch.topk(probs, max_k, dim=-1)  # every row has a small top_k
    else:
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
    top_k, top_p, min_p = (knobs[:, KNOB[name], None] for name in ("top_k", "top_p", "min_p"))
    rank = torch.arange(sorted_probs.shape[-1], device=probs.device, dtype=torch.float32)
    sorted_probs = sorted_probs.masked_fill(rank >= top_k, 0.0)
    cum = sorted_probs.cumsum(dim=-1)
    # Keep the smallest prefix whose mass reaches top_p: a token goes if what comes before it already exceeds it.
    sorted_probs = sorted_probs.masked_fill(cum - sorted_probs > top_p * cum[:, -1:], 0.0)
    sorted_probs = sorted_probs.masked_fill(sorted_probs < min_p * sorted_probs[:, :1], 0.0)
    return sorted_probs, order
