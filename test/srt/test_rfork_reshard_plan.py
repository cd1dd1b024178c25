"""Topology-changing R-Fork planning, in one process: layouts of disk-loaded TP ranks, the read plan of a client
rank of another TP size, executed with the real executor over an in-process byte copy (the Mooncake transport is
covered by test_rfork_topology.py), must rebuild the disk-loaded tensors of the target layout bit for bit."""

from __future__ import annotations

import ctypes
import json
import threading

import pytest
import torch

from sglang.srt.configs.load_config import LoadConfig
from sglang.srt.configs.model_config import ModelConfig
from sglang.srt.distributed import parallel_state
from sglang.srt.model_loader.loader import DefaultModelLoader, build_model_skeleton
from sglang.srt.model_loader.transfer_engine_reshard import (
    ReshardError,
    bad_blocks,
    parse_shards,
    plan_all,
    zero_padding,
)
from sglang.srt.model_loader.transfer_engine_reshard_read import all_checks, read_rank, warm_kernels
from sglang.srt.remote_instance import block_checksum
from sglang.srt.remote_instance.block_checksum import ROW_WORDS, block_sums, digests, range_digests
from sglang.srt.remote_instance.manifest import weight_tensors
from sglang.srt.remote_instance.shard_layout import model_layouts, published_layout


def _as_rank(tp: int, rank: int, fn):
    saved = parallel_state._TP
    parallel_state._TP = parallel_state.TPGroup(rank=rank, size=tp, device=torch.device("cpu"))
    try:
        return fn()
    finally:
        parallel_state._TP = saved


def disk_model(path: str, tp: int, rank: int):
    config = ModelConfig.from_path(path)
    return _as_rank(tp, rank, lambda: DefaultModelLoader(LoadConfig()).load_model(config, torch.device("cpu")))


def skeleton(path: str, tp: int, rank: int):
    config = ModelConfig.from_path(path)
    return _as_rank(tp, rank, lambda: build_model_skeleton(config, torch.device("cpu")))


def memmove(entries, owner) -> int:
    for e in entries:
        ctypes.memmove(e.local_addr, e.remote_addr, e.length)
    return sum(e.length for e in entries)


def fork(
    path: str,
    seeds: list,
    client_tp: int,
    rank: int,
    scratch_bytes: int = 1 << 20,
    read=memmove,
    after_publish=None,
    device: torch.device | None = None,
):
    """Client rank `rank` of TP client_tp built from the seed models; returns (model, plans, bad tensor names)."""
    seed_tp = len(seeds)
    published = [
        json.loads(json.dumps(_as_rank(seed_tp, r, lambda m=m, r=r: published_layout(m, r, seed_tp))))
        for r, m in enumerate(seeds)
    ]
    if after_publish is not None:
        after_publish(seeds)  # e.g. a seed's byte changes after its checksums were published
    weights = [{n: [t.data_ptr(), t.numel(), t.element_size()] for n, t in weight_tensors(m)} for m in seeds]
    shards = {r: parse_shards(p["tensors"], weights[r]) for r, p in enumerate(published)}
    dtypes = {r: {n: str(t.dtype).removeprefix("torch.") for n, t in weight_tensors(m)} for r, m in enumerate(seeds)}
    model = skeleton(path, client_tp, rank)
    if device is not None:
        model.to(device)
    tensors = dict(weight_tensors(model))
    with torch.no_grad():
        for t in tensors.values():
            t.fill_(7.0)  # whatever the plan leaves untouched shows up as a mismatch
    layouts = _as_rank(client_tp, rank, lambda: model_layouts(model))
    prefer = [(rank + k) % seed_tp for k in range(seed_tp)]
    plans = plan_all(tensors, layouts, shards, dtypes, prefer)
    results = []
    for r, plan in plans.items():
        ptrs = {n: w[0] for n, w in weights[r].items()}
        results.append(read_rank(plan, shards[r], ptrs, tensors, read, True, scratch_bytes=scratch_bytes))
        assert results[-1].moved == plan.nbytes
    bad = set(bad_blocks(all_checks(results)))  # in-place blocks of all seed ranks summed together, as verify does
    zero_padding(tensors, layouts)  # the fork's own padding step
    return model, plans, bad


