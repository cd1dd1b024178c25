"""What the main process keeps per in-flight request: its received tokens and what streamed chunks already carried."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from sglang.srt.managers.detokenizer import IncrementalDetokenizer


@dataclass
class OutputCursor:
    """How much of a request's text, ids and logprobs earlier chunks of a delta stream already carried."""

    text: int = 0
    ids: int = 0
    logprobs: int = 0

    def cut(self, out: dict[str, Any]) -> dict[str, Any]:
        """out (cumulative) reduced to what is new since the last cut. Text already sent is not taken back: where a
        stop string turned out to begin in it, that beginning has been sent."""
        text, ids, meta = out["text"], out["output_ids"], out["meta_info"]
        out["text"], self.text = text[self.text :], max(self.text, len(text))
        out["output_ids"], self.ids = ids[self.ids :], len(ids)
        if "output_token_logprobs" in meta:
            start, self.logprobs = self.logprobs, len(meta["output_token_logprobs"])
            meta["output_token_logprobs"] = meta["output_token_logprobs"][start:]
            meta["output_top_logprobs"] = meta["output_top_logprobs"][start:]
        return out


@dataclass
class ReqState:
    """What the main process knows of one in-flight request. Outputs are built when the caller reads them, not
    as tokens arrive: a caller that falls behind gets one output covering everything new, and a request that does
    not stream is decoded once, at its end."""

    rid: str  # the client's (or a fresh) request id, as the output's id says
    wire_id: str  # this request's id towards the scheduler: unique even when a client reuses a finished rid
    prompt_tokens: int
    detokenizer: IncrementalDetokenizer
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[tuple[float, int]] = field(default_factory=list)
    top_logprobs: list[list[tuple[float, int]]] = field(default_factory=list)
    cached_tokens: int = 0
    sent: OutputCursor = field(default_factory=OutputCursor)  # what earlier chunks held (delta streams)
    finish_reason: dict[str, Any] | None = None
    event: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
