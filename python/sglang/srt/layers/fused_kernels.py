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


def warm_up_jit(dtype: torch.dtype = torch.bfloat16, head_dim: int = 128) -> None:
    """Compile every FlashInfer module a model of this dtype and head size needs in one parallel ninja run.

    On a fresh machine each module compiles on first use, one after the other (norm, RoPE and SiLU*mul about a
    minute together, paged prefill about 70 s); built together they overlap. A spec whose arguments differ from
    what the wrappers ask for later only costs that wrapper its own compile, never correctness.
    """
    from flashinfer.jit.activation import gen_act_and_mul_module
    from flashinfer.jit.attention import gen_batch_decode_module, gen_batch_prefill_module
    from flashinfer.jit.core import build_jit_specs
    from flashinfer.jit.norm import gen_norm_module
    from flashinfer.jit.rope import gen_rope_module
    from flashinfer.utils import determine_attention_backend

    device = torch.device("cuda", torch.cuda.current_device())
    # Arguments as the paged wrappers pass them: q/kv/out dtype, int32 indices, no RoPE in the kernel, no window,
    # no soft cap (and for prefill no fp16 QK reduction, no custom mask).
    shape = (dtype, dtype, dtype, torch.int32, head_dim, head_dim, 0, False, False)
    prefill_backend = determine_attention_backend(device, 0, False, False, dtype, dtype)
    build_jit_specs(
        [
            gen_norm_module(),
            gen_rope_module(),
            gen_act_and_mul_module("silu"),
            gen_batch_decode_module(*shape),
            gen_batch_prefill_module(prefill_backend, *shape, False),
        ]
    )


if __name__ == "__main__":
    warm_up_jit()