@pytest.fixture(scope="module")
def models(tiny_model_dir):
    return {
        "llama": tiny_model_dir("llama", num_heads=4, num_kv_heads=2, vocab_size=500),
        "qwen3": tiny_model_dir("qwen3", num_heads=4, num_kv_heads=2),
        "qwen3_moe": tiny_model_dir("qwen3_moe", num_heads=4, num_kv_heads=2),
    }


@pytest.mark.parametrize("arch", ["llama", "qwen3", "qwen3_moe"])
@pytest.mark.parametrize("seed_tp,client_tp", [(2, 1), (1, 2), (1, 4), (4, 1), (4, 2), (2, 4)])
@pytest.mark.parametrize("block_bytes", ["1", None])
def test_fork_rebuilds_disk_loaded_target_layout(models, arch, seed_tp, client_tp, block_bytes, monkeypatch):
    if block_bytes:
        monkeypatch.setenv("SGLANG_RFORK_MIN_BLOCK_BYTES", block_bytes)  # many blocks: in-place reads happen
    path = models[arch]
    seeds = [disk_model(path, seed_tp, r) for r in range(seed_tp)]
    direct = staged = 0
    for rank in range(client_tp):
        model, plans, bad = fork(path, seeds, client_tp, rank)
        assert not bad
        target = dict(weight_tensors(disk_model(path, client_tp, rank)))
        got = dict(weight_tensors(model))
        assert got.keys() == target.keys()
        for name in target:
            assert torch.equal(got[name], target[name]), name
        direct += sum(len(p.direct) for p in plans.values())
        staged += sum(len(p.staged) for p in plans.values())
    assert staged > 0  # row-parallel weights are strided on any TP change
    if block_bytes and client_tp > seed_tp:
        assert direct > 0


def test_one_block_per_round_still_rebuilds_the_target(models):
    """Scratch smaller than any block: every staged block is a round of its own (the scratch buffers take turns)."""
    path = models["qwen3"]
    seeds = [disk_model(path, 1, 0)]
    model, plans, bad = fork(path, seeds, 2, 1, scratch_bytes=1)
    assert not bad and sum(len(p.staged) for p in plans.values()) > 2
    target = dict(weight_tensors(disk_model(path, 2, 1)))
    assert all(torch.equal(t, target[n]) for n, t in weight_tensors(model))


def test_read_that_fails_midway_raises_and_leaves_no_thread(models):
    path = models["qwen3"]
    seeds = [disk_model(path, 1, 0)]
    calls = []

    def failing(entries, owner):
        calls.append(len(entries))
        if len(calls) == 3:
            raise RuntimeError("link went down")
        return memmove(entries, owner)

    with pytest.raises(RuntimeError, match="link went down"):
        fork(path, seeds, 2, 1, scratch_bytes=1, read=failing)
    assert len(calls) == 3  # nothing read after the failure
    assert not [t for t in threading.enumerate() if t.name == "reshard-reader"]


def test_corrupted_seed_byte_is_caught(models):
    path = models["qwen3"]
    seeds = [disk_model(path, 1, 0)]
    layouts = published_layout(seeds[0], 0, 1)  # checksums of the good bytes
    name = "model.layers.0.mlp.down_proj.weight"
    with torch.no_grad():
        dict(weight_tensors(seeds[0]))[name].view(-1)[5] += 1.0  # the seed's bytes change after publishing
    weights = {n: [t.data_ptr(), t.numel(), t.element_size()] for n, t in weight_tensors(seeds[0])}
    shards = {0: parse_shards(layouts["tensors"], weights)}
    dtypes = {0: {n: "float32" for n in weights}}
    model = skeleton(path, 2, 1)
    tensors = dict(weight_tensors(model))
    plans = plan_all(tensors, _as_rank(2, 1, lambda: model_layouts(model)), shards, dtypes, [0])
    result = read_rank(plans[0], shards[0], {n: w[0] for n, w in weights.items()}, tensors, memmove, True)
    assert bad_blocks(all_checks([result])) == [name]


