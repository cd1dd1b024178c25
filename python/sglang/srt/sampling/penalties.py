"""Repetition, frequency and presence penalties and min_new_tokens, applied to a batch of next-token logits.

Two implementations with the same results: `batched` (the default) keeps each penalised request's token counts on
the logits' device, brings them up to date from the tokens it has not counted yet and penalises the whole batch
with one set of tensor ops; `per_row` is the earlier loop (a host-built index tensor per row per step), kept as the
test reference and the benchmark's baseline.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch

from sglang.srt.sampling.step_upload import KNOB, StepUpload

if TYPE_CHECKING:
    from sglang.srt.managers.schedule_batch import Req

StopIdsFor = Callable[["Req"], set[int]]


class Penalties(Protocol):
    """Plans a step's penalties on the host (adding what it needs to the step's upload), then applies them."""

    def plan(self, logits: torch.Tensor, reqs: list[Req], stop_ids_for: StopIdsFor, upload: StepUpload) -> bool:
        """Whether any row of this step is penalised (then apply() must follow, on a copy of the logits)."""

    def apply(
        self, logits: torch.Tensor, reqs: list[Req], stop_ids_for: StopIdsFor, tensors: dict[str, torch.Tensor]
    ) -> None:
        """Penalise logits in place; tensors is the step's upload, on the logits' device."""


def needs_min_new_tokens(req: Req) -> bool:
    """Whether req's stop tokens are still forbidden (it has fewer outputs than its min_new_tokens)."""
    return len(req.output_ids) < req.sampling_params.min_new_tokens


def divide_as_per_row(values: torch.Tensor, divisor: torch.Tensor) -> torch.Tensor:
    """values / divisor rounded as the per-row path rounds a division by a Python float: on CUDA that is a product
    with the float32 reciprocal (PyTorch's kernel for a host-scalar divisor), elsewhere a true division."""
    if values.device.type == "cuda":
        return values * divisor.reciprocal()
    return values / divisor


@dataclass
class _Tracked:
    """A penalised request's row in the count slabs."""

    req: Req
    slot: int
    counted: int = -1  # output tokens already in the slot; -1: the slot does not hold this request's state yet


