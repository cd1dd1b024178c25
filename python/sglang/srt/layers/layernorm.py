"""RMSNorm, optionally fused with the residual add that precedes it."""

from __future__ import annotations

import torch
from torch import nn

from sglang.srt.layers.fused_kernels import flashinfer_ops


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in float32 like the HF reference; one FlashInfer kernel on CUDA."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False)
        self.variance_epsilon = eps

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * x32.to(x.dtype)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """norm(x), or with a residual: (norm(x + residual), x + residual) for the next block's skip path.

        x may be [T, hidden] or [T, heads, head_dim] (per-head norms); with a residual the fused path overwrites
        both inputs (residual += x, x = norm(residual)), which callers allow by never reusing them.
        """
        fi = flashinfer_ops(x)
        # The kernels read the weight as x's dtype without converting, and need unit stride on the last axis.
        if fi is not None and x.dtype == self.weight.dtype and x.stride(-1) == 1:
            if residual is None and x.dim() in (2, 3):
                return fi.norm.rmsnorm(x, self.weight, self.variance_epsilon)
            if residual is not None and x.dim() == 2 and residual.dtype == x.dtype and residual.stride(-1) == 1:
                fi.norm.fused_add_rmsnorm(x, residual, self.weight, self.variance_epsilon)
                return x, residual
        if residual is None:
            return self._norm(x)
        x = x + residual
        return self._norm(x), x
