"""Messages between the HTTP layer, the TokenizerManager (main process) and the rank-0 scheduler."""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sglang.srt.sampling.sampling_params import SamplingParams


@dataclass
class GenerateReqInput:
    """A /generate request as users send it: one prompt or a batch (text or input_ids)."""

    text: str | list[str] | None = None
    input_ids: list[int] | list[list[int]] | None = None
    sampling_params: dict[str, Any] | list[dict[str, Any]] | None = None
    rid: str | list[str] | None = None
    return_logprob: bool = False
    top_logprobs_num: int = 0
    stream: bool = False

    def is_batch(self) -> bool:
        if self.text is not None:
            return isinstance(self.text, list)
        return bool(self.input_ids) and isinstance(self.input_ids[0], list)

    def split(self, check_n: Callable[[int], None]) -> list[GenerateReqInput]:
        """One GenerateReqInput per prompt and choice: a batch, and `n` > 1, are served as independent requests.

        Choices of a prompt come one after another; choice j of a seeded prompt uses seed + j and rid r-j.
        """
        return [choice for prompt in self._split_prompts() for choice in prompt._split_choices(check_n)]

    def _split_choices(self, check_n: Callable[[int], None]) -> list[GenerateReqInput]:
        params = self.sampling_params
        n = params.get("n", 1) if isinstance(params, dict) else 1
        if not isinstance(n, int) or isinstance(n, bool) or n <= 1:
            return [self]  # n == 1, or a bad n that SamplingParams validation will name
        check_n(n)  # the server's --max-n (RequestLimits.check_n)
        choices = []
        for j in range(n):
            choice = {**params, "n": 1}
            if isinstance(params.get("seed"), int):
                choice["seed"] = params["seed"] + j
            rid = f"{self.rid}-{j}" if isinstance(self.rid, str) else None
            choices.append(dataclasses.replace(self, sampling_params=choice, rid=rid))
        return choices

    def _split_prompts(self) -> list[GenerateReqInput]:
        if self.text is None and self.input_ids is None:
            raise ValueError("Either 'text' or 'input_ids' is required.")
        if self.text is not None and self.input_ids is not None:
            raise ValueError("Give either 'text' or 'input_ids', not both.")
        if not self.is_batch():
            if isinstance(self.rid, list):
                raise InvalidRequestError("rid", "one prompt takes one rid (a string); a list is for a batch.")
            if isinstance(self.sampling_params, list):
                raise InvalidRequestError(
                    "sampling_params", "one prompt takes one sampling_params object; a list is for a batch."
                )
            return [self]
        prompts = self.text if self.text is not None else self.input_ids
        n = len(prompts)
        if n == 0:
            raise ValueError("The batch of prompts is empty.")
        params = self.sampling_params
        if isinstance(params, list) and len(params) != n:
            raise ValueError(f"'sampling_params' has {len(params)} entries for {n} prompts.")
        rids = self.rid
        if isinstance(rids, str):
            raise InvalidRequestError("rid", f"a batch of {n} prompts takes a list of {n} rids, not one string.")
        if isinstance(rids, list) and len(rids) != n:
            raise InvalidRequestError("rid", f"'rid' has {len(rids)} entries for {n} prompts.")
        return [
            GenerateReqInput(
                text=prompts[i] if self.text is not None else None,
                input_ids=prompts[i] if self.input_ids is not None else None,
                sampling_params=params[i] if isinstance(params, list) else params,
                rid=rids[i] if isinstance(rids, list) else None,
                return_logprob=self.return_logprob,
                top_logprobs_num=self.top_logprobs_num,
                stream=self.stream,
            )
            for i in range(n)
        ]


class InvalidRequestError(ValueError):
    """A top-level request field is invalid; `field` names it (text, input_ids, rid, ...)."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(message)
        self.field = field_name


def new_rid() -> str:
    """A fresh request id."""
    return uuid.uuid4().hex


@dataclass
class TokenizedGenerateReqInput:
    """A single tokenized request sent to the scheduler."""

    rid: str
    input_ids: list[int]
    sampling_params: SamplingParams
    return_logprob: bool = False
    top_logprobs_num: int = 0
    grammar: str | None = None  # the compiled grammar of a structured-output request, serialized by its backend


@dataclass
class AbortReq:
    """Stop a request and free its memory."""

    rid: str


@dataclass
class BatchTokenIDOut:
    """New tokens of one scheduler step, per request (rank 0 → TokenizerManager)."""

    rids: list[str] = field(default_factory=list)
    new_token_ids: list[list[int]] = field(default_factory=list)
    finished_reasons: list[dict[str, Any] | None] = field(default_factory=list)
    prompt_tokens: list[int] = field(default_factory=list)
    completion_tokens: list[int] = field(default_factory=list)
    cached_tokens: list[int] = field(default_factory=list)
    new_token_logprobs: list[list[float]] = field(default_factory=list)
    new_top_logprobs: list[list[list[tuple[float, int]]]] = field(default_factory=list)


@dataclass
class RpcReqInput:
    """A control call run by every TP rank (flush_cache, get_weights_by_name, R-Fork seed steps, ...)."""

    method: str
    params: dict[str, Any] = field(default_factory=dict)
    rid: str = field(default_factory=new_rid)


@dataclass
class RpcReqOutput:
    """The answers of every TP rank to one RpcReqInput, in rank order."""

    rid: str
    results: list[Any]
