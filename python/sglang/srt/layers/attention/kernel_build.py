"""FlashInfer's JIT kernels for one model, built in the background of a start or ahead of time.

FlashInfer compiles each kernel module on first use. On a fresh node that happened inside CUDA graph capture
(the decode kernels, ~80 s) and inside the first request (the prefill kernels, ~60 s), one module after the
other. A rank instead starts one parallel ninja build of every module its model needs as soon as its device is
set, and waits for it only before the attention backend is created, so the compile overlaps the imports'
tail, the distributed init, the weights (or the fork), the checksums and the KV pool. With a warm JIT cache
the build is a no-op check. `python -m sglang.srt.layers.attention.kernel_build --model-path M` builds the same
modules once ahead of time (an image build step), so no node compiles at all.
"""

from __future__ import annotations

import argparse
import logging
import threading
import time
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from sglang.srt.configs.model_config import ModelConfig

logger = logging.getLogger(__name__)


def flashinfer_jit_specs(
    dtype: torch.dtype, head_dim: int, num_qo_heads: int, num_kv_heads: int, device: torch.device
) -> list:
    """The JIT specs of every FlashInfer module a model of this shape runs: attention and fused elementwise ops.

    Arguments mirror what the paged wrappers pass at plan time (q/kv/out dtype, int32 indices, no RoPE in the
    kernel, no sliding window, no soft cap, no fp16 QK reduction); a spec that differed would only cost that
    wrapper its own compile later, never correctness.
    """
    from flashinfer.jit.attention import gen_batch_decode_module, gen_batch_prefill_module
    from flashinfer.utils import determine_attention_backend

    from sglang.srt.layers import fused_kernels
    from sglang.srt.layers.attention.flashinfer_backend import tensor_core_decode

    shape = (dtype, dtype, dtype, torch.int32, head_dim, head_dim, 0, False, False)
    prefill_backend = determine_attention_backend(device, 0, False, False, dtype, dtype)
    specs = [gen_batch_prefill_module(prefill_backend, *shape, False)]
    if tensor_core_decode(num_qo_heads, num_kv_heads):
        # Tensor-core decode runs FlashInfer's fa2 prefill kernels whatever the prefill backend is.
        if prefill_backend != "fa2":
            specs.append(gen_batch_prefill_module("fa2", *shape, False))
    else:
        specs.append(gen_batch_decode_module(*shape))
    if fused_kernels.enabled(device, dtype):
        from flashinfer.jit.activation import gen_act_and_mul_module
        from flashinfer.jit.norm import gen_norm_module
        from flashinfer.jit.rope import gen_rope_module

        specs += [gen_norm_module(), gen_rope_module(), gen_act_and_mul_module("silu")]
    return specs


def build_for_model(model_config: ModelConfig, tp_size: int, device: torch.device) -> float:
    """Compile (or find in the JIT cache) every module one TP rank of the model needs, in one parallel ninja run;
    returns the seconds taken."""
    from flashinfer.jit.core import build_jit_specs

    start = time.perf_counter()
    torch.cuda.set_device(device)
    cfg = model_config
    qo_heads, kv_heads = cfg.num_attention_heads // tp_size, cfg.num_kv_heads_per_rank(tp_size)
    specs = flashinfer_jit_specs(cfg.dtype, cfg.head_dim, qo_heads, kv_heads, device)
    build_jit_specs(specs, verbose=False)
    return time.perf_counter() - start


class KernelBuild:
    """A background build of a model's FlashInfer modules; wait() before the first kernel is needed."""

    def __init__(self, model_config: ModelConfig, tp_size: int, device: torch.device) -> None:
        self.seconds: float | None = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(
            target=self._run, args=(model_config, tp_size, device), daemon=True, name="flashinfer-jit-build"
        )
        self._thread.start()

    def _run(self, model_config: ModelConfig, tp_size: int, device: torch.device) -> None:
        try:
            self.seconds = build_for_model(model_config, tp_size, device)
        except BaseException as e:  # noqa: BLE001 - reported by wait(); the wrappers then compile on first use
            self.error = e

    def wait(self) -> None:
        """Block until the build is done; a failed build is logged and left to FlashInfer's on-demand JIT."""
        self._thread.join()
        if self.error is not None:
            logger.warning(
                "Building FlashInfer kernels ahead of use failed (%s: %s); they compile on first use instead.",
                type(self.error).__name__,
                self.error,
            )
        else:
            logger.info("FlashInfer kernels ready (build or cache check took %.2f s)", self.seconds)


def start_kernel_build(
    backend: str, model_config: ModelConfig, tp_size: int, device: torch.device
) -> KernelBuild | None:
    """Start the background build when the rank will run FlashInfer on CUDA; None otherwise."""
    if backend != "flashinfer" or device.type != "cuda":
        return None
    return KernelBuild(model_config, tp_size, device)


def main(argv: list[str] | None = None) -> None:
    """Build a model's FlashInfer modules into the JIT cache (FLASHINFER_WORKSPACE_BASE) ahead of any start."""
    from sglang.srt.configs.model_config import ModelConfig

    parser = argparse.ArgumentParser(
        prog="python -m sglang.srt.layers.attention.kernel_build",
        description="Compile the FlashInfer kernels a model needs, so a server start on this image compiles none.",
    )
    parser.add_argument("--model-path", required=True, help="model directory (config.json is enough)")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--tp-size", type=int, default=1, help="heads per rank decide the decode kernel family")
    args = parser.parse_args(argv)
    cfg = ModelConfig.from_path(args.model_path, args.dtype, None, "cuda")
    seconds = build_for_model(cfg, args.tp_size, torch.device("cuda", torch.cuda.current_device()))
    print(f"FlashInfer kernels for {args.model_path} ready in {seconds:.1f} s")


if __name__ == "__main__":
    main()
