"""--log-requests: one INFO line when a request arrives and one when it ends, as detailed as --log-requests-level."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

logger = logging.getLogger("sglang.requests")

# Level 2 shows this much of the output text; level 3 shows all of it and the prompt too.
OUTPUT_CHARS_AT_LEVEL_2 = 2048
# Level at which each part of a request appears in its lines.
LEVEL_SAMPLING_PARAMS = 1
LEVEL_OUTPUT_TEXT = 2
LEVEL_PROMPT_TEXT = 3


class RequestLogger:
    """Formats the two lines of each request; text is decoded only when the level asks for it."""

    def __init__(self, level: int, tokenizer: Any) -> None:
        self.level = level
        self.tokenizer = tokenizer

    def received(self, rid: str, input_ids: list[int], sampling_params: Any) -> None:
        """The request was tokenized and queued."""
        parts = [f"rid={rid}", f"prompt_tokens={len(input_ids)}"]
        if self.level >= LEVEL_SAMPLING_PARAMS:
            parts.append(f"sampling_params={_changed_fields(sampling_params)}")
        if self.level >= LEVEL_PROMPT_TEXT:
            parts.append(f"prompt={self.tokenizer.decode(input_ids)!r}")
        logger.info("Receive: %s", ", ".join(parts))

    def finished(
        self,
        rid: str,
        prompt_tokens: int,
        output_ids: list[int],
        cached_tokens: int,
        finish_reason: dict[str, Any] | None,
        latency: float,
        ttft: float | None,
    ) -> None:
        """The request ended (finished, aborted, or its client went away)."""
        parts = [
            f"rid={rid}",
            f"prompt_tokens={prompt_tokens}",
            f"completion_tokens={len(output_ids)}",
            f"cached_tokens={cached_tokens}",
            f"finish_reason={finish_reason}",
            f"latency={latency:.3f}s",
            f"ttft={ttft:.3f}s" if ttft is not None else "ttft=None",
        ]
        if self.level >= LEVEL_OUTPUT_TEXT:
            text = self.tokenizer.decode(output_ids, skip_special_tokens=True)
            if self.level < LEVEL_PROMPT_TEXT and len(text) > OUTPUT_CHARS_AT_LEVEL_2:
                text = text[:OUTPUT_CHARS_AT_LEVEL_2] + "...(cut)"
            parts.append(f"output={text!r}")
        logger.info("Finish: %s", ", ".join(parts))


def _changed_fields(params: Any) -> dict[str, Any]:
    """A sampling-params dataclass as the fields that differ from their defaults (the line stays short)."""
    if not dataclasses.is_dataclass(params):
        return dict(params or {})
    out = {}
    for f in dataclasses.fields(params):
        value = getattr(params, f.name)
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if value != default:
            out[f.name] = value
    return out