@pytest.mark.parametrize("name", ["model.layers.0.self_attn.qkv_proj.weight", "model.layers.1.mlp.down_proj.weight"])
def test_corrupted_byte_of_one_seed_rank_is_caught_in_place_and_staged(models, name, monkeypatch):
    """TP2 seed -> TP1 client with many small blocks: qkv is read in place (its blocks from both seed ranks summed
    together), down_proj through scratch; a byte of seed rank 1 changed after publishing is caught either way."""
    monkeypatch.setenv("SGLANG_RFORK_MIN_BLOCK_BYTES", "1")
    path = models["qwen3"]
    seeds = [disk_model(path, 2, r) for r in range(2)]

    def corrupt(models_):
        with torch.no_grad():
            dict(weight_tensors(models_[1]))[name].view(-1)[3] += 1.0

    _, plans, bad = fork(path, seeds, 1, 0, after_publish=corrupt)
    assert bad == {name}
    assert any(d.name == name for p in plans.values() for d in p.direct) == ("qkv" in name)


@pytest.mark.parametrize("digest", ["XYZ", "0123456789ABCDEF", "0" * 17, 7])
def test_malformed_published_digest_is_refused_before_any_read(models, digest):
    """A digest bad_blocks could not compare is refused where the seed's layout is parsed, naming the tensor."""
    seed = disk_model(models["qwen3"], 1, 0)
    published = json.loads(json.dumps(published_layout(seed, 0, 1)))["tensors"]
    name = "model.layers.0.mlp.down_proj.weight"
    published[name]["blocks"][0][2] = digest
    weights = {n: [t.data_ptr(), t.numel(), t.element_size()] for n, t in weight_tensors(seed)}
    with pytest.raises(ReshardError, match=f"malformed shard layout of {name}"):
        parse_shards(published, weights)


def test_other_model_is_refused_by_name(models, tiny_model_dir):
    other = tiny_model_dir("qwen3", num_heads=4, num_kv_heads=2, intermediate_size=64)
    seed = disk_model(models["qwen3"], 1, 0)
    with pytest.raises(ReshardError, match="gate_up_proj.weight: seed rank 0 holds shape"):
        fork(other, [seed], 2, 0)


def test_block_digests_batched_equal_single_and_catch_swaps():
    gen = torch.Generator().manual_seed(0)
    size = 8 * ROW_WORDS * 4  # 4 rows of words per block
    raw = torch.randint(0, 256, (3 * size + 8 * 5 + 3,), dtype=torch.uint8, generator=gen)
    ranges = [(raw, i * size, (i + 1) * size) for i in range(3)] + [(raw, 3 * size, raw.numel()), (raw, 3, 1003)]
    batched = range_digests(ranges)  # the first three go through the batched path
    assert batched == digests([block_sums(raw[lo:hi]) for _, lo, hi in ranges])
    assert len(set(batched)) == len(ranges)
    words = raw[:size].view(torch.int64).view(4, ROW_WORDS)
    base = range_digests([(raw, 0, size)])
    for (r1, c1), (r2, c2) in [((0, 5), (2, 5)), ((1, 3), (1, 700)), ((0, 0), (3, 1023))]:
        changed = words.clone()
        changed[r1, c1], changed[r2, c2] = words[r2, c2], words[r1, c1]
        assert range_digests([(changed.view(-1).view(torch.uint8), 0, size)]) != base


