"""Default sampling parameters of a server: the model's generation_config.json, or OpenAI's constants."""

from __future__ import annotations

import json
import logging
import os
from typing import Any

logger = logging.getLogger(__name__)

# The generation_config.json keys that become sampling defaults (upstream SGLang reads the same ones).
MODEL_DEFAULT_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


def _model_defaults(model_path: str) -> dict[str, Any]:
    path = os.path.join(model_path, "generation_config.json")
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        config = json.load(f)
    defaults = {key: config[key] for key in MODEL_DEFAULT_KEYS if config.get(key) is not None}
    if defaults.get("top_k") == 0:
        defaults["top_k"] = -1  # HF's "no top-k"
    return defaults


# --sampling-defaults value -> how the defaults are found. "openai" leaves SamplingParams' own (OpenAI's) values.
SAMPLING_DEFAULT_SOURCES = {
    "model": _model_defaults,
    "openai": lambda model_path: {},
}


def load_sampling_defaults(source: str, model_path: str) -> dict[str, Any]:
    """Sampling values a request gets for the fields it leaves out; logged once so users see what applies."""
    from sglang.srt.sampling.sampling_params import SamplingParams, SamplingParamsError

    defaults = SAMPLING_DEFAULT_SOURCES[source](model_path)
    for key in list(defaults):
        try:
            SamplingParams.from_dict({key: defaults[key]})
        except SamplingParamsError as e:
            # A bad value in the model's file must not turn every request into a 400 that blames the request.
            logger.warning("Ignoring %s from generation_config.json: %s", key, e)
            del defaults[key]
    if defaults:
        logger.info("Sampling defaults from %s/generation_config.json: %s", model_path, defaults)
    return defaults
