"""Overlap scheduling gives the same outputs as running each step to its end (--disable-overlap-schedule).

One request set goes through an Engine with overlap on and through one with it off: greedy and seeded requests,
stop strings and stop token ids taken from a first run's outputs, max_new_tokens from 1 up, a prompt longer than the
prefill chunk, requests whose sampling needs the host (penalties, min_new_tokens, logprobs) in the same batches, and
a KV pool too small for the batch, so requests are retracted and prefilled again. Both runs must agree token for
token, finish reason for finish reason.
"""

from __future__ import annotations

import pytest

import sglang

# The pool holds a few requests at a time: the batch below needs several times more, so decode steps retract.
SMALL_POOL = {"max_total_tokens": 320, "chunked_prefill_size": 32, "max_running_requests": 16}


def _prompts() -> list[list[int]]:
    short = [[(17 * i + 5 * j) % 400 + 3 for j in range(6 + 3 * i)] for i in range(10)]
    long = [[(11 * j) % 300 + 7 for j in range(90)]]  # three prefill chunks
    return short + long


def _run(model: str, overlap: bool, requests: list[tuple[list[int], dict]], tp: int = 1, **flags) -> list[dict]:
    with sglang.Engine(model_path=model, tp_size=tp, disable_overlap_schedule=not overlap, **flags) as engine:
        outs = engine.generate(input_ids=[ids for ids, _ in requests], sampling_params=[p for _, p in requests])
        logprob_outs = engine.generate(
            input_ids=[ids for ids, _ in requests[:3]],
            sampling_params={"temperature": 0, "max_new_tokens": 6, "ignore_eos": True},
            return_logprob=True,
            top_logprobs_num=2,
        )
        _assert_no_slot_held(engine)
    return [_essentials(o) for o in outs + logprob_outs]


def _assert_no_slot_held(engine: sglang.Engine) -> None:
    """Once every request ended, each KV slot is free or in the (unlocked) radix cache: none leaked, also not the
    slots of steps whose tokens were discarded because their request had already finished."""
    load = engine.get_server_info()
    assert load["num_running_reqs"] == load["num_waiting_reqs"] == 0, load
    assert load["available_kv_tokens"] + load["evictable_kv_tokens"] == load["max_total_num_tokens"], load


def _essentials(out: dict) -> dict:
    meta = out["meta_info"]
    keep = {"output_ids": out["output_ids"], "finish_reason": meta["finish_reason"]}
    for key in ("output_token_logprobs", "output_top_logprobs"):
        if key in meta:
            keep[key] = meta[key]
    return keep


def _assert_same(plain: list[dict], overlapped: list[dict]) -> None:
    """Same tokens and finish reasons; logprobs equal up to float rounding (the two runs' radix caches hold different
    prefixes, since a request that ended under overlap also leaves the KV of the discarded step, so the same prompt
    may be computed in different pieces)."""
    assert len(plain) == len(overlapped)
    for i, (a, b) in enumerate(zip(plain, overlapped)):
        assert a["output_ids"] == b["output_ids"], f"request {i}: tokens differ"
        assert a["finish_reason"] == b["finish_reason"], f"request {i}: finish reasons differ"
        assert a.keys() == b.keys()
        if "output_token_logprobs" in a:
            assert [t for _, t in a["output_token_logprobs"]] == [t for _, t in b["output_token_logprobs"]]
            assert [v for v, _ in a["output_token_logprobs"]] == pytest.approx(
                [v for v, _ in b["output_token_logprobs"]], rel=1e-4, abs=1e-5
            )
            for top_a, top_b in zip(a["output_top_logprobs"], b["output_top_logprobs"]):
                assert [t for _, t in top_a] == [t for _, t in top_b]
                assert [v for v, _ in top_a] == pytest.approx([v for v, _ in top_b], rel=1e-4, abs=1e-5)