class BatchedPenalties:
    """Per-request token counts and seen-token masks in two device slabs ([slots, vocab]), kept up to date
    incrementally: each step adds only the output tokens a request gained since the last one (a prompt's tokens go
    in once), in one upload for the whole batch. A request's slot is freed once it has finished."""

    def __init__(self) -> None:
        self.counts: torch.Tensor | None = None  # float32: how often each token is in the request's output
        self.seen: torch.Tensor | None = None  # bool: each token of the request's prompt or output
        self.tracked: dict[int, _Tracked] = {}  # id(req) -> its slot
        self.free_slots: list[int] = []
        self._pending: list[tuple[_Tracked, int]] = []  # counts that apply() makes true
        self._flags: tuple[bool, bool, bool, bool, bool] = (False,) * 5

    def plan(self, logits: torch.Tensor, reqs: list[Req], stop_ids_for: StopIdsFor, upload: StepUpload) -> bool:
        """Queue the new tokens of every penalised row and the forbidden stop tokens; whether there is any."""
        self._release_finished()
        self._pending = []
        vocab = logits.shape[-1]
        rows = [i for i, r in enumerate(reqs) if r.sampling_params.has_penalties]
        forbid_rows, forbid_tokens = _forbidden_stop_tokens(reqs, stop_ids_for, vocab)
        if not rows and not forbid_rows:
            return False
        if rows:
            self._reserve(logits.device, vocab, [reqs[i] for i in rows])
            slots, resets, seen_slots, seen_tokens, new_slots, new_tokens = [], [], [], [], [], []
            for i in rows:
                req = reqs[i]
                tracked = self._track(req)
                start = tracked.counted
                if start < 0 or start > len(req.output_ids):  # new here, or its outputs were taken back: start over
                    resets.append(tracked.slot)
                    prompt = set(req.origin_input_ids)
                    seen_slots += [tracked.slot] * len(prompt)
                    seen_tokens += prompt
                    start = 0
                fresh = req.output_ids[start:]
                new_slots += [tracked.slot] * len(fresh)
                new_tokens += fresh
                slots.append(tracked.slot)
                self._pending.append((tracked, len(req.output_ids)))
            upload.add_ints("pen_slots", slots)
            upload.add_ints("pen_resets", resets)
            upload.add_ints("pen_seen_slots", seen_slots)
            upload.add_ints("pen_seen_tokens", seen_tokens)
            upload.add_ints("pen_new_slots", new_slots)
            upload.add_ints("pen_new_tokens", new_tokens)
            if len(rows) < len(reqs):
                upload.add_ints("pen_rows", rows)
        if forbid_rows:
            upload.add_ints("forbid_rows", forbid_rows)
            upload.add_ints("forbid_tokens", forbid_tokens)
        params = [reqs[i].sampling_params for i in rows]
        self._flags = (
            bool(rows),
            any(p.repetition_penalty != 1 for p in params),
            any(p.frequency_penalty != 0 or p.presence_penalty != 0 for p in params),
            bool(forbid_rows),
            len(rows) < len(reqs),
        )
        return True

    def apply(
        self, logits: torch.Tensor, reqs: list[Req], stop_ids_for: StopIdsFor, tensors: dict[str, torch.Tensor]
    ) -> None:
        """Bring the slabs up to date, then penalise every penalised row at once and forbid early stop tokens."""
        any_rows, any_repetition, any_frequency, any_forbid, partial = self._flags
        if any_rows:
            self._update(tensors)
            slots = tensors["pen_slots"]
            knobs = tensors["knobs"]
            rows = tensors["pen_rows"] if partial else None
            if rows is not None:
                knobs = knobs.index_select(0, rows)
            sub = logits.index_select(0, rows) if rows is not None else logits
            if any_repetition:
                # As HF: every token of the prompt or the output so far is made less likely.
                penalty = knobs[:, KNOB["repetition_penalty"], None]
                seen = self.seen.index_select(0, slots)
                scaled = torch.where(sub > 0, divide_as_per_row(sub, penalty), sub * penalty)
                sub = torch.where(seen, scaled, sub)
            if any_frequency:
                counts = self.counts.index_select(0, slots)
                frequency = knobs[:, KNOB["frequency_penalty"], None]
                presence = knobs[:, KNOB["presence_penalty"], None]
                sub = sub - (frequency * counts + presence * (counts > 0).to(sub.dtype))
            if rows is not None:
                logits.index_copy_(0, rows, sub)
            elif sub is not logits:
                logits.copy_(sub)
        if any_forbid:
            logits[tensors["forbid_rows"], tensors["forbid_tokens"]] = float("-inf")

    def _update(self, tensors: dict[str, torch.Tensor]) -> None:
        resets = tensors["pen_resets"]
        if resets.numel():
            self.counts.index_fill_(0, resets, 0.0)
            self.seen.index_fill_(0, resets, False)
        if tensors["pen_seen_slots"].numel():
            self.seen[tensors["pen_seen_slots"], tensors["pen_seen_tokens"]] = True
        new_slots, new_tokens = tensors["pen_new_slots"], tensors["pen_new_tokens"]
        if new_slots.numel():
            ones = torch.ones(new_slots.numel(), dtype=self.counts.dtype, device=self.counts.device)
            self.counts.index_put_((new_slots, new_tokens), ones, accumulate=True)
            self.seen[new_slots, new_tokens] = True
        # The device work is queued: the host may now count these tokens as done (not earlier, so that a step that
        # failed before this point is redone in full by the next one).
        for tracked, counted in self._pending:
            tracked.counted = counted
        self._pending = []

    def _track(self, req: Req) -> _Tracked:
        tracked = self.tracked.get(id(req))
        if tracked is None:
            tracked = self.tracked[id(req)] = _Tracked(req, self.free_slots.pop())
        return tracked

    def _reserve(self, device: torch.device, vocab: int, reqs: list[Req]) -> None:
        """A free slot on device for each of reqs not tracked yet, growing the slabs by doubling (rows that are
        tracked keep their slots)."""
        if self.counts is not None and (self.counts.device != device or self.counts.shape[1] != vocab):
            self.counts = self.seen = None  # another device or vocabulary: the old state cannot be used
            self.tracked, self.free_slots = {}, []
        new = sum(1 for req in reqs if id(req) not in self.tracked)
        if new <= len(self.free_slots):
            return
        held = 0 if self.counts is None else self.counts.shape[0]
        size = max(2 * held, held + new - len(self.free_slots), 8)
        counts = torch.zeros(size, vocab, dtype=torch.float32, device=device)
        seen = torch.zeros(size, vocab, dtype=torch.bool, device=device)
        if held:
            counts[:held] = self.counts
            seen[:held] = self.seen
        self.counts, self.seen = counts, seen
        self.free_slots = list(range(size - 1, held - 1, -1)) + self.free_slots

    def _release_finished(self) -> None:
        for key, tracked in list(self.tracked.items()):
            if tracked.req.finished:
                del self.tracked[key]
                self.free_slots.append(tracked.slot)


