"""Grammar masks filled ahead of sampling (MaskPrefetcher) against masks filled on the spot, with real xgrammar
matchers over the tiny model's tokenizer: the same bits whatever the batch, and never a stale mask."""

from __future__ import annotations

import json
import threading

import pytest
import torch
from transformers import AutoTokenizer

from sglang.srt.constrained.grammar_backend import compile_request_grammar, create_grammar_backend
from sglang.srt.constrained.mask_prefetch import MaskPrefetcher
from sglang.srt.layers.sampler import Sampler
from sglang.srt.managers.schedule_batch import Req
from sglang.srt.sampling.sampling_params import SamplingParams
from sglang.test.test_utils import tiny_model

SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "pattern": "^[a-z]{1,6}$"}, "n": {"type": "integer"}},
    "required": ["name", "n"],
    "additionalProperties": False,
}
GRAMMARS = [{"json_schema": json.dumps(SCHEMA)}, {"regex": "[a-z]{2,5}-[0-9]{2}"}, {}, {"ebnf": 'root ::= "a"+ "b"'}]


@pytest.fixture(scope="module")
def backend():
    path = tiny_model("llama")
    tokenizer = AutoTokenizer.from_pretrained(path)
    return create_grammar_backend("xgrammar", lambda: tokenizer, 512, {tokenizer.eos_token_id})


def _reqs(backend, specs: list[dict]) -> list[Req]:
    reqs = []
    for i, spec in enumerate(specs):
        params = SamplingParams(temperature=0, **spec)
        req = Req(rid=str(i), origin_input_ids=[1], sampling_params=params)
        compiled = compile_request_grammar(backend, params)
        req.grammar = backend.matcher(compiled) if compiled is not None else None
        reqs.append(req)
    return reqs


def _direct(backend, reqs: list[Req], rows: list[int]) -> torch.Tensor:
    """The reference: each row filled on its own, at sampling time."""
    bitmask = backend.new_masks(len(reqs))
    for i in rows:
        backend.fill_masks(bitmask, [i], [reqs[i].grammar])
    return bitmask


def _advance(reqs: list[Req], rows: list[int], bitmask: torch.Tensor, rng: torch.Generator) -> None:
    """Accept, for each row, a random token its mask allows (its grammar moves on as sampling would move it)."""
    for i in rows:
        bits = bitmask[i]
        allowed = [t for t in range(512) if (int(bits[t // 32]) >> (t % 32)) & 1]
        if reqs[i].grammar.terminated or not allowed:
            continue
        assert reqs[i].grammar.accept(allowed[int(torch.randint(len(allowed), (1,), generator=rng))])
        if reqs[i].grammar.terminated:
            reqs[i].finished_reason = {"type": "stop"}  # as the sampler ends it


def test_prefetched_masks_equal_masks_filled_at_sampling_step_after_step(backend):
    reqs = _reqs(backend, GRAMMARS * 3)
    prefetcher = MaskPrefetcher(backend, enabled=True)
    rng = torch.Generator().manual_seed(0)
    taken = 0
    for _ in range(8):
        reqs = [r for r in reqs if not r.finished]
        rows = [i for i, r in enumerate(reqs) if r.grammar is not None]
        prefetcher.start(reqs)
        got = prefetcher.take(reqs, rows)
        assert torch.equal(got[rows], _direct(backend, reqs, rows)[rows])
        _advance(reqs, rows, got, rng)
        taken += len(rows)
    assert prefetcher.prefetched_rows == taken and prefetcher.filled_rows == 0


def test_a_subset_of_the_prefetched_batch_and_rows_it_missed(backend):
    """The sampler may get a subset of the forward's batch (rows still prefilling drop out) or rows the prefetch
    did not see; each row still gets its own request's mask."""
    reqs = _reqs(backend, GRAMMARS * 2)
    prefetcher = MaskPrefetcher(backend, enabled=True)
    prefetcher.start(reqs[:5])
    subset = [reqs[1], reqs[4], reqs[6], reqs[7], reqs[3]]  # 6 is free; 7 was not prefetched
    rows = [i for i, r in enumerate(subset) if r.grammar is not None]
    got = prefetcher.take(subset, rows)
    assert torch.equal(got[rows], _direct(backend, subset, rows)[rows])
    assert prefetcher.prefetched_rows == 3 and prefetcher.filled_rows == 1


def test_a_mask_is_filled_again_once_its_grammar_has_moved_on(backend):
    reqs = _reqs(backend, GRAMMARS)
    rows = [i for i, r in enumerate(reqs) if r.grammar is not None]
    prefetcher = MaskPrefetcher(backend, enabled=True)
    before = _direct(backend, reqs, rows)
    prefetcher.start(reqs)
    prefetcher._fill.done.result(timeout=30)  # the fill has ended: the grammar may move without a race
    _advance(reqs, [0], before, torch.Generator().manual_seed(1))
    got = prefetcher.take(reqs, rows)
    assert not torch.equal(got[0], before[0])  # the JSON mask after the first token is not the first one
    assert torch.equal(got[rows], _direct(backend, reqs, rows)[rows])
    assert prefetcher.filled_rows == 1 and prefetcher.prefetched_rows == len(rows) - 1


def test_the_sampler_uses_the_prefetch_and_matches_sampling_without_it(backend):
    """Greedy steps as the scheduler runs them (prefetch, then sample): the same tokens as with prefetching off,
    and every mask came from the prefetch."""

    def run(prefetch: bool) -> tuple[list[list[int]], MaskPrefetcher]:
        reqs = _reqs(backend, GRAMMARS * 2)
        sampler = Sampler(0, lambda req: {2}, backend)
        sampler.masks.enabled = prefetch
        gen = torch.Generator().manual_seed(4)
        steps = []
        for _ in range(6):
            live = [r for r in reqs if not (r.grammar is not None and r.grammar.terminated)]
            sampler.prefetch_masks(live)
            out = sampler(torch.randn(len(live), 512, generator=gen), live)
            for req, t, done in zip(live, out.token_ids, out.grammar_finish):
                req.output_ids.append(t)
                if done is not None:
                    req.finished_reason = done
            steps.append(out.token_ids)
        return steps, sampler.masks

    with_prefetch, masks = run(True)
    without, plain = run(False)
    assert with_prefetch == without
    assert masks.filled_rows == 0 and masks.prefetched_rows > 0
    assert plain.prefetched_rows == 0 and plain.filled_rows == masks.prefetched_rows


def test_a_failed_prefetch_leaves_the_masks_to_sampling_time(backend):
    """A fill that raises on the worker thread is logged; take() fills the masks itself and they are right."""

    class WorkerFails(type(backend)):
        def fill_masks(self, bitmask, rows, matchers):
            if threading.current_thread() is not threading.main_thread():
                raise RuntimeError("fill failed on the worker")
            super().fill_masks(bitmask, rows, matchers)

    failing = WorkerFails(backend._tokenizer, backend.vocab_size, backend.stop_token_ids)
    reqs = _reqs(failing, GRAMMARS)
    rows = [i for i, r in enumerate(reqs) if r.grammar is not None]
    prefetcher = MaskPrefetcher(failing, enabled=True)
    prefetcher.start(reqs)
    got = prefetcher.take(reqs, rows)
    assert torch.equal(got[rows], _direct(backend, reqs, rows)[rows])
    assert prefetcher.filled_rows == len(rows) and prefetcher.prefetched_rows == 0
