"""The fused elementwise path (FlashInfer RMSNorm / fused add+RMSNorm / SiLU*mul / RoPE) against the torch path.

On CPU the layers are pointed at a stand-in that follows FlashInfer's documented contract (in-place fused add,
out-of-place RoPE, preconditions asserted), so the wiring (aliasing of residuals, strided q/k/v views, 3D per-head
norms) is checked against HF on every CI run. On CUDA the real kernels are compared with the torch path.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from sglang.srt.layers import activation, fused_kernels, layernorm, rotary_embedding
from sglang.srt.layers.activation import SiluAndMul
from sglang.srt.layers.layernorm import RMSNorm
from sglang.srt.layers.rotary_embedding import RotaryEmbedding
from sglang.srt.mem_cache import memory_pool
from sglang.test.hf_reference import hf_greedy
from sglang.test.model_harness import ModelHarness

PROMPTS = [[7], [3, 141, 59, 26, 5], list(range(100, 123))]


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps) * weight.float()).to(x.dtype)


def _contract(x: torch.Tensor, weight: torch.Tensor | None = None) -> None:
    assert x.stride(-1) == 1, "FlashInfer needs unit stride on the last axis"
    assert weight is None or weight.dtype == x.dtype, "FlashInfer reads the weight in the input's dtype"


def _rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    _contract(x, weight)
    assert x.dim() in (2, 3)
    return _rms(x, weight, eps)


def _fused_add_rmsnorm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float) -> None:
    _contract(x, weight)
    _contract(residual)
    assert x.dim() == 2 and residual.shape == x.shape
    residual.add_(x)
    x.copy_(_rms(residual, weight, eps))


def _silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    assert x.is_contiguous() and x.shape[-1] * x.element_size() % 16 == 0
    gate, up = x.float().chunk(2, dim=-1)
    return (F.silu(gate) * up).to(x.dtype)


def _rope_inplace(
    positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, head_size: int, cache: torch.Tensor, is_neox: bool
) -> None:
    assert cache.dtype == torch.float32 and is_neox
    _contract(q)
    _contract(k)
    cos, sin = cache[positions].unsqueeze(1).chunk(2, dim=-1)

    def rotate(x: torch.Tensor) -> torch.Tensor:
        x = x.view(x.shape[0], -1, head_size).float()
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).flatten(1)

    # Written back into the caller's (possibly strided) views, as the kernel does.
    q.copy_(rotate(q))
    k.copy_(rotate(k))


STAND_IN = SimpleNamespace(
    norm=SimpleNamespace(rmsnorm=_rmsnorm, fused_add_rmsnorm=_fused_add_rmsnorm),
    activation=SimpleNamespace(silu_and_mul=_silu_and_mul),
    rope=SimpleNamespace(apply_rope_with_cos_sin_cache_inplace=_rope_inplace),
)


@pytest.fixture
def stand_in(monkeypatch: pytest.MonkeyPatch) -> None:
    """Route the layers' fused branch to STAND_IN on any device."""
    for module in (layernorm, activation, rotary_embedding):
        monkeypatch.setattr(module, "flashinfer_ops", lambda x: STAND_IN)


@pytest.mark.parametrize("arch,options", [("llama", {}), ("qwen3", {"num_kv_heads": 1, "head_dim": 32})])
def test_fused_wiring_matches_hf_on_cpu(stand_in: None, tiny_model_dir: Any, arch: str, options: dict) -> None:
    """Logits and greedy tokens through the fused branch equal HF's: in-place residual updates alias nothing."""
    path = tiny_model_dir(arch, **options)
    harness = ModelHarness(path)
    logits = harness.prefill_logits(PROMPTS)
    tokens = harness.greedy_generate(PROMPTS, 16)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.inference_mode():
        for prompt, ours in zip(PROMPTS, logits):
            ref = model(torch.tensor([prompt])).logits[0]
            torch.testing.assert_close(torch.as_tensor(ours), ref, atol=1e-3, rtol=0)
    assert tokens == hf_greedy(path, PROMPTS, 16)