def _forbidden_stop_tokens(reqs: list[Req], stop_ids_for: StopIdsFor, vocab: int) -> tuple[list[int], list[int]]:
    """(row, token) pairs, as two lists, of the stop tokens that rows short of min_new_tokens may not sample."""
    rows: list[int] = []
    tokens: list[int] = []
    for i, req in enumerate(reqs):
        if not needs_min_new_tokens(req):
            continue
        stop = sorted(stop_ids_for(req))
        if stop and (stop[0] < 0 or stop[-1] >= vocab):
            # Validation at the edge keeps these out; on a GPU an index out of range would end the process.
            raise ValueError(f"request {req.rid}: stop token id {stop[-1]} is outside the vocabulary [0, {vocab})")
        rows += [i] * len(stop)
        tokens += stop
    return rows, tokens


class PerRowPenalties:
    """The reference: each row penalised on its own, from index tensors copied from the host per row per step."""

    def plan(self, logits: torch.Tensor, reqs: list[Req], stop_ids_for: StopIdsFor, upload: StepUpload) -> bool:
        """Whether any row has a penalty or a min_new_tokens."""
        return any(r.sampling_params.has_penalties or r.sampling_params.min_new_tokens for r in reqs)

    def apply(
        self, logits: torch.Tensor, reqs: list[Req], stop_ids_for: StopIdsFor, tensors: dict[str, torch.Tensor]
    ) -> None:
        """Penalise each row of logits in place."""
        for i, req in enumerate(reqs):
            _penalise_row(logits[i], req, stop_ids_for(req))


def _penalise_row(row: torch.Tensor, req: Req, stop_ids: set[int]) -> None:
    params = req.sampling_params
    if params.repetition_penalty != 1:
        seen = torch.tensor(sorted(set(req.origin_input_ids + req.output_ids)), dtype=torch.int64, device=row.device)
        vals = row[seen]
        row[seen] = torch.where(vals > 0, vals / params.repetition_penalty, vals * params.repetition_penalty)
    if req.output_ids and (params.frequency_penalty or params.presence_penalty):
        out = torch.tensor(req.output_ids, dtype=torch.int64, device=row.device)
        counts = torch.zeros_like(row).scatter_add_(0, out, torch.ones_like(out, dtype=row.dtype))
        row -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0).to(row.dtype)
    if len(req.output_ids) < params.min_new_tokens and stop_ids:
        row[torch.tensor(sorted(stop_ids), dtype=torch.int64, device=row.device)] = float("-inf")


# Sampler(penalties=NAME) -> the implementation it uses.
PENALTY_IMPLS: dict[str, Callable[[], Penalties]] = {"batched": BatchedPenalties, "per_row": PerRowPenalties}
