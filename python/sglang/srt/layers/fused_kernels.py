"""Whether the elementwise layers (RMSNorm, SiLU*mul, RoPE) use FlashInfer's fused CUDA kernels.

Unfused, one decode step of a 32-layer model launches about forty small torch kernels per layer; FlashInfer's
fused ops make that five. The torch code stays as the CPU path and as the fallback, and
SGLANG_DISABLE_FUSED_KERNELS=1 forces it on CUDA too, so one GPU run can measure both.
"""

from __future__ import annotations

import functools
import os
from types import ModuleType

import torch

DISABLE_ENV = "SGLANG_DISABLE_FUSED_KERNELS"


@functools.cache
def _flashinfer() -> tuple[ModuleType | None, str]:
    """(the flashinfer package, why) or (None, why not); decided once per process."""
    if os.environ.get(DISABLE_ENV, "0") not in ("", "0"):
        return None, f"{DISABLE_ENV}={os.environ[DISABLE_ENV]}"
    if not torch.cuda.is_available():
        return None, "no CUDA device"
    try:
        import flashinfer.activation
        import flashinfer.norm
        import flashinfer.rope
    except ImportError as e:
        return None, f"flashinfer does not import ({e})"
    return flashinfer, f"flashinfer {getattr(flashinfer, '__version__', '?')}"


# FlashInfer's norm, activation and RoPE kernels are built for half precision only; a float32 model on CUDA
# failed inside rmsnorm's dtype dispatch (seen on H200), so it takes the torch path.
FUSED_DTYPES = (torch.float16, torch.bfloat16)


def flashinfer_ops(x: torch.Tensor) -> ModuleType | None:
    """The flashinfer package when x is a half-precision CUDA tensor and fused kernels are enabled, else None."""
    if not x.is_cuda or x.dtype not in FUSED_DTYPES:
        return None
    return _flashinfer()[0]


def describe(device: torch.device, dtype: torch.dtype) -> str:
    """One line for the model-load log: which elementwise kernels a model of dtype on device runs, and why."""
    module, why = _flashinfer()
    if device.type != "cuda":
        return "torch (CPU)"
    if dtype not in FUSED_DTYPES:
        return f"torch, unfused (no fused kernels for {str(dtype).removeprefix('torch.')})"
    if module is None:
        return f"torch, unfused ({why})"
    return f"FlashInfer fused RMSNorm/SiLU*mul/RoPE ({why})"


def enabled(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether a model of dtype on device runs the fused kernels (the same rule as flashinfer_ops)."""
    return device.type == "cuda" and dtype in FUSED_DTYPES and _flashinfer()[0] is not None
