"""--model-path ORG/NAME: resolve a Hugging Face Hub id to a local snapshot through the Hub cache."""

from __future__ import annotations

import logging
import os
import re

logger = logging.getLogger(__name__)

# What a server reads from a snapshot besides weights: configs, tokenizer files, chat templates.
CONFIG_AND_TOKENIZER_PATTERNS = ["*.json", "*.jinja", "*.model", "*.txt", "*.tiktoken", "*.py"]
# Weight files by load format; a format missing here (remote_instance, dummy) downloads no weights at all.
WEIGHT_PATTERNS: dict[str, list[str]] = {
    "auto": ["*.safetensors"],
    "safetensors": ["*.safetensors"],
    "pt": ["*.bin", "*.pt"],
}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class HubResolveError(ValueError):
    """A Hub id could not be turned into a local snapshot; the message says why and what to do."""


def is_hub_id(model_path: str) -> bool:
    """Whether model_path reads as ORG/NAME and is not a local directory."""
    return not os.path.exists(model_path) and bool(_HUB_ID.match(model_path))


def resolve_model_path(model_path: str, revision: str | None, download_dir: str | None, load_format: str) -> str:
    """The local directory for model_path: itself if local, else its Hub snapshot (downloaded if the Hub is
    reachable and HF_HUB_OFFLINE is not set; from the cache only otherwise)."""
    if not is_hub_id(model_path):
        return model_path
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalEntryNotFoundError

    patterns = CONFIG_AND_TOKENIZER_PATTERNS + WEIGHT_PATTERNS.get(load_format, [])
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")
    logger.info(
        "Resolving %s (revision %s) through the Hugging Face cache%s",
        model_path,
        revision or "main",
        " (HF_HUB_OFFLINE: cache only)" if offline else "",
    )
    try:
        path = snapshot_download(
            model_path, revision=revision, cache_dir=download_dir, allow_patterns=patterns, local_files_only=offline
        )
    except LocalEntryNotFoundError:
        where = download_dir or "the Hugging Face cache"
        raise HubResolveError(
            f"--model-path {model_path} (revision {revision or 'main'}) is not in {where}, and the Hub "
            + ("may not be used (HF_HUB_OFFLINE is set)" if offline else "could not be reached")
            + "; download it where the Hub is reachable, or pass a local model directory."
        ) from None
    except (HfHubHTTPError, HFValidationError) as e:
        raise HubResolveError(f"--model-path {model_path}: the Hub refused it: {e}") from None
    logger.info("Model %s is at %s", model_path, path)
    return str(path)
