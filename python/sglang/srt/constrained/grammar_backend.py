"""Grammar backends by name (--grammar-backend), the grammar a request asks for, and the errors it can get."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from sglang.srt.sampling.sampling_params import SamplingParamsError

if TYPE_CHECKING:
    import torch

    from sglang.srt.sampling.sampling_params import SamplingParams

# The sampling parameters that ask for a grammar, in the order they are looked at.
GRAMMAR_KINDS = ("json_schema", "regex", "ebnf")


@dataclass(frozen=True)
class GrammarSpec:
    """What a request constrains its output to: kind is one of GRAMMAR_KINDS, value its text."""

    kind: str
    value: str


def grammar_spec(params: SamplingParams) -> GrammarSpec | None:
    """The grammar params asks for, or None; more than one kind at once is an error naming the second."""
    given = [kind for kind in GRAMMAR_KINDS if getattr(params, kind) is not None]
    if len(given) > 1:
        raise SamplingParamsError(given[1], f"give only one of {', '.join(GRAMMAR_KINDS)}; got {' and '.join(given)}")
    if not given:
        return None
    value = getattr(params, given[0])
    if given[0] == "json_schema":
        try:
            json.loads(value)
        except ValueError as e:
            raise SamplingParamsError("json_schema", f"not valid JSON: {e}") from None
    return GrammarSpec(given[0], value)


class GrammarMatcher(Protocol):
    """One request's position in its grammar."""

    def accept(self, token_id: int) -> bool:
        """Advance by token_id; False if the grammar does not allow it."""

    @property
    def terminated(self) -> bool:
        """Whether the grammar is complete (its stop token accepted): the request must end."""

    @property
    def accepted(self) -> int:
        """Tokens accepted so far: a mask filled at one count is stale at another."""


class GrammarBackend(Protocol):
    """Compiles grammars (in the HTTP process) and rebuilds them into matchers (in the scheduler)."""

    def compile(self, spec: GrammarSpec) -> str:
        """The compiled grammar, serialized for the scheduler; SamplingParamsError naming spec.kind if invalid."""

    def matcher(self, compiled: str) -> GrammarMatcher:
        """A fresh matcher at the start of a compiled grammar."""

    def new_masks(self, rows: int) -> torch.Tensor:
        """A host bitmask of `rows` rows (pinned where CUDA is), each allowing every token."""

    def fill_masks(self, bitmask: torch.Tensor, rows: list[int], matchers: list[GrammarMatcher]) -> None:
        """Fill bitmask[row] with the tokens each matcher allows next; safe on a thread other than the one that
        advances the matchers, as long as none of them is advanced meanwhile."""

    def apply_masks(self, logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int]) -> None:
        """Set to -inf, in place, every logit of the given rows that the same row of the host bitmask forbids."""


def _xgrammar(**kwargs: Any) -> GrammarBackend:
    import importlib.util

    from sglang.srt.constrained.xgrammar_backend import XGrammarBackend

    # Looked up now, imported on the first structured request (xgrammar brings triton: a second or more).
    if importlib.util.find_spec("xgrammar") is None:
        raise RuntimeError("--grammar-backend xgrammar needs xgrammar: pip install xgrammar (or pass none).")

    return XGrammarBackend(**kwargs)


# --grammar-backend name -> factory(tokenizer=callable returning the HF tokenizer, vocab_size, stop_token_ids).
# "none" has no entry: structured output is off, and requests that ask for it are refused.
GRAMMAR_BACKENDS: dict[str, Callable[..., GrammarBackend]] = {"xgrammar": _xgrammar}


def create_grammar_backend(
    name: str, tokenizer: Callable[[], Any], vocab_size: int, stop_token_ids: set[int]
) -> GrammarBackend | None:
    """The backend called name, or None for "none"."""
    factory = GRAMMAR_BACKENDS.get(name)
    if factory is None:
        return None
    return factory(tokenizer=tokenizer, vocab_size=vocab_size, stop_token_ids=sorted(stop_token_ids))


def compile_request_grammar(backend: GrammarBackend | None, params: SamplingParams) -> str | None:
    """The compiled grammar params asks for (None if it asks for none); refused when the server has no backend."""
    spec = grammar_spec(params)
    if spec is None:
        return None
    if backend is None:
        raise SamplingParamsError(
            spec.kind,
            "structured output is off on this server (--grammar-backend none); restart it with "
            "--grammar-backend xgrammar, or leave this parameter out.",
        )
    return backend.compile(spec)
