"""Loading model weights: one loader per load format, behind get_model_loader."""

from sglang.srt.model_loader.loader import (  # noqa: F401
    BaseModelLoader,
    build_model_skeleton,
    get_model_loader,
    register_loader,
)
