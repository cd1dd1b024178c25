"""--page-size: KV slots handed out in pages keep every request's tokens page-aligned, and serving is unchanged.

The invariant checked throughout: for request row r and position j, req_to_token[r, j] // P is the page holding
token j and req_to_token[r, j] % P == j % P; page 0 (the scratch slot's page) is never handed out; a page holds
tokens of one request only, unless it is a whole page shared through the radix cache.
"""

from __future__ import annotations

import logging
import random

import pytest
import torch
import zmq

import sglang
from sglang.srt.managers.io_struct import TokenizedGenerateReqInput
from sglang.srt.mem_cache.allocator import TokenToKVPoolAllocator
from sglang.srt.mem_cache.radix_cache import RadixCache
from sglang.srt.sampling.sampling_params import SamplingParams
from sglang.srt.server_args import PortArgs, ServerArgs, ServerArgsError, prepare_server_args

CPU = torch.device("cpu")
SHARED = list(range(10, 40))  # a 30-token prefix that several prompts repeat (radix reuse)
PROMPTS = [
    SHARED + [50, 51, 52],
    SHARED + [60, 61, 62, 63, 64, 65, 66],
    list(range(100, 117)),
    [7, 8, 9],
    SHARED[:13] + [70, 71],
]
MAX_NEW = 21  # crosses several page boundaries at page sizes 4 and 16
GREEDY = {"temperature": 0, "max_new_tokens": MAX_NEW, "ignore_eos": True}


# ---- the allocator ----------------------------------------------------------------------------------------------


class _Requests:
    """Requests that grow in batches through alloc_extend / alloc_decode as the scheduler drives them; each one's
    slots kept per position."""

    def __init__(self, allocator: TokenToKVPoolAllocator) -> None:
        self.allocator = allocator
        self.slots: dict[int, list[int]] = {}

    def extend(self, lens: dict[int, int]) -> bool:
        ids = list(lens)
        held = [self.slots.get(i, []) for i in ids]
        prefix, last = [len(h) for h in held], [h[-1] if h else 0 for h in held]
        if all(n == 1 for n in lens.values()) and all(held):
            got = self.allocator.alloc_decode(prefix, last)
        else:
            got = self.allocator.alloc_extend(prefix, [lens[i] for i in ids], last)
        if got is None:
            return False
        out, newest = got
        for i, part in zip(ids, out.split([lens[i] for i in ids])):
            self.slots.setdefault(i, []).extend(part.tolist())
        assert newest == [self.slots[i][-1] for i in ids]
        return True

    def free(self, i: int) -> None:
        self.allocator.free(torch.tensor(self.slots.pop(i)))


def _assert_aligned(slots: list[int], page_size: int) -> None:
    """Token j at offset j % P of its page; a page filled before the next; never page 0."""
    for j, slot in enumerate(slots):
        assert slot % page_size == j % page_size, (j, slots)
        assert slot // page_size == slots[j - j % page_size] // page_size, (j, slots)
        assert slot >= page_size, slots


def _assert_pages_partition(allocator: TokenToKVPoolAllocator, held: list[set[int]]) -> None:
    """Free pages and each holder's pages are disjoint and together are every page 1..num_pages."""
    free = allocator.free_pages.tolist()
    seen = set(free)
    assert len(seen) == len(free), "a page is on the free list twice"
    for pages in held:
        assert not pages & seen, "a page is held twice (or held and free)"
        seen |= pages
    assert seen == set(range(1, allocator.num_pages + 1))