@pytest.mark.parametrize("gather_bytes", [1, 3 * 8 * ROW_WORDS * 2, 1 << 30])
def test_torch_block_sums_of_runs_from_many_tensors_keep_their_order(gather_bytes, monkeypatch):
    """Runs of one block size in several tensors are copied side by side and summed together (in batches of at
    most GATHER_BYTES); rows come back in the order asked, beside blocks summed one by one."""
    monkeypatch.setattr(block_checksum, "GATHER_BYTES", gather_bytes)
    gen = torch.Generator().manual_seed(1)
    block = 8 * ROW_WORDS * 2  # 2 rows of words
    ranges = []
    for _ in range(4):
        t = torch.randint(0, 256, (8 * block + 77,), dtype=torch.uint8, generator=gen)
        ranges += [(t, 0, 2 * block), (t, 2 * block, 4 * block), (t, 4 * block, 5 * block), (t, 5 * block, 8 * block)]
        ranges += [(t, 8 * block, 8 * block + 77), (t, 3, 8003)]
    got = block_checksum.RangeSums(ranges)()
    assert got.shape == (len(ranges), 5)
    for (raw, lo, hi), row in zip(ranges, got):
        assert torch.equal(row, block_sums(raw[lo:hi])), (lo, hi)


def device_reader(seeds: list):
    """A read over one GPU's memory: the seeds' tensors are the remote side; the client's tensors and scratch
    buffers (the read's owner) the local one. Returns once the bytes have landed, as Mooncake's reads do."""
    remote = [t.reshape(-1).view(torch.uint8) for m in seeds for _, t in weight_tensors(m) if t.numel()]

    def at(views: list[torch.Tensor], addr: int, n: int) -> torch.Tensor:
        for v in views:
            if v.data_ptr() <= addr and addr + n <= v.data_ptr() + v.numel():
                return v[addr - v.data_ptr() : addr - v.data_ptr() + n]
        raise AssertionError(f"no tensor holds {n} bytes at {addr:#x}")

    def read(entries, owner) -> int:
        tensors, buffers = owner
        local = [t.reshape(-1).view(torch.uint8) for t in tensors.values() if t.numel()] + list(buffers)
        for e in entries:
            at(local, e.local_addr, e.length).copy_(at(remote, e.remote_addr, e.length))
        torch.cuda.current_stream().synchronize()
        return sum(e.length for e in entries)

    return read


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("seed_tp,client_tp", [(2, 1), (1, 2)])
def test_fork_on_a_gpu_rebuilds_the_target_and_catches_a_changed_byte(models, seed_tp, client_tp, monkeypatch):
    """The read step on a GPU (reader thread, side stream, torch block sums with their kernels loaded ahead, in-place
    checks of all seed ranks gathered) over copies within one GPU: bit-equal to the disk load, and a seed byte
    changed after publishing is caught."""
    monkeypatch.setenv("SGLANG_RFORK_MIN_BLOCK_BYTES", "1")  # in-place reads as well as staged ones
    path = models["qwen3"]
    device = torch.device("cuda", torch.cuda.current_device())
    warm_kernels(device).join(120)
    seeds = [disk_model(path, seed_tp, r).to(device) for r in range(seed_tp)]
    read = device_reader(seeds)
    for rank in range(client_tp):
        model, plans, bad = fork(path, seeds, client_tp, rank, read=read, device=device)
        assert not bad
        assert sum(len(p.direct) for p in plans.values()) and sum(len(p.staged) for p in plans.values())
        target = dict(weight_tensors(disk_model(path, client_tp, rank)))
        for name, t in weight_tensors(model):
            assert torch.equal(t.cpu(), target[name]), name
    name = "model.layers.1.mlp.down_proj.weight"

    def corrupt(models_):
        with torch.no_grad():
            dict(weight_tensors(models_[-1]))[name].view(-1)[5] += 1.0

    _, _, bad = fork(path, seeds, client_tp, 0, read=read, device=device, after_publish=corrupt)
    assert bad == {name}