def test_kv_write_takes_keys_and_values_in_one_scatter(
    stand_in: None, tiny_model_dir: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With RoPE in place, every layer's new keys sit right before its values, so the KV write is one scatter."""
    seen: list[bool] = []
    real = memory_pool._adjacent_pair

    def spy(k: torch.Tensor, v: torch.Tensor) -> torch.Tensor | None:
        pair = real(k, v)
        seen.append(pair is not None)
        return pair

    monkeypatch.setattr(memory_pool, "_adjacent_pair", spy)
    ModelHarness(tiny_model_dir("llama")).prefill_logits(PROMPTS[:1])
    assert seen and all(seen)


def test_kv_pool_writes_pairs_and_separate_tensors_alike() -> None:
    """The one-scatter write and the two-scatter fallback store the same keys and values."""
    pool = memory_pool.MHATokenToKVPool(16, 2, 2, 4, torch.float32, torch.device("cpu"))
    qkv = torch.randn(3, (4 + 2 + 2) * 4)
    _, k, v = qkv.split([16, 8, 8], dim=-1)
    k, v = k.view(3, 2, 4), v.view(3, 2, 4)
    loc = torch.tensor([5, 1, 9])
    assert memory_pool._adjacent_pair(k, v) is not None
    assert memory_pool._adjacent_pair(k.clone(), v) is None
    pool.set_kv_buffer(0, loc, k, v)
    pool.set_kv_buffer(1, loc, k.clone(), v.clone())
    for layer in (0, 1):
        assert torch.equal(pool.get_key_buffer(layer)[loc], k)
        assert torch.equal(pool.get_value_buffer(layer)[loc], v)
        assert not pool.get_key_buffer(layer)[0].any()  # the scratch slot is untouched


def test_fused_kernels_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(fused_kernels.DISABLE_ENV, "1")
    fused_kernels._flashinfer.cache_clear()
    try:
        assert fused_kernels._flashinfer()[0] is None
        assert fused_kernels.DISABLE_ENV in fused_kernels.describe(torch.device("cuda"), torch.bfloat16)
        assert fused_kernels.describe(torch.device("cpu"), torch.bfloat16) == "torch (CPU)"
        assert not fused_kernels.enabled(torch.device("cpu"), torch.bfloat16)
        assert fused_kernels.flashinfer_ops(torch.zeros(1)) is None
    finally:
        fused_kernels._flashinfer.cache_clear()


def test_float32_models_are_reported_unfused() -> None:
    # The load log and bench_one_batch's JSON must say what a float32 model really runs: the torch path.
    assert not fused_kernels.enabled(torch.device("cuda"), torch.float32)
    assert "no fused kernels for float32" in fused_kernels.describe(torch.device("cuda"), torch.float32)


# ---- the real kernels (CUDA) ------------------------------------------------------------------------------------

cuda = pytest.mark.skipif(
    not torch.cuda.is_available() or not fused_kernels.enabled(torch.device("cuda"), torch.bfloat16),
    reason="needs CUDA and an importable flashinfer with fused kernels enabled",
)


@cuda
def test_only_half_precision_takes_the_fused_path() -> None:
    # FlashInfer's elementwise kernels dispatch on fp16/bf16 only: a float32 CUDA model crashed in rmsnorm.
    assert fused_kernels.flashinfer_ops(torch.zeros(4, device="cuda", dtype=torch.float32)) is None
    for dtype in (torch.float16, torch.bfloat16):
        assert fused_kernels.flashinfer_ops(torch.zeros(4, device="cuda", dtype=dtype)) is not None
    norm = RMSNorm(64).to("cuda")
    x = torch.randn(3, 64, device="cuda")
    _close(norm(x), norm.to("cpu")(x.cpu()).cuda(), tol=1e-5)


def _close(a: torch.Tensor, b: torch.Tensor, tol: float = 2e-2) -> None:
    assert a.shape == b.shape and a.dtype == b.dtype
    torch.testing.assert_close(a.float(), b.float(), atol=tol, rtol=tol)


@cuda
@pytest.mark.parametrize("shape", [(5, 4096), (3, 8, 128)])
def test_rmsnorm_kernel(shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    norm = RMSNorm(shape[-1], eps=1e-5).to("cuda", torch.bfloat16)
    norm.weight.data.uniform_(0.5, 1.5)
    x = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
    _close(norm(x), norm._norm(x))


@cuda
def test_fused_add_rmsnorm_kernel_updates_both_in_place() -> None:
    torch.manual_seed(0)
    norm = RMSNorm(4096, eps=1e-5).to("cuda", torch.bfloat16)
    x = torch.randn(5, 4096, device="cuda", dtype=torch.bfloat16)
    residual = torch.randn_like(x)
    want_sum = x + residual
    want = norm._norm(want_sum)
    out, new_residual = norm(x.clone(), residual)
    assert new_residual is residual
    _close(new_residual, want_sum)
    _close(out, want)


@cuda
def test_silu_and_mul_kernel() -> None:
    torch.manual_seed(0)
    x = torch.randn(5, 2 * 1024, device="cuda", dtype=torch.bfloat16)
    gate, up = x.chunk(2, dim=-1)
    _close(SiluAndMul()(x), F.silu(gate) * up)


@cuda
def test_rope_kernel_on_strided_qkv_views() -> None:
    """q and k are column slices of the fused qkv output, as the attention layer passes them."""
    torch.manual_seed(0)
    head, heads, kv_heads = 128, 4, 2
    with torch.device("cuda"):
        rope = RotaryEmbedding(head, head, 4096, 500000.0, None)
    qkv = torch.randn(6, (heads + 2 * kv_heads) * head, device="cuda", dtype=torch.bfloat16)
    q, k, _ = qkv.split([heads * head, kv_heads * head, kv_heads * head], dim=-1)
    positions = torch.tensor([0, 1, 17, 300, 1000, 4095], device="cuda")
    cos, sin = rope.cos_sin_cache[positions].unsqueeze(1).chunk(2, dim=-1)
    # The torch path in float32 cos/sin, which is what the kernel computes in (taken first: the kernel is in place).
    want_q = rope._rotate(q.float(), cos, sin).to(q.dtype)
    want_k = rope._rotate(k.float(), cos, sin).to(k.dtype)
    fused_q, fused_k = rope(positions, q, k)
    _close(fused_q, want_q)
    _close(fused_k, want_k)
    # Rotated where they lie, so the keys still sit right before the values for the one-scatter KV write.
    assert fused_k.data_ptr() == k.data_ptr() and fused_q.data_ptr() == q.data_ptr()
