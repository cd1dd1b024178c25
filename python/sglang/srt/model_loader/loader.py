"""Model loaders, one per load format, chosen through a registry keyed by LoadFormat."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import TypeVar

import torch
from torch import nn

from sglang.srt.configs.load_config import LoadConfig, LoadFormat
from sglang.srt.configs.model_config import ModelConfig
from sglang.srt.distributed import get_tp_size
from sglang.srt.model_loader.weight_utils import (
    list_weight_files,
    pt_weights_iterator,
    safetensors_weights_iterator,
)
from sglang.srt.models.registry import ModelRegistry


class BaseModelLoader(ABC):
    """Turns a model config into a model on a device with its weights in place."""

    def __init__(self, load_config: LoadConfig) -> None:
        self.load_config = load_config

    @abstractmethod
    def load_model(self, model_config: ModelConfig, device: torch.device) -> nn.Module:
        """Build the model for this TP rank and fill its parameters."""


LoaderT = TypeVar("LoaderT", bound=type[BaseModelLoader])
MODEL_LOADERS: dict[LoadFormat, type[BaseModelLoader]] = {}


def register_loader(*formats: LoadFormat) -> Callable[[LoaderT], LoaderT]:
    """Class decorator registering a loader for each of the given load formats."""

    def wrap(cls: LoaderT) -> LoaderT:
        for load_format in formats:
            if load_format in MODEL_LOADERS:
                raise ValueError(
                    f"load format {load_format.value!r} already has loader {MODEL_LOADERS[load_format].__name__}"
                )
            MODEL_LOADERS[load_format] = cls
        return cls

    return wrap


def get_model_loader(load_config: LoadConfig) -> BaseModelLoader:
    """The registered loader for load_config.load_format."""
    load_format = LoadFormat(load_config.load_format)
    if load_format not in MODEL_LOADERS:
        registered = ", ".join(f.value for f in MODEL_LOADERS)
        raise ValueError(f"no loader is registered for load format {load_format.value!r}; registered: {registered}")
    return MODEL_LOADERS[load_format](load_config)


def build_model_skeleton(model_config: ModelConfig, device: torch.device) -> nn.Module:
    """This rank's model with allocated but unloaded parameters, created directly in the target dtype and device."""
    model_config.check_tp(get_tp_size())
    model_cls = ModelRegistry.resolve(model_config.architecture)
    previous_dtype = torch.get_default_dtype()
    torch.set_default_dtype(model_config.dtype)
    try:
        with torch.device(device):
            model = model_cls(model_config.hf_config)
    finally:
        torch.set_default_dtype(previous_dtype)
    return model.eval()


@register_loader(LoadFormat.AUTO, LoadFormat.SAFETENSORS, LoadFormat.PT)
class DefaultModelLoader(BaseModelLoader):
    """Reads an HF checkpoint directory: safetensors (single or sharded) or torch .bin/.pt files."""

    def load_model(self, model_config: ModelConfig, device: torch.device) -> nn.Module:
        """Build the skeleton and stream every checkpoint tensor into it."""
        load_format, files = list_weight_files(model_config.model_path, LoadFormat(self.load_config.load_format))
        model = build_model_skeleton(model_config, device)
        iterator = safetensors_weights_iterator if load_format is LoadFormat.SAFETENSORS else pt_weights_iterator
        model.load_weights(iterator(files))
        model.post_load_weights()
        return model


@register_loader(LoadFormat.DUMMY)
class DummyModelLoader(BaseModelLoader):
    """Random weights, reproducible for a given seed, device and TP layout; no checkpoint needed."""

    def __init__(self, load_config: LoadConfig, seed: int = 0) -> None:
        super().__init__(load_config)
        self.seed = seed

    def load_model(self, model_config: ModelConfig, device: torch.device) -> nn.Module:
        """Build the skeleton and fill it with random values of a sensible scale."""
        model = build_model_skeleton(model_config, device)
        generator = torch.Generator(device=device).manual_seed(self.seed)
        for name, param in model.named_parameters():
            if param.dim() > 1:
                # std 1/sqrt(fan_in) keeps activations O(1) through the layers.
                param.data.normal_(0.0, param.shape[-1] ** -0.5, generator=generator)
            elif name.endswith(".bias"):
                param.data.zero_()
            else:
                param.data.fill_(1.0)
        model.post_load_weights()
        return model
