"""What an OpenAI route does with fields it did not declare: refuse those whose meaning it cannot honour, accept the
documented no-ops, log the rest once per field name."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from sglang.srt.entrypoints.openai.protocol import APIError, SamplingRequest

logger = logging.getLogger(__name__)

# Accepted and without effect here: they change nothing about the answer a client gets (`user` is declared; tools
# with tool_choice "none" and response_format "text" are accepted by the checks below and the schema).
NO_OP_FIELDS = frozenset({"metadata", "store", "parallel_tool_calls"})


def _asks_for_tool_call(value: Any, extra: dict[str, Any]) -> str | None:
    if value in (None, "none", "auto"):
        return None
    return "tool calling is not supported; send tool_choice 'none' (or leave tools out)."


def _sends_tools(value: Any, extra: dict[str, Any]) -> str | None:
    if not value or extra.get("tool_choice") == "none":
        return None
    return (
        "tool calling is not supported, so the model could not call these tools; send tool_choice 'none' to have "
        "them ignored, or leave tools out."
    )


def _sends_functions(value: Any, extra: dict[str, Any]) -> str | None:
    if not value or extra.get("function_call") == "none":
        return None
    return "function calling is not supported; leave functions out."


def _set(what: str) -> Callable[[Any, dict[str, Any]], str | None]:
    def check(value: Any, extra: dict[str, Any]) -> str | None:
        return f"{what} is not supported; leave it out." if value not in (None, "", [], {}, False) else None

    return check


def _best_of(value: Any, extra: dict[str, Any]) -> str | None:
    return None if value in (None, 1) else "best_of > 1 is not supported; use n for several samples."


def _modalities(value: Any, extra: dict[str, Any]) -> str | None:
    return None if value in (None, ["text"]) else "only text output is supported; send ['text'] or leave it out."


# field -> check(value, all extra fields) giving why the request cannot be served as asked, or None. Checked in
# this order, so a required tool_choice is named before the tools it applies to.
REFUSED_FIELDS: dict[str, Callable[[Any, dict[str, Any]], str | None]] = {
    "tool_choice": _asks_for_tool_call,
    "tools": _sends_tools,
    "function_call": _asks_for_tool_call,
    "functions": _sends_functions,
    "suffix": _set("suffix (text after the insertion point)"),
    "best_of": _best_of,
    "modalities": _modalities,
    "audio": _set("audio output"),
    "prediction": _set("predicted outputs"),
}

_warned: set[str] = set()


def check_extra_fields(req: SamplingRequest) -> None:
    """Raise APIError naming a field whose meaning cannot be honoured; log each other unknown field name once."""
    extra = dict(req.model_extra or {})
    for name, check in REFUSED_FIELDS.items():
        if name in extra:
            why = check(extra[name], extra)
            if why:
                raise APIError(f"'{name}': {why}", param=name)
    unknown = [name for name in extra if name not in NO_OP_FIELDS and name not in REFUSED_FIELDS]
    if req.stream_options is not None:
        unknown += [f"stream_options.{name}" for name in req.stream_options.model_extra or {}]
    for name in unknown:
        if name not in _warned:
            _warned.add(name)
            logger.warning("Ignoring the unknown request field %r (this is logged once per field name).", name)
