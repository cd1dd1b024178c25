"""Finding checkpoint files in a model directory and streaming their tensors."""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterator

import torch

from sglang.srt.configs.load_config import LoadFormat

_SAFETENSORS_INDEX = "model.safetensors.index.json"
_PT_INDEX = "pytorch_model.bin.index.json"


class WeightLoadingError(RuntimeError):
    """A checkpoint does not fit the model it is loaded into."""


class WeightFilesNotFoundError(FileNotFoundError):
    """The model directory holds no weight files of the requested format."""


def _indexed_files(model_dir: str, index_name: str) -> list[str] | None:
    index_path = os.path.join(model_dir, index_name)
    if not os.path.isfile(index_path):
        return None
    with open(index_path) as f:
        weight_map = json.load(f)["weight_map"]
    # The index names exactly the shards of this checkpoint; stray files (e.g. consolidated copies) are ignored.
    return [os.path.join(model_dir, name) for name in sorted(set(weight_map.values()))]


def _safetensors_files(model_dir: str) -> list[str]:
    indexed = _indexed_files(model_dir, _SAFETENSORS_INDEX)
    return indexed if indexed is not None else sorted(glob.glob(os.path.join(model_dir, "*.safetensors")))


def _pt_files(model_dir: str) -> list[str]:
    indexed = _indexed_files(model_dir, _PT_INDEX)
    if indexed is not None:
        return indexed
    files = glob.glob(os.path.join(model_dir, "*.bin")) + glob.glob(os.path.join(model_dir, "*.pt"))
    return sorted(f for f in files if not os.path.basename(f).startswith("training_args"))


def list_weight_files(model_dir: str, load_format: LoadFormat) -> tuple[LoadFormat, list[str]]:
    """The concrete format (auto resolved) and the weight files to read, in a stable order."""
    if load_format in (LoadFormat.AUTO, LoadFormat.SAFETENSORS):
        files = _safetensors_files(model_dir)
        if files:
            return LoadFormat.SAFETENSORS, files
        if load_format is LoadFormat.SAFETENSORS:
            raise WeightFilesNotFoundError(
                f"no *.safetensors weights in {model_dir}; use --load-format auto, pt, dummy or remote_instance"
            )
    files = _pt_files(model_dir)
    if files:
        return LoadFormat.PT, files
    if load_format is LoadFormat.PT:
        raise WeightFilesNotFoundError(
            f"no *.bin or *.pt weights in {model_dir}; use --load-format auto, safetensors, dummy or remote_instance"
        )
    raise WeightFilesNotFoundError(
        f"no *.safetensors or *.bin weights in {model_dir}; use --load-format dummy or remote_instance"
    )


def safetensors_weights_iterator(files: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, CPU tensor) for every tensor of the given safetensors files."""
    from safetensors import safe_open

    for path in files:
        with safe_open(path, framework="pt", device="cpu") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open handles are not iterable)
                yield name, f.get_tensor(name)


def pt_weights_iterator(files: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, CPU tensor) from torch-pickled state dicts, refusing arbitrary pickled objects."""
    for path in files:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        yield from state.items()
        del state


def default_weight_loader(param: torch.Tensor, loaded_weight: torch.Tensor) -> None:
    """Copy a whole tensor into param, refusing a shape mismatch instead of broadcasting."""
    if param.shape != loaded_weight.shape:
        raise WeightLoadingError(
            f"shape mismatch: parameter {tuple(param.shape)} vs checkpoint {tuple(loaded_weight.shape)}"
        )
    param.data.copy_(loaded_weight)
