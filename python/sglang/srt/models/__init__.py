"""Model implementations, looked up by HF architecture name through ModelRegistry."""

from sglang.srt.models.registry import ModelRegistry  # noqa: F401
