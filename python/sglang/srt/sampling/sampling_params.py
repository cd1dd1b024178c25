"""SamplingParams: upstream SGLang's sampling fields with validation that names the bad field."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any


class SamplingParamsError(ValueError):
    """A sampling parameter is out of range; `field` names it."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(f"sampling_params.{field_name}: {message}")
        self.field = field_name


@dataclass
class SamplingParams:
    """Per-request sampling settings (names follow upstream SGLang's `sampling_params`)."""

    # None: no limit of its own; the request ends at a stop condition or the context length.
    max_new_tokens: int | None = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_new_tokens: int = 0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    seed: int | None = None
    n: int = 1
    # OpenAI's logit_bias: token id (as a string, JSON object keys being strings) -> value added to its logit.
    logit_bias: dict[str, float] | None = None
    # Structured output (at most one): the output must match this JSON schema, regex or EBNF grammar.
    json_schema: str | None = None
    regex: str | None = None
    ebnf: str | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None, defaults: dict[str, Any] | None = None) -> SamplingParams:
        """Build from a request dict; unknown keys and wrong types are errors naming the key. defaults (the
        server's, e.g. the model's generation_config.json) fill the keys the request leaves out or sets to null."""
        given = {k: v for k, v in (data or {}).items() if v is not None or k in _NULLABLE_KEYS}
        data = {**(defaults or {}), **given}
        names = {f.name: f for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in data.items():
            if key not in names:
                if key in _IGNORED_KEYS:
                    continue
                raise SamplingParamsError(key, f"unknown sampling parameter; known: {', '.join(sorted(names))}")
            if value is None:
                if key in _NULLABLE_KEYS:
                    kwargs[key] = None
                continue
            if key == "json_schema" and isinstance(value, dict):
                value = json.dumps(value)  # upstream takes a string; a schema object means the same
            kwargs[key] = _coerce(key, value, names[key].type)
        params = cls(**kwargs)
        params.validate()
        return params

    def validate(self) -> None:
        """Raise SamplingParamsError for the first out-of-range field."""
        checks = (
            ("max_new_tokens", self.max_new_tokens is None or self.max_new_tokens >= 0, "must be >= 0 or null"),
            ("temperature", self.temperature >= 0, "must be >= 0"),
            ("top_p", 0 < self.top_p <= 1, "must be in (0, 1]"),
            ("top_k", self.top_k == -1 or self.top_k >= 1, "must be -1 (disabled) or >= 1"),
            ("min_p", 0 <= self.min_p <= 1, "must be in [0, 1]"),
            ("frequency_penalty", -2 <= self.frequency_penalty <= 2, "must be in [-2, 2]"),
            ("presence_penalty", -2 <= self.presence_penalty <= 2, "must be in [-2, 2]"),
            ("repetition_penalty", 0 < self.repetition_penalty <= 2, "must be in (0, 2]"),
            ("min_new_tokens", self.min_new_tokens >= 0, "must be >= 0"),
            ("n", self.n >= 1, "must be >= 1"),
            ("seed", self.seed is None or SEED_MIN <= self.seed <= SEED_MAX, f"must be in [{SEED_MIN}, {SEED_MAX}]"),
        )
        for name, ok, message in checks:
            if not ok:
                raise SamplingParamsError(name, f"{message}, got {getattr(self, name)!r}")
        for token, bias in (self.logit_bias or {}).items():
            if not token.isdigit():
                raise SamplingParamsError("logit_bias", f"keys are token ids, got {token!r}")
            if not -100 <= bias <= 100:
                raise SamplingParamsError("logit_bias", f"values must be in [-100, 100], got {bias!r} for {token}")

    @property
    def is_greedy(self) -> bool:
        return self.temperature < 1e-5 or self.top_k == 1

    @property
    def has_penalties(self) -> bool:
        return self.frequency_penalty != 0 or self.presence_penalty != 0 or self.repetition_penalty != 1


# A seed is a signed 64-bit integer, as in OpenAI's API; the sampler's generators take no more.
SEED_MIN, SEED_MAX = -(1 << 63), (1 << 63) - 1
# Keys where an explicit null means something other than "use the default": max_new_tokens null is no limit.
_NULLABLE_KEYS = {"max_new_tokens"}

# Accepted for compatibility with upstream clients; they have no effect here.
_IGNORED_KEYS = {"spaces_between_special_tokens", "no_stop_trim"}


def _coerce(key: str, value: Any, annotation: str) -> Any:
    text = str(annotation)
    if isinstance(value, float) and not math.isfinite(value):
        # NaN and infinities pass or fail range checks by accident, so they never get that far.
        raise SamplingParamsError(key, f"must be a finite number, got {value!r}")
    try:
        if text.startswith("bool"):
            if not isinstance(value, bool):
                raise TypeError
            return value
        if text.startswith("int"):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
                raise TypeError
            return int(value)
        if text.startswith("float"):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError
            return float(value)
        if text.startswith("list[str]"):
            value = [value] if isinstance(value, str) else value
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise TypeError
            return value
        if text.startswith("str"):
            if not isinstance(value, str):
                raise TypeError
            return value
        if text.startswith("dict[str, float]"):
            if not isinstance(value, dict) or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in value.values()
            ):
                raise TypeError
            return {str(k): float(v) for k, v in value.items()}
        if text.startswith("list[int]"):
            if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
                raise TypeError
            return value
    except TypeError:
        shown = repr(value) if len(repr(value)) <= 80 else repr(value)[:80] + "..."
        raise SamplingParamsError(key, f"expected {text}, got {type(value).__name__} {shown}") from None
    return value
