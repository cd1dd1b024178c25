"""Rotary position embedding (neox / rotate-half layout, as in HF Llama and Qwen), with llama3 scaling."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from sglang.srt.layers.fused_kernels import flashinfer_ops

SUPPORTED_ROPE_TYPES = ("default", "llama3")


def rope_config(config: Any) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, rope_scaling) from an HF config, for both the transformers 4 and 5 config layouts."""
    params = getattr(config, "rope_parameters", None)
    if params is None:
        return float(getattr(config, "rope_theta", 10000.0)), getattr(config, "rope_scaling", None)
    scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    return float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0))), scaling


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict[str, Any]) -> torch.Tensor:
    # Llama 3.1: long wavelengths are slowed down by `factor`, short ones kept, the band between interpolated.
    factor = float(scaling["factor"])
    low_freq_factor = float(scaling["low_freq_factor"])
    high_freq_factor = float(scaling["high_freq_factor"])
    old_context = float(scaling["original_max_position_embeddings"])
    low_freq_wavelen = old_context / low_freq_factor
    high_freq_wavelen = old_context / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    in_band = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(in_band, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """Rotates the first rotary_dim channels of every head by position; cos/sin are precomputed per position."""

    def __init__(
        self,
        head_size: int,
        rotary_dim: int,
        max_position: int,
        base: float,
        rope_scaling: dict[str, Any] | None,
    ) -> None:
        super().__init__()
        rope_type = (rope_scaling or {}).get("rope_type") or (rope_scaling or {}).get("type") or "default"
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(
                f"rope_scaling type {rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
            )
        self.head_size = head_size
        self.rotary_dim = rotary_dim
        inv_freq = 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim))
        if rope_type == "llama3":
            inv_freq = _llama3_inv_freq(inv_freq, rope_scaling)
        freqs = torch.outer(torch.arange(max_position, dtype=torch.float32), inv_freq.float())
        # Derived from the config, never loaded or transferred, so it stays out of the state dict.
        self.register_buffer("cos_sin_cache", torch.cat([freqs.cos(), freqs.sin()], dim=-1), persistent=False)

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x.view(x.shape[0], -1, self.head_size)
        rot, rest = x[..., : self.rotary_dim], x[..., self.rotary_dim :]
        x1, x2 = rot.chunk(2, dim=-1)
        rotated = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
        return torch.cat([rotated, rest], dim=-1).flatten(1)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotate q [T, H*D] and k [T, KV*D] for the given absolute positions [T].

        The fused CUDA path rotates in place, so q and k may be strided views (of a fused qkv output) and stay so:
        the KV-cache write can then take k and v together. The torch path returns new contiguous tensors.
        """
        fi = flashinfer_ops(q)
        # One kernel on CUDA; it reads cos/sin as float32 and only knows rotary_dim == head_size among our layouts.
        if fi is not None and self.rotary_dim == self.head_size and self.cos_sin_cache.dtype == torch.float32:
            fi.rope.apply_rope_with_cos_sin_cache_inplace(positions, q, k, self.head_size, self.cos_sin_cache, True)
            return q, k
        cos, sin = self.cos_sin_cache[positions].to(q.dtype).unsqueeze(1).chunk(2, dim=-1)
        return self._rotate(q, cos, sin), self._rotate(k, cos, sin)
