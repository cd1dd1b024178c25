"""sglang: an SGLang-compatible LLM serving runtime with Tensor R-Fork."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0.dev0"


def __getattr__(name: str) -> Any:
    # Imported lazily so `import sglang` stays cheap for tools that do not serve.
    if name == "Engine":
        from sglang.srt.entrypoints.engine import Engine

        return Engine
    raise AttributeError(f"module 'sglang' has no attribute {name!r}")


__all__ = ["Engine", "__version__"]
