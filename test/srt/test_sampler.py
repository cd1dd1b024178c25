"""The Sampler against the distributions it should draw from: many identical rows in one batch give the frequencies,
on the CPU and (where there is one) on a GPU, since sampling runs on the logits' device."""

from __future__ import annotations

import pytest
import torch

from sglang.srt.layers.sampler import Sampler
from sglang.srt.managers.schedule_batch import Req
from sglang.srt.sampling.penalties import PENALTY_IMPLS, BatchedPenalties
from sglang.srt.sampling.sampling_params import SamplingParams
from sglang.srt.sampling.step_upload import StepUpload, knob_row

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
ROWS = 40000  # frequencies within about 0.005 of the probabilities (3 sigma at p = 0.5)
# Probabilities 0.5, 0.3, 0.15, 0.05 (as logits), then three tokens that can never be drawn.
PROBS = torch.tensor([0.5, 0.3, 0.15, 0.05, 0.0, 0.0, 0.0])


def _reqs(n: int, **params) -> list[Req]:
    return [Req(rid=str(i), origin_input_ids=[1], sampling_params=SamplingParams(**params)) for i in range(n)]


def _frequencies(device: str, probs: torch.Tensor = PROBS, **params) -> torch.Tensor:
    logits = probs.log().to(device).expand(ROWS, -1).contiguous()
    ids = Sampler(0, lambda req: set())(logits, _reqs(ROWS, **params)).token_ids
    return torch.bincount(torch.tensor(ids), minlength=probs.numel()).float() / ROWS


def _close(got: torch.Tensor, want: list[float]) -> None:
    want_t = torch.tensor(want + [0.0] * (got.numel() - len(want)))
    assert torch.allclose(got, want_t, atol=0.012), (got.tolist(), want)


@pytest.mark.parametrize("device", DEVICES)
def test_plain_sampling_follows_the_softmax(device):
    _close(_frequencies(device), [0.5, 0.3, 0.15, 0.05])


@pytest.mark.parametrize("device", DEVICES)
def test_temperature_sharpens(device):
    sharp = PROBS[:4] ** 2  # temperature 0.5 squares the probabilities, then renormalizes
    _close(_frequencies(device, temperature=0.5), (sharp / sharp.sum()).tolist())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "params,want",
    [
        ({"top_k": 2}, [0.625, 0.375]),
        ({"top_p": 0.7}, [0.625, 0.375]),  # 0.5 is short of 0.7; 0.5 + 0.3 reaches it
        ({"top_p": 0.45}, [1.0]),
        ({"top_p": 0.5}, [0.625, 0.375]),  # as upstream: a token goes only when what precedes it exceeds top_p
        ({"top_p": 0.8, "top_k": 3}, [0.625, 0.375]),  # top-p of what top-k kept: 0.8 > 0.8 * 0.95 drops the third
        ({"top_p": 0.85, "top_k": 3}, [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95]),  # 0.8 <= 0.85 * 0.95 keeps it
        ({"min_p": 0.35}, [0.625, 0.375]),  # keeps p >= 0.175
        ({"min_p": 0.25}, [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95]),  # keeps p >= 0.125
        ({"min_p": 0.2, "top_k": 3}, [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95]),
    ],
)
def test_filters(device, params, want):
    _close(_frequencies(device, **params), want)


@pytest.mark.parametrize("device", DEVICES)
def test_greedy_rows_take_the_argmax_beside_sampled_ones(device):
    logits = torch.randn(6, 1000, device=device)
    reqs = _reqs(3, temperature=0.0) + _reqs(3, temperature=1.0)
    ids = Sampler(0, lambda req: set())(logits, reqs).token_ids
    assert ids[:3] == logits[:3].argmax(dim=-1).tolist()


