"""Attention backends, chosen by name from a registry."""

from sglang.srt.layers.attention.base import ATTENTION_BACKENDS, AttentionBackend, create_attention_backend  # noqa: F401
