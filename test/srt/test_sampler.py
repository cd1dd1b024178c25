"""The Sampler against the distributions it should draw from: many identical rows in one batch give the frequencies,
on the CPU and (where there is one) on a GPU, since sampling runs on the logits' device."""

from __future__ import annotations

import pytest
import torch

from sglang.srt.layers.sampler import Sampler
from sglang.srt.managers.schedule_batch import Req
from sglang.srt.sampling.sampling_params import SamplingParams

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
