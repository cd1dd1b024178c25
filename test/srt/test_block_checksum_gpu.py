"""The fused GPU block sums (Triton) against the torch ones every CPU seed uses: bit-equal, or forks break.

On a GPU with Triton this runs the real kernel; elsewhere the same kernel runs in Triton's interpreter on the CPU
when Triton is installed (TRITON_INTERPRET=1 must be set before Triton is first imported, so that case runs in a
child process), and the test is skipped without Triton.
"""

from __future__ import annotations

import importlib.util
import os
import random
import subprocess
import sys

import pytest
import torch

from sglang.srt.remote_instance import block_checksum as bc
from sglang.srt.remote_instance import block_checksum_gpu as gpu

SIZES = [8, 16, 8184, 8192, 8200, 3 * 8192, 5 * 8192 + 56, 65544, 1 << 20, (1 << 20) + 8 * 1023]


def _ranges(device: str, rng: random.Random, count: int) -> list[tuple[torch.Tensor, int, int]]:
    """Blocks of awkward sizes at random word offsets in `count` tensors (one launch spans them all)."""
    tensors = [torch.randint(0, 256, (3 << 20,), dtype=torch.uint8, device=device) for _ in range(count)]
    out = []
    for i, n in enumerate(SIZES):
        t = tensors[i % count]
        lo = rng.randrange(0, t.numel() - n) // 8 * 8
        out.append((t, lo, lo + n))
    return out


def check_equal(device: str, count: int) -> None:
    rng = random.Random(0)
    ranges = _ranges(device, rng, count)
    want = [bc.block_sums(t[lo:hi]) for t, lo, hi in ranges]
    got = gpu.many_block_sums(ranges, bc.ROW_WORDS)
    for (_, lo, hi), w, g in zip(ranges, want, got):
        assert torch.equal(w.cpu(), g.cpu()), (hi - lo, w.tolist(), g.tolist())
    # range_sums mixes the fused path with torch for blocks it cannot take (a tail of bytes, odd offsets).
    t = ranges[0][0]
    mixed = [(t, 8, 8 + 8192), (t, 3, 3 + 4096), (t, 16, 16 + 8195), (t, 8192, 2 * 8192)]
    assert bc.digests(bc.range_sums(mixed)) == bc.digests([bc.block_sums(r[a:b]) for r, a, b in mixed])


@pytest.mark.skipif(not (gpu.HAVE_TRITON and torch.cuda.is_available()), reason="needs CUDA and Triton")
def test_fused_sums_equal_torch_on_gpu():
    gpu.warm_up(torch.device("cuda", 0)).join(120)
    assert gpu.available(torch.device("cuda", 0))  # so range_sums below takes the fused path
    check_equal("cuda", 2)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs Triton (its interpreter on the CPU)")
def test_fused_sums_equal_torch_in_triton_interpreter():
    code = (
        "import torch, test_block_checksum_gpu as t\n"
        "t.gpu.available = lambda device: True\n"
        "t.gpu.CHUNK_WORDS = 2048\n"  # blocks span several chunks
        "t.check_equal('cpu', 1)\n"  # the interpreter copies each tensor: no addressing across them
    )
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run([sys.executable, "-c", code], cwd=os.path.dirname(__file__), env=env, capture_output=True)
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