def test_pages_stay_aligned_across_interleaved_requests() -> None:
    page = 4
    allocator = TokenToKVPoolAllocator(20 * page - 1, CPU, page_size=page)  # pages 1..19
    assert (allocator.num_pages, allocator.size, allocator.available_size()) == (19, 76, 76)
    reqs, rng, next_id, refused = _Requests(allocator), random.Random(0), 0, 0
    for _ in range(400):
        op = rng.random()
        if op < 0.3 or not reqs.slots:
            ok = reqs.extend({next_id: rng.randint(1, 11)})
            next_id += ok
        elif op < 0.8:
            batch = rng.sample(sorted(reqs.slots), k=rng.randint(1, len(reqs.slots)))
            decode = rng.random() < 0.5
            ok = reqs.extend({i: 1 if decode else rng.randint(1, 6) for i in batch})
        else:
            reqs.free(rng.choice(sorted(reqs.slots)))
            ok = True
        if not ok:  # out of memory: None, nothing taken; make room
            refused += 1
            reqs.free(rng.choice(sorted(reqs.slots)))
        for slots in reqs.slots.values():
            _assert_aligned(slots, page)
        _assert_pages_partition(allocator, [{s // page for s in slots} for slots in reqs.slots.values()])
    assert refused > 5  # the pool ran full often enough to test refusals
    for i in list(reqs.slots):
        reqs.free(i)
    assert allocator.available_size() == allocator.size


def test_out_of_memory_returns_none_and_takes_nothing() -> None:
    allocator = TokenToKVPoolAllocator(4 * 4 - 1, CPU, page_size=4)  # 3 pages
    first = allocator.alloc(5)  # two pages, the second one partly used
    assert first is not None and allocator.available_size() == 4
    # 3 more tokens of that request fit in its page; 4 more need a page; 8 more need two: refused.
    assert allocator.alloc_extend([5], [8], [int(first[-1])]) is None
    assert allocator.available_size() == 4
    more = allocator.alloc_extend([5], [7], [int(first[-1])])
    assert more is not None and more[0].tolist() == [9, 10, 11, 12, 13, 14, 15] and allocator.available_size() == 0
    assert allocator.alloc(1) is None
    assert allocator.alloc_decode([12], [15]) is None  # position 12 starts a page: none left
    assert allocator.alloc_decode([7], [11]) == (torch.tensor([12]), [12])  # page 3 still has room


def test_free_returns_whole_pages() -> None:
    allocator = TokenToKVPoolAllocator(6 * 4 - 1, CPU, page_size=4)  # 5 pages
    slots = allocator.alloc(6)
    assert slots is not None and slots.tolist() == [4, 5, 6, 7, 8, 9]  # pages 1 and 2, from page 1 on
    allocator.free(slots[4:])  # the partly used page: two slots free all of page 2
    assert allocator.available_size() == 16
    allocator.free(slots[:4])
    assert allocator.available_size() == 20 == allocator.size
    assert sorted(allocator.free_pages.tolist()) == [1, 2, 3, 4, 5]


@pytest.mark.parametrize("page_size", [1, 4])
def test_a_page_freed_twice_is_not_handed_out_twice(page_size: int, caplog) -> None:
    """A double free is logged and ignored: the page must not reach two requests through the free list."""
    allocator = TokenToKVPoolAllocator(6 * 4 - 1, CPU, page_size=page_size)
    slots = allocator.alloc(4)
    allocator.free(slots)
    free_before = sorted(allocator.free_pages.tolist())
    with caplog.at_level(logging.ERROR, logger="sglang.srt.mem_cache.allocator"):
        allocator.free(slots)
    assert "double free" in caplog.text
    assert sorted(allocator.free_pages.tolist()) == free_before
    taken = allocator.alloc(allocator.size)
    assert taken is not None and len(set(taken.tolist())) == allocator.size  # every slot exactly once


def test_page_size_one_is_the_plain_slot_allocator() -> None:
    allocator = TokenToKVPoolAllocator(8, CPU)
    assert (allocator.page_size, allocator.size) == (1, 8)
    assert allocator.alloc(3).tolist() == [1, 2, 3]  # slot 0 is scratch
    out, newest = allocator.alloc_extend([3, 0], [1, 2], [3, 0])
    assert out.tolist() == [4, 5, 6] and newest == [4, 6]
    assert allocator.alloc(3) is None and allocator.available_size() == 2


def test_requests_that_get_no_tokens_keep_their_newest_slot() -> None:
    allocator = TokenToKVPoolAllocator(8 * 4 - 1, CPU, page_size=4)
    out, newest = allocator.alloc_extend([0, 6, 2], [3, 0, 1], [0, 77, 9])
    assert out.tolist() == [4, 5, 6, 10] and newest == [6, 77, 10]
    out, newest = allocator.alloc_extend([6], [0], [77])
    assert out.numel() == 0 and newest == [77]


def test_too_small_pool_is_refused_with_the_flags_to_change() -> None:
    with pytest.raises(ValueError, match="--page-size"):
        TokenToKVPoolAllocator(30, CPU, page_size=16)  # 31 slots: page 0 and no whole page after it


# ---- the radix cache --------------------------------------------------------------------------------------------


def _cache(page: int = 4) -> tuple[TokenToKVPoolAllocator, RadixCache]:
    allocator = TokenToKVPoolAllocator(16 * page - 1, CPU, page_size=page)
    return allocator, RadixCache(allocator)


def test_radix_insert_keeps_whole_pages_only() -> None:
    allocator, cache = _cache()
    tokens = list(range(100, 110))  # two whole pages and half of a third
    slots = allocator.alloc(10)
    assert cache.insert(tokens, slots) == 0
    assert cache.total_size() == cache.evictable_size() == 8
    matched, _ = cache.match_prefix(tokens + [1, 2, 3])
    assert matched.tolist() == slots[:8].tolist()


def test_radix_matches_are_page_aligned() -> None:
    allocator, cache = _cache()
    tokens = list(range(100, 112))  # three pages
    slots = allocator.alloc(12)
    cache.insert(tokens, slots)
    for shared, expect in ((12, 12), (11, 8), (6, 4), (3, 0), (1, 0)):
        matched, _ = cache.match_prefix(tokens[:shared] + [7] * 9)
        assert matched.tolist() == slots[:expect].tolist(), shared
    # A sequence sharing 6 tokens splits the edge after one page; it inserts its own pages from there on.
    other = tokens[:6] + [1, 2, 3, 4, 5, 6]
    other_slots = allocator.alloc(12)
    assert cache.insert(other, other_slots) == 4
    assert cache.total_size() == 12 + 8
    matched, _ = cache.match_prefix(other)
    assert matched.tolist() == slots[:4].tolist() + other_slots[4:12].tolist()
    for node in cache._nodes():
        assert len(node.key) % 4 == 0 and node.value.numel() == len(node.key)


def test_radix_eviction_frees_whole_pages() -> None:
    allocator, cache = _cache()
    a, b = list(range(100, 108)), list(range(200, 210))
    slots_a, slots_b = allocator.alloc(8), allocator.alloc(10)
    cache.insert(a, slots_a)
    cache.insert(b, slots_b)
    allocator.free(slots_b[8:])  # the partial page is freed by its owner, not cached
    _, node = cache.match_prefix(a)
    cache.inc_lock_ref(node)  # a is in use: only b can go
    before = allocator.available_size()
    assert cache.evict(1) == 8  # a whole leaf of whole pages
    assert allocator.available_size() == before + 8
    assert cache.evict(100) == 0 and cache.total_size() == 8
    cache.dec_lock_ref(node)
    assert cache.evict(100) == 8 and allocator.available_size() == allocator.size


# ---- the scheduler, in process: the invariant after every step ------------------------------------------------------


def _check_scheduler_pages(sched) -> None:
    page = sched.page_size
    table = sched.runner.req_to_token_pool.req_to_token
    tree = set()
    for node in sched.tree_cache._nodes():
        _assert_aligned(node.value.tolist(), page)
        tree |= {s // page for s in node.value.tolist()}
    live = sched.running + [
        r for r in [sched.chunked_req, *sched.waiting] if r is not None and r.req_pool_idx is not None
    ]
    owned = []
    for req in live:
        row = table[req.req_pool_idx, : req.kv_len].tolist()
        _assert_aligned(row, page)
        assert {s // page for s in row[: req.cached_len]} <= tree
        owned.append({s // page for s in row[req.cached_len :]})
    _assert_pages_partition(sched.allocator, [tree, *owned])


def _serve_in_process(sched, prompts: list[list[int]]) -> list[list[int]]:
    reqs = []
    for i, prompt in enumerate(prompts):
        params = SamplingParams(temperature=0, max_new_tokens=MAX_NEW, ignore_eos=True)
        sched.process_input(TokenizedGenerateReqInput(f"r{i}", prompt, params))
        reqs.append(sched.waiting[-1])
    idle = 0
    for _ in range(2000):
        if not (sched.waiting or sched.running or sched.chunked_req):
            return [r.output_ids for r in reqs]
        step = sched.get_next_batch()
        # A step that retracts every running request runs nothing; the next one must.
        idle = idle + 1 if step is None else 0
        assert idle < 2, "requests wait but nothing can run"
        if step is not None:
            sched.run_batch(*step)
        _check_scheduler_pages(sched)
    raise AssertionError("requests did not finish")


def test_scheduler_keeps_pages_aligned_under_memory_pressure(tiny_model_dir, reference, caplog) -> None:
    from sglang.srt.managers.scheduler import Scheduler

    # 60 usable slots for five requests of up to 58 tokens; 10-token chunks end inside pages.
    args = ServerArgs(
        model_path=tiny_model_dir("llama"), device="cpu", page_size=4, max_total_tokens=64, chunked_prefill_size=10
    )
    port_args = PortArgs.init_new(args)
    sink = zmq.Context.instance().socket(zmq.PULL)  # takes the outputs the scheduler sends
    sink.bind(port_args.tokenizer_ipc_name)
    sched = Scheduler(args, port_args, 0, 0)
    try:
        with caplog.at_level(logging.WARNING, logger="sglang.srt.managers.scheduler"):
            assert _serve_in_process(sched, PROMPTS) == reference
            assert _serve_in_process(sched, PROMPTS[::-1]) == reference[::-1]  # now with cached pages to reuse
        assert "retracted" in caplog.text
        assert sched.allocator.available_size() + sched.tree_cache.evictable_size() == sched.max_total_num_tokens
    finally:
        sched.recv_sock.close(linger=0)
        sched.send_sock.close(linger=0)
        sink.close(linger=0)


def test_bench_driver_allocates_pages(tiny_model_dir, reference) -> None:
    from sglang import bench_one_batch

    runner = bench_one_batch.make_runner(
        ServerArgs(model_path=tiny_model_dir("llama"), device="cpu", page_size=4, max_total_tokens=512)
    )
    driver = bench_one_batch.BatchDriver(runner)
    driver.start(PROMPTS)
    driver.extend(max_tokens=2)  # a first chunk that ends inside a page (every prompt is longer)
    tokens = bench_one_batch.greedy(driver.extend())
    outs = [[t] for t in tokens]
    for _ in range(MAX_NEW - 1):
        tokens = bench_one_batch.greedy(driver.decode(tokens))
        for out, t in zip(outs, tokens):
            out.append(t)
    table = runner.req_to_token_pool.req_to_token
    for req in driver.reqs:
        _assert_aligned(table[req.req_pool_idx, : req.kv_len].tolist(), 4)
    driver.finish()
    assert outs == reference
    assert runner.token_to_kv_pool_allocator.available_size() == runner.token_to_kv_pool_allocator.size


# ---- the Engine end to end --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference(tiny_model_dir) -> list[list[int]]:
    """Greedy outputs with one slot per page (today's allocation)."""
    with sglang.Engine(model_path=tiny_model_dir("llama")) as engine:
        return [o["output_ids"] for o in engine.generate(input_ids=PROMPTS, sampling_params=GREEDY)]


@pytest.mark.parametrize("page_size", [4, 16])
def test_engine_outputs_equal_page_size_one(tiny_model_dir, reference, page_size) -> None:
    with sglang.Engine(model_path=tiny_model_dir("llama"), page_size=page_size) as engine:
        # One at a time: later prompts reuse the whole pages of SHARED that earlier ones left in the cache.
        solo = [engine.generate(input_ids=p, sampling_params=GREEDY) for p in PROMPTS]
        assert [o["output_ids"] for o in solo] == reference
        cached = [o["meta_info"]["cached_tokens"] for o in solo]
        assert cached[1] > 0 and all(c % page_size == 0 for c in cached)
        assert engine.flush_cache()
        batch = engine.generate(input_ids=PROMPTS, sampling_params=GREEDY)
        assert [o["output_ids"] for o in batch] == reference
        info = engine.get_server_info()
        assert info["max_total_num_tokens"] % page_size == 0
        assert info["available_kv_tokens"] + info["evictable_kv_tokens"] == info["max_total_num_tokens"]


def test_engine_small_pool_retracts_and_still_matches(tiny_model_dir, reference, capfd) -> None:
    # Seven or eight pages of 16 for five requests of up to 58 tokens: the first ones are prefilled together and
    # outgrow the pool while decoding, so requests are retracted and their cached pages evicted.
    path = tiny_model_dir("llama")
    with sglang.Engine(model_path=path, page_size=16, max_total_tokens=128, log_level="warning") as engine:
        batch = engine.generate(input_ids=PROMPTS, sampling_params=GREEDY)
        assert [o["output_ids"] for o in batch] == reference
        assert engine.get_server_info()["max_total_num_tokens"] <= 128
    assert "retracted" in capfd.readouterr().err


# ---- the flag -----------------------------------------------------------------------------------------------------


def test_invalid_page_size_is_a_clear_error(tiny_model_dir) -> None:
    path = tiny_model_dir("llama")
    with pytest.raises(ServerArgsError, match=r"--page-size must be an integer >= 1 .* got 0"):
        ServerArgs(model_path=path, page_size=0)
    with pytest.raises(ServerArgsError, match="--page-size must be"):
        prepare_server_args(["--model-path", path, "--page-size", "-4"])
    with pytest.raises(ServerArgsError, match="--page-size"):
        prepare_server_args(["--model-path", path, "--page-size", "four"])
    with pytest.raises(ServerArgsError, match="less than one page"):
        ServerArgs(model_path=path, page_size=64, max_total_tokens=32)
    with pytest.raises(ServerArgsError, match="--page-size"):
        sglang.Engine(model_path=path, page_size=0)
    assert prepare_server_args(["--model-path", path, "--page-size", "16"]).page_size == 16