def _request_set(model: str) -> list[tuple[list[int], dict]]:
    """Requests whose stop strings and stop ids occur in their greedy outputs (taken from a first, plain run)."""
    prompts = _prompts()
    greedy = {"temperature": 0, "max_new_tokens": 24, "ignore_eos": True}
    with sglang.Engine(model_path=model, disable_overlap_schedule=True) as engine:
        first = engine.generate(input_ids=prompts[:4], sampling_params=greedy)
    requests: list[tuple[list[int], dict]] = []
    for i, limit in enumerate([1, 2, 3, 7, 40]):
        requests.append((prompts[i], {"temperature": 0, "max_new_tokens": limit, "ignore_eos": True}))
    for i in range(2):  # stop strings that occur part-way through the greedy text
        text = first[i]["text"]
        stop = text[len(text) // 2 : len(text) // 2 + 3]
        assert stop, text
        requests.append((prompts[i], {**greedy, "stop": [stop]}))
    stop_id = first[2]["output_ids"][10]
    requests.append((prompts[2], {**greedy, "stop_token_ids": [stop_id]}))
    requests.append((prompts[5], {"temperature": 0.9, "top_p": 0.9, "seed": 1234, "max_new_tokens": 30}))
    requests.append((prompts[6], {"temperature": 0.7, "seed": 99, "max_new_tokens": 30, "ignore_eos": True}))
    requests.append((prompts[7], {**greedy, "frequency_penalty": 0.5, "repetition_penalty": 1.2}))
    requests.append((prompts[8], {"temperature": 0, "max_new_tokens": 12, "min_new_tokens": 8}))
    requests.append((prompts[10], {**greedy, "max_new_tokens": 30}))  # the chunked prompt
    requests.append((prompts[9], {"temperature": 0, "max_new_tokens": 60}))  # EOS may end it
    return requests


@pytest.fixture(scope="module")
def model(tiny_model_dir) -> str:
    return tiny_model_dir("llama")


@pytest.fixture(scope="module")
def requests(model) -> list[tuple[list[int], dict]]:
    return _request_set(model)


def test_overlap_equals_plain_steps_under_retraction_and_chunking(model, requests):
    needed = sum(len(ids) + params["max_new_tokens"] for ids, params in requests)
    assert needed > SMALL_POOL["max_total_tokens"]  # the batch cannot fit at once: decode steps retract (logged)
    plain = _run(model, False, requests, **SMALL_POOL)
    overlapped = _run(model, True, requests, **SMALL_POOL)
    assert len(plain) == len(requests) + 3
    # The set must exercise what it claims: stops hit part-way, limits hit exactly.
    reasons = [o["finish_reason"] for o in plain]
    assert any(r["type"] == "stop" and isinstance(r["matched"], str) for r in reasons), reasons
    assert any(r["type"] == "stop" and isinstance(r["matched"], int) for r in reasons), reasons
    assert [len(o["output_ids"]) for o in plain[:5]] == [1, 2, 3, 7, 40]
    _assert_same(plain, overlapped)


def test_overlap_equals_plain_steps_roomy_pool(model, requests):
    """Without memory pressure (no retraction, one chunk per prompt) the two still agree."""
    _assert_same(_run(model, False, requests), _run(model, True, requests))


def test_overlap_equals_plain_steps_tp2(model, requests):
    """Rank 0's device-side choice reaches the other rank (a broadcast on the TP group) as the next step's input."""
    subset = requests[:5] + requests[8:10]
    _assert_same(_run(model, False, subset, tp=2), _run(model, True, subset, tp=2))


def test_abort_mid_stream(model):
    """A request dropped by its client part-way ends at once; what it got is the start of its full answer, and the
    next requests (with the discarded in-flight step's slot back in the pool) are served as before."""
    params = {"temperature": 0, "max_new_tokens": 200, "ignore_eos": True}
    prompt = _prompts()[3]
    with sglang.Engine(model_path=model, stream_interval=1) as engine:  # overlap scheduling is the default
        full = engine.generate(input_ids=prompt, sampling_params=params)["output_ids"]
        chunks = engine.generate(input_ids=prompt, sampling_params=params, stream=True)
        seen: list[int] = []
        for chunk in chunks:
            seen = chunk["output_ids"]
            if len(seen) >= 5:
                break
        chunks.close()
        assert 5 <= len(seen) < len(full) and seen == full[: len(seen)]
        assert engine.generate(input_ids=prompt, sampling_params=params)["output_ids"] == full
        _assert_no_slot_held(engine)


def _in_process_scheduler(model: str, overlap: bool):
    import zmq

    from sglang.srt.managers.scheduler import Scheduler
    from sglang.srt.server_args import PortArgs, ServerArgs

    args = ServerArgs(model_path=model, device="cpu", max_total_tokens=256, disable_overlap_schedule=not overlap)
    port_args = PortArgs.init_new(args)
    sink = zmq.Context.instance().socket(zmq.PULL)  # takes the outputs the scheduler sends
    sink.bind(port_args.tokenizer_ipc_name)
    return Scheduler(args, port_args, 0, 0), sink


@pytest.mark.parametrize("overlap", [False, True])
def test_length_limit_takes_no_extra_step(model, overlap):
    """A request of n tokens takes one prefill and n - 1 decode steps with overlap too: a token known (while still in
    flight) to be its last by length is not decoded again; every slot is back once it ends."""
    from sglang.srt.managers.io_struct import TokenizedGenerateReqInput
    from sglang.srt.sampling.sampling_params import SamplingParams

    sched, sink = _in_process_scheduler(model, overlap)
    try:
        params = SamplingParams(temperature=0, max_new_tokens=5, ignore_eos=True)
        sched.process_input(TokenizedGenerateReqInput("r0", _prompts()[2], params))
        req = sched.waiting[0]
        for _ in range(50):
            if not sched.step_once():
                break
        assert len(req.output_ids) == 5 and req.finished_reason["type"] == "length"
        assert sched.batch_stats.decode_steps == 4
        assert sched.allocator.available_size() + sched.tree_cache.evictable_size() == sched.max_total_num_tokens
    finally:
        sched.recv_sock.close(linger=0)
        sched.send_sock.close(linger=0)
        sink.close(linger=0)
