"""/get_weights_by_name as upstream SGLang answers it, checked against the tiny checkpoints' own tensors.

Upstream's R-Fork e2e test reads a forked instance with checkpoint names (q_proj, gate_proj, ...) and
truncate_size in rows; these tests walk every tensor of each checkpoint through a real server (TP2) and
the offline Engine (TP1) and compare with what TP rank 0 must hold of it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import requests
import torch
from safetensors import safe_open

import sglang
from sglang.test.test_utils import kill_process_tree, popen_launch_server

Q_PROJ = "model.layers.0.self_attn.q_proj.weight"
O_PROJ = "model.layers.0.self_attn.o_proj.weight"
NORM = "model.layers.0.input_layernorm.weight"


def checkpoint(path: str) -> dict[str, torch.Tensor]:
    with safe_open(os.path.join(path, "model.safetensors"), "pt") as f:
        names = f.keys()  # a safetensors handle lists its tensors but cannot be iterated
        return {name: f.get_tensor(name) for name in names}


def rank0_part(name: str, full: torch.Tensor, config: dict, tp: int) -> torch.Tensor:
    """What upstream's reader returns for checkpoint tensor `name` at TP size tp: rank 0's rows of column-parallel
    weights (KV heads replicated when fewer than the ranks), and weights split along their input whole."""
    projection = name.split(".")[-2]
    if projection in ("o_proj", "down_proj"):
        return full
    if projection in ("q_proj", "gate_proj", "up_proj", "embed_tokens", "lm_head"):
        return full[: full.shape[0] // tp]
    if projection in ("k_proj", "v_proj"):
        kv_heads = config["num_key_value_heads"]
        return full[: full.shape[0] // kv_heads * max(1, kv_heads // tp)]
    return full


def assert_every_tensor_matches(read, path: str, tp: int) -> int:
    """Read every checkpoint tensor by its checkpoint name and compare; returns how many were compared."""
    config = json.loads(Path(path, "config.json").read_text())
    tensors = checkpoint(path)
    for name, full in tensors.items():
        expected = rank0_part(name, full, config, tp)
        # The embedding's runtime rows are padded per rank; ask for rows the checkpoint has on rank 0.
        got = torch.tensor(read(name, expected.shape[0]))
        assert got.shape == expected.shape and torch.equal(got, expected.float()), name
    return len(tensors)


# ---- TP2 through the HTTP server ----------------------------------------------------------------------------------

MODELS = {
    # One KV head at TP2: each rank holds a replica of it. Layer 1 is dense, so gate/up/down appear outside experts.
    "qwen3_moe": {"num_kv_heads": 1, "num_experts": 4, "mlp_only_layers": (1,)},
    "qwen2": {},
}


@pytest.fixture(scope="module", params=sorted(MODELS))
def tp2(request, tiny_model_dir):
    path = tiny_model_dir(request.param, **MODELS[request.param])
    proc = popen_launch_server(path, other_args=["--tp-size", "2"])
    yield path, proc.base_url
    kill_process_tree(proc.pid)


def get_weights(base_url: str, **body) -> requests.Response:
    return requests.post(f"{base_url}/get_weights_by_name", json=body, timeout=60)


def test_tp2_checkpoint_names_give_rank0_slices_and_joined_row_parallel(tp2):
    path, url = tp2

    def read(name: str, truncate_size: int | None) -> list:
        resp = get_weights(url, name=name, truncate_size=truncate_size)
        assert resp.status_code == 200, resp.text
        return resp.json()

    assert assert_every_tensor_matches(read, path, tp=2) > 20


def test_tp2_truncate_counts_rows_and_raw_keeps_the_old_reading(tp2):
    path, url = tp2
    tensors = checkpoint(path)
    half = tensors[Q_PROJ].shape[0] // 2
    assert get_weights(url, name=Q_PROJ, truncate_size=3).json() == tensors[Q_PROJ][:3].tolist()
    assert get_weights(url, name=NORM, truncate_size=3).json() == tensors[NORM][:3].tolist()
    # The fused runtime parameter is this rank's q rows, then its k and v rows.
    qkv = torch.tensor(get_weights(url, name=Q_PROJ.replace("q_proj", "qkv_proj")).json())
    assert torch.equal(qkv[:half], tensors[Q_PROJ][:half])
    # raw: rank 0's own columns of a row-parallel weight, truncate_size in elements of the flattened shard.
    o_proj = tensors[O_PROJ]
    shard = o_proj[:, : o_proj.shape[1] // 2]
    assert torch.equal(torch.tensor(get_weights(url, name=O_PROJ, raw=True).json()), shard)
    assert get_weights(url, name=O_PROJ, raw=True, truncate_size=5).json() == shard.flatten()[:5].tolist()
    query = requests.get(f"{url}/get_weights_by_name", params={"name": O_PROJ, "raw": "true", "truncate_size": 2})
    assert query.json() == shard.flatten()[:2].tolist()
    # raw takes runtime names only: a checkpoint name for a fused slice is named in a 400.
    refused = get_weights(url, name=Q_PROJ, raw=True)
    assert refused.status_code == 400 and "q_proj" in refused.json()["error"]["message"]
    unknown = get_weights(url, name="model.layers.0.self_attn.p_proj.weight")
    assert unknown.status_code == 400 and "checkpoint name" in unknown.json()["error"]["message"]
    if "experts" in " ".join(tensors):
        expert = get_weights(url, name="model.layers.0.mlp.experts.99.up_proj.weight").json()["error"]["message"]
        assert "expert 99 is out of range" in expert


# ---- TP1 through the offline Engine -------------------------------------------------------------------------------


@pytest.mark.parametrize("arch,options", [("llama", {}), ("qwen3", {"tie_word_embeddings": True})])
def test_engine_reads_checkpoint_names(tiny_model_dir, arch, options):
    path = tiny_model_dir(arch, **options)
    with sglang.Engine(model_path=path, max_total_tokens=512) as engine:
        assert assert_every_tensor_matches(engine.get_weights_by_name, path, tp=1) > 10
        tensors = checkpoint(path)
        embed = tensors["model.embed_tokens.weight"]
        # A tied head is the embedding (named_parameters() lists it once; upstream answers it all the same).
        head = tensors.get("lm_head.weight", embed)
        assert ("lm_head.weight" in tensors) != bool(options.get("tie_word_embeddings"))
        assert engine.get_weights_by_name("lm_head.weight", truncate_size=2) == head[:2].tolist()
        assert engine.get_weights_by_name("model.embed_tokens.weight", 4, raw=True) == embed.flatten()[:4].tolist()