@pytest.mark.parametrize("device", DEVICES)
def test_a_seeded_request_draws_the_same_whatever_shares_its_batch(device):
    torch.manual_seed(0)
    logits = torch.randn(5, 50000, device=device)

    def draws(rows: list[int], seeded_at: int, steps: int = 8) -> list[int]:
        reqs = _reqs(len(rows), top_p=0.95)
        reqs[seeded_at].sampling_params.seed = 1234
        sampler = Sampler(len(rows), lambda req: set())  # a different default generator each time
        return [sampler(logits[rows], reqs).token_ids[seeded_at] for _ in range(steps)]

    alone = draws([2], 0)
    assert draws([0, 1, 2, 3], 2) == alone
    assert draws([2, 4], 0) == alone
    assert len(set(alone)) > 1  # the row really is sampled, step after step


@pytest.mark.parametrize("device", DEVICES)
def test_logprobs_of_each_row(device):
    logits = torch.randn(4, 300, device=device)
    reqs = _reqs(4, temperature=0.0)
    for req, (want, k) in zip(reqs, [(True, 0), (False, 0), (True, 5), (True, 2)]):
        req.return_logprob, req.top_logprobs_num = want, k
    out = Sampler(0, lambda req: set())(logits, reqs)
    lsm = torch.log_softmax(logits.float(), dim=-1).cpu()
    assert out.logprobs[1] is None and out.top_logprobs[1] is None and out.top_logprobs[0] is None
    for i in (0, 2, 3):
        assert out.logprobs[i] == pytest.approx(float(lsm[i, out.token_ids[i]]), abs=1e-5)
    for i, k in ((2, 5), (3, 2)):
        vals, ids = lsm[i].topk(k)
        assert [t for _, t in out.top_logprobs[i]] == ids.tolist()
        assert [v for v, _ in out.top_logprobs[i]] == pytest.approx(vals.tolist(), abs=1e-5)


# ---- penalties: the batched device path against the per-row reference ---------------------------------------------

PENALTY_PARAMS = [
    {},
    {"repetition_penalty": 1.3},
    {"repetition_penalty": 0.7},
    {"frequency_penalty": 0.5},
    {"presence_penalty": -1.2},
    {"frequency_penalty": -0.4, "presence_penalty": 0.9},
    {"repetition_penalty": 1.9, "frequency_penalty": 1.5, "presence_penalty": 0.3},
    {"min_new_tokens": 3},
    {"min_new_tokens": 2, "stop_token_ids": [5, 7], "repetition_penalty": 1.1},
    {"temperature": 0.8, "top_p": 0.9, "frequency_penalty": 0.2},
]


def _penalised(logits: torch.Tensor, reqs: list[Req], impl: str) -> torch.Tensor:
    """logits after the penalties of impl (one planned and applied step, as the Sampler runs it)."""
    penalties = PENALTY_IMPLS[impl]() if isinstance(impl, str) else impl
    upload = StepUpload()
    out = logits.clone()
    stop_ids_for = _stop_ids_for
    if penalties.plan(out, reqs, stop_ids_for, upload):
        upload.add_floats("knobs", [knob_row(r.sampling_params, out.shape[-1]) for r in reqs])
        penalties.apply(out, reqs, stop_ids_for, upload.upload(out.device))
    return out


def _stop_ids_for(req: Req) -> set[int]:
    return {2, *req.sampling_params.stop_token_ids}


