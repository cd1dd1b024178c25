"""The xgrammar backend: compiled grammars, per-request matchers and batched token masks."""

from __future__ import annotations

import importlib
import re
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    import xgrammar as xgr

from sglang.srt.constrained.grammar_backend import GrammarSpec
from sglang.srt.sampling.sampling_params import SamplingParamsError

# xgrammar's errors start with "[time] /path/file.cc:line: "; the rest is what the user needs.
_SOURCE_PREFIX = re.compile(r"^\[[^\]]*\]\s*\S+:\d+:\s*")


class XGrammarMatcher:
    """One request's xgrammar matcher."""

    def __init__(self, matcher: xgr.GrammarMatcher) -> None:
        self.matcher = matcher
        self.accepted = 0  # tokens accepted: tells a prefetched mask from a stale one

    def accept(self, token_id: int) -> bool:
        """Advance by token_id; False if the grammar does not allow it."""
        ok = self.matcher.accept_token(token_id)
        self.accepted += ok
        return ok

    @property
    def terminated(self) -> bool:
        """Whether the grammar is complete (its stop token accepted)."""
        return self.matcher.is_terminated()


class XGrammarBackend:
    """Builds xgrammar's tokenizer info on first use (a server that never sees a grammar pays nothing)."""

    def __init__(self, tokenizer: Callable[[], Any], vocab_size: int, stop_token_ids: list[int]) -> None:
        self._tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.stop_token_ids = stop_token_ids
        self._lock = threading.Lock()  # compile may run on several threads of the HTTP process
        self._info: xgr.TokenizerInfo | None = None
        self._compiler: xgr.GrammarCompiler | None = None
        self._batch: xgr.BatchGrammarMatcher | None = None  # fills many rows' masks on xgrammar's threads

    def _ready(self) -> tuple[xgr.TokenizerInfo, xgr.GrammarCompiler]:
        with self._lock:
            if self._compiler is None:
                xgr = _xgr()
                self._info = xgr.TokenizerInfo.from_huggingface(
                    self._tokenizer(), vocab_size=self.vocab_size, stop_token_ids=self.stop_token_ids
                )
                # The compiler keeps its own cache of compiled grammars: clients send the same schema again.
                self._compiler = xgr.GrammarCompiler(self._info)
            return self._info, self._compiler

    def compile(self, spec: GrammarSpec) -> str:
        """The compiled grammar as xgrammar's JSON; SamplingParamsError naming spec.kind if it is invalid."""
        _, compiler = self._ready()
        compilers = {
            # Whitespace inside JSON is limited to single spaces: a model could otherwise pad forever.
            "json_schema": lambda: compiler.compile_json_schema(spec.value, any_whitespace=False),
            "regex": lambda: compiler.compile_regex(spec.value),
            "ebnf": lambda: compiler.compile_grammar(spec.value),
        }
        try:
            compiled = compilers[spec.kind]()
        except RuntimeError as e:
            raise SamplingParamsError(spec.kind, f"cannot be compiled: {_message(e)}") from None
        return compiled.serialize_json()

    def matcher(self, compiled: str) -> XGrammarMatcher:
        """A fresh matcher at the start of a grammar that compile() produced."""
        info, _ = self._ready()
        xgr = _xgr()
        grammar = xgr.CompiledGrammar.deserialize_json(compiled, info)
        return XGrammarMatcher(xgr.GrammarMatcher(grammar))

    def new_masks(self, rows: int) -> torch.Tensor:
        """A host bitmask of `rows` rows allowing every token; pinned where CUDA is, so its copy is asynchronous."""
        xgr = _xgr()
        shape = xgr.get_bitmask_shape(rows, self.vocab_size)
        # -1 is every bit set: every token allowed, as xgrammar's own allocation fills it.
        return torch.full(shape, -1, dtype=xgr.bitmask_dtype, pin_memory=torch.cuda.is_available())

    def fill_masks(self, bitmask: torch.Tensor, rows: list[int], matchers: list[XGrammarMatcher]) -> None:
        """Fill bitmask[row] for each matcher: several rows at once on xgrammar's own threads."""
        if len(rows) == 1:
            matchers[0].matcher.fill_next_token_bitmask(bitmask, rows[0])
            return
        with self._lock:
            if self._batch is None:
                self._batch = _xgr().BatchGrammarMatcher()
        self._batch.batch_fill_next_token_bitmask([m.matcher for m in matchers], bitmask, rows)

    def apply_masks(self, logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int]) -> None:
        """Mask the given rows of logits on their device in one call (rows not listed are left alone)."""
        _xgr().apply_token_bitmask_inplace(logits, bitmask.to(logits.device, non_blocking=True), indices=rows)


def _message(error: Exception) -> str:
    text = _SOURCE_PREFIX.sub("", str(error).strip())
    return text.replace("Check failed: (error.empty()) is false: ", "")


def _xgr() -> Any:
    # Imported on the first structured request, not at start: xgrammar brings triton (a second or more).
    return importlib.import_module("xgrammar")
