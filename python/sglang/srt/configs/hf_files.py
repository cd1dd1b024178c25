"""A model's config.json and tokenizer, read without transformers' Auto* machinery.

transformers 5 imports much of itself (activations, tensor-parallel helpers, and torchvision or scikit-learn where
they are installed) as soon as a model's config class is loaded, and AutoTokenizer loads that config class even when
tokenizer_config.json names the tokenizer class. On an H200 image that was 12 s of every rank's start and again in
the launcher, for values a JSON file holds. The runtime reads config.json into a plain attribute bag with the
defaults transformers' classes would fill in, and loads the tokenizer class that tokenizer_config.json names.
"""

from __future__ import annotations

import json
import os
from types import SimpleNamespace
from typing import Any

# Defaults of transformers' config classes for the keys our models read, where config.json leaves them out.
_COMMON_DEFAULTS: dict[str, Any] = {
    "hidden_act": "silu",
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "rope_scaling": None,
    "tie_word_embeddings": False,
    "attention_bias": False,
    "mlp_bias": False,
    "max_position_embeddings": 2048,
}
_ARCH_DEFAULTS: dict[str, dict[str, Any]] = {
    "LlamaForCausalLM": {},
    "Qwen2ForCausalLM": {"max_position_embeddings": 32768, "use_sliding_window": False},
    "Qwen3ForCausalLM": {"max_position_embeddings": 32768, "use_sliding_window": False},
    "Qwen3MoeForCausalLM": {
        "max_position_embeddings": 32768,
        "use_sliding_window": False,
        "num_experts": 128,
        "num_experts_per_tok": 8,
        "moe_intermediate_size": 768,
        "norm_topk_prob": False,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
    },
}


class HFConfig(SimpleNamespace):
    """config.json as attributes (what models read as `config.hidden_size` and so on)."""

    def to_dict(self) -> dict[str, Any]:
        """The attributes as a plain dict."""
        return dict(vars(self))


def load_hf_config(model_path: str) -> HFConfig:
    """Read model_path/config.json, fill in the defaults transformers would, normalise the rope keys."""
    with open(os.path.join(model_path, "config.json")) as f:
        raw = json.load(f)
    if not isinstance(raw, dict):
        raise ValueError("config.json does not hold a JSON object")
    archs = raw.get("architectures") or []
    values = {**_COMMON_DEFAULTS, **_ARCH_DEFAULTS.get(archs[0] if archs else "", {}), **raw}
    if values.get("num_key_value_heads") is None and "num_attention_heads" in values:
        values["num_key_value_heads"] = values["num_attention_heads"]
    scaling = values.get("rope_scaling")
    if isinstance(scaling, dict) and "rope_type" not in scaling and "type" in scaling:
        # Older configs call it "type"; transformers reads either.
        values["rope_scaling"] = {**scaling, "rope_type": scaling["type"]}
    return HFConfig(**values)


def load_tokenizer(tokenizer_path: str) -> Any:
    """The tokenizer tokenizer_config.json names (the class AutoTokenizer would pick), loaded from its files."""
    import transformers

    name = None
    config_file = os.path.join(tokenizer_path, "tokenizer_config.json")
    if os.path.isfile(config_file):
        with open(config_file) as f:
            name = json.load(f).get("tokenizer_class")
    # transformers' top level imports only the module that defines the named class; its tokenization_auto module
    # would import auto_factory and, with it, the model stack (11 s on the H200 image).
    cls = getattr(transformers, name, None) if isinstance(name, str) and name.isidentifier() else None
    if cls is None or not hasattr(cls, "from_pretrained"):
        # No class named (or one this transformers does not know): let AutoTokenizer decide, at its price.
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(tokenizer_path)
    return cls.from_pretrained(tokenizer_path)