@pytest.mark.parametrize("device", DEVICES)
def test_batched_penalties_equal_the_per_row_reference_step_after_step(device):
    """Requests come and go (slots are reused, the slabs grow past their first size), batches are subsets of the
    running requests, and outputs grow by one token a step: every step's penalised logits equal the reference's."""
    rng = torch.Generator().manual_seed(7)
    vocab = 97
    batched = BatchedPenalties()
    live: list[Req] = []
    next_id = 0
    for step in range(40):
        while len(live) < 12 and torch.rand(1, generator=rng).item() < 0.6:
            params = PENALTY_PARAMS[next_id % len(PENALTY_PARAMS)]
            prompt = torch.randint(0, vocab, (int(torch.randint(1, 30, (1,), generator=rng)),), generator=rng)
            live.append(
                Req(rid=f"r{next_id}", origin_input_ids=prompt.tolist(), sampling_params=SamplingParams(**params))
            )
            next_id += 1
        batch = [r for r in live if torch.rand(1, generator=rng).item() < 0.8] or live[:1]
        logits = (torch.randn(len(batch), vocab, generator=rng) * 4).to(device)
        logits[0, 3] = 0.0  # a zero logit: the repetition penalty's branch point
        got = _penalised(logits, batch, batched)
        want = _penalised(logits, batch, "per_row")
        if device == "cpu":
            assert torch.equal(got, want), f"step {step}: rows differ at {(got != want).nonzero().tolist()[:5]}"
        else:
            # CUDA kernels may contract a multiply-add of the batched form into one rounding: a float32 ulp or so.
            finite = torch.isfinite(want)
            assert torch.equal(finite, torch.isfinite(got)) and torch.equal(got[~finite], want[~finite])
            worst = (got[finite] - want[finite]).abs().max().item() if finite.any() else 0.0
            assert worst <= 1e-5, f"step {step}: largest difference {worst} at {(got != want).nonzero().tolist()[:5]}"
        for req in batch:  # the next token, often one already seen, so that counts exceed 1
            pool = req.origin_input_ids + req.output_ids
            pick = pool[int(torch.randint(len(pool), (1,), generator=rng))] if step % 3 else int(logits[0].argmax())
            req.output_ids.append(pick)
        for req in list(live):
            if len(req.output_ids) > 6 and torch.rand(1, generator=rng).item() < 0.3:
                req.finished_reason = {"type": "length"}
                live.remove(req)
    penalised = sum(SamplingParams(**PENALTY_PARAMS[i % len(PENALTY_PARAMS)]).has_penalties for i in range(next_id))
    assert 8 < batched.counts.shape[0] < penalised  # the slabs grew past their first size, and slots were reused


@pytest.mark.parametrize("device", DEVICES)
def test_batched_penalties_start_over_when_outputs_are_taken_back(device):
    """A request whose output list got shorter than what was counted is counted again from its prompt."""
    batched = BatchedPenalties()
    req = Req(rid="a", origin_input_ids=[1, 2, 3], sampling_params=SamplingParams(frequency_penalty=1.0,
              repetition_penalty=1.5))  # fmt: skip
    req.output_ids = [4, 4, 5]
    logits = torch.randn(1, 10).to(device)
    assert torch.equal(_penalised(logits, [req], batched), _penalised(logits, [req], "per_row"))
    req.output_ids = [6]
    assert torch.equal(_penalised(logits, [req], batched), _penalised(logits, [req], "per_row"))


@pytest.mark.parametrize("device", DEVICES)
def test_sampler_tokens_equal_with_either_penalty_path(device):
    """Whole sampler steps, greedy and seeded rows beside penalised ones: the same tokens from both paths."""
    torch.manual_seed(3)
    vocab = 500

    def run(impl: str) -> list[list[int]]:
        reqs = [
            Req(rid=str(i), origin_input_ids=list(range(i, i + 20)), sampling_params=SamplingParams(**params))
            for i, params in enumerate(
                [
                    {"temperature": 0, "repetition_penalty": 1.8},
                    {"temperature": 0, "frequency_penalty": 2.0, "presence_penalty": 1.0},
                    {"temperature": 0.9, "seed": 11, "repetition_penalty": 1.2, "top_k": 40},
                    {"temperature": 0, "min_new_tokens": 4, "stop_token_ids": [0]},
                    {"temperature": 0},
                ]
            )
        ]
        sampler = Sampler(0, _stop_ids_for, penalties=impl)
        gen = torch.Generator().manual_seed(5)
        steps = []
        for _ in range(12):
            logits = torch.randn(len(reqs), vocab, generator=gen).to(device)
            logits[3, 0] = logits[3, 2] = 10.0  # stop tokens that win unless forbidden
            ids = sampler(logits, reqs).token_ids
            for req, t in zip(reqs, ids):
                req.output_ids.append(t)
            steps.append(ids)
        return steps

    batched, per_row = run("batched"), run("per_row")
    assert batched == per_row
    assert all(step[3] not in (0, 2) for step in batched[:4])  # min_new_tokens held the stop tokens back
    assert batched[4][3] in (0, 2)
    assert len(set(step[0] for step in batched)) > 3  # the repetition penalty moved the greedy row around
