"""ModelConfig: what the runtime needs to know about a model, read from its config.json."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

_DTYPE_NAMES = {
    "float32": torch.float32,
    "float": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "half": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


class ModelConfigError(ValueError):
    """The model directory or its config cannot be served as asked."""


@dataclass
class ModelConfig:
    """Architecture, shapes and dtype of the served model."""

    model_path: str
    hf_config: Any
    architecture: str
    dtype: torch.dtype
    context_len: int
    hidden_size: int
    num_layers: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int

    @classmethod
    def from_path(
        cls, model_path: str, dtype: str = "auto", context_length: int | None = None, device: str = "cpu"
    ) -> ModelConfig:
        """Read config.json from a model directory and resolve dtype and context length."""
        config_file = os.path.join(model_path, "config.json")
        if not os.path.isdir(model_path):
            raise ModelConfigError(f"Model path {model_path!r} is not a directory; pass an HF model directory.")
        if not os.path.isfile(config_file):
            raise ModelConfigError(f"No config.json in {model_path!r}; is this an HF model directory?")
        from sglang.srt.configs.hf_files import load_hf_config

        try:
            hf_config = load_hf_config(model_path)
        except (ValueError, TypeError) as e:  # json.JSONDecodeError is a ValueError
            raise ModelConfigError(f"Cannot read {config_file}: {e}") from e
        archs = getattr(hf_config, "architectures", None) or []
        if not archs:
            raise ModelConfigError(f"{config_file} has no 'architectures' entry.")
        from sglang.srt.models.registry import ModelRegistry

        arch = archs[0]
        if arch not in ModelRegistry.supported():
            raise ModelConfigError(
                f"Architecture {arch!r} is not supported; supported: {', '.join(ModelRegistry.supported())}."
            )
        torch_dtype = _resolve_dtype(dtype, hf_config, device)
        max_pos = int(getattr(hf_config, "max_position_embeddings", 2048))
        if context_length is not None and context_length > max_pos:
            raise ModelConfigError(
                f"--context-length {context_length} exceeds the model's max_position_embeddings {max_pos}."
            )
        heads = hf_config.num_attention_heads
        return cls(
            model_path=model_path,
            hf_config=hf_config,
            architecture=arch,
            dtype=torch_dtype,
            context_len=context_length or max_pos,
            hidden_size=hf_config.hidden_size,
            num_layers=hf_config.num_hidden_layers,
            num_attention_heads=heads,
            num_kv_heads=getattr(hf_config, "num_key_value_heads", None) or heads,
            head_dim=getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads,
            vocab_size=hf_config.vocab_size,
        )

    def check_tp(self, tp_size: int) -> None:
        """Refuse a TP size that does not split the attention heads evenly."""
        if self.num_attention_heads % tp_size:
            raise ModelConfigError(
                f"--tp-size {tp_size} does not divide the model's {self.num_attention_heads} attention heads."
            )
        if self.num_kv_heads % tp_size and tp_size % self.num_kv_heads:
            raise ModelConfigError(
                f"--tp-size {tp_size} and the model's {self.num_kv_heads} KV heads do not divide each other."
            )
        # Experts are split along their intermediate dimension (no expert parallelism).
        moe_intermediate = getattr(self.hf_config, "moe_intermediate_size", None)
        if moe_intermediate and moe_intermediate % tp_size:
            raise ModelConfigError(
                f"--tp-size {tp_size} does not divide the model's moe_intermediate_size {moe_intermediate}: "
                "every expert is split across the TP ranks along it; use a TP size that divides it."
            )

    def num_kv_heads_per_rank(self, tp_size: int) -> int:
        """KV heads held by one TP rank (replicated when tp_size exceeds the KV head count)."""
        return max(1, self.num_kv_heads // tp_size)


def _resolve_dtype(dtype: str, hf_config: Any, device: str) -> torch.dtype:
    if dtype == "auto":
        cfg = getattr(hf_config, "torch_dtype", None) or getattr(hf_config, "dtype", None)
        if isinstance(cfg, str):
            cfg = _DTYPE_NAMES.get(cfg, torch.float32)
        cfg = cfg or torch.float32
        # CPU kernels for half precision are slow and imprecise; keep CPU runs in float32 by default.
        if device == "cpu":
            return torch.float32
        if cfg == torch.float32:
            # As upstream SGLang (and so as its R-Fork peers expect): float32 checkpoints are served in half
            # precision, bfloat16 for Gemma (float16 overflows it), float16 otherwise.
            return torch.bfloat16 if "gemma" in str(getattr(hf_config, "model_type", "")) else torch.float16
        return cfg
    if dtype not in _DTYPE_NAMES:
        raise ModelConfigError(f"Unsupported --dtype {dtype!r}; use one of {', '.join(_DTYPE_NAMES)}.")
    return _DTYPE_NAMES[dtype]
