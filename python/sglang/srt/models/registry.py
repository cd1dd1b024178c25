"""Which model class serves which HF architecture name."""

from __future__ import annotations

import importlib

from torch import nn

# Architecture name -> module defining a class of that name; modules are imported only when resolved.
_MODEL_MODULES: dict[str, str] = {
    "LlamaForCausalLM": "sglang.srt.models.llama",
    "Qwen2ForCausalLM": "sglang.srt.models.qwen2",
    "Qwen3ForCausalLM": "sglang.srt.models.qwen3",
    "Qwen3MoeForCausalLM": "sglang.srt.models.qwen3_moe",
}


class ModelRegistry:
    """Lookup of model classes by the `architectures` entry of config.json."""

    @staticmethod
    def supported() -> list[str]:
        """HF architecture names this runtime can serve."""
        return sorted(_MODEL_MODULES)

    @staticmethod
    def resolve(arch: str) -> type[nn.Module]:
        """The model class for arch; the error lists what is supported."""
        if arch not in _MODEL_MODULES:
            raise ValueError(
                f"Architecture {arch!r} is not supported; supported: {', '.join(ModelRegistry.supported())}."
            )
        return getattr(importlib.import_module(_MODEL_MODULES[arch]), arch)
