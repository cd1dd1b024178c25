"""Gated activations."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sglang.srt.layers.fused_kernels import flashinfer_ops


class SiluAndMul(nn.Module):
    """silu(gate) * up for an input laid out as [..., gate | up]; one FlashInfer kernel on CUDA."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fi = flashinfer_ops(x)
        # The kernel loads 16-byte vectors, so a row must be a whole number of them.
        if fi is not None and x.is_contiguous() and x.shape[-1] * x.element_size() % 16 == 0:
            return fi.activation.silu_and_mul(x)
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up
