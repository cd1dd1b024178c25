"""Decides when a request is finished: EOS, stop token ids, stop strings, length limits."""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Any

from sglang.srt.managers.detokenizer import tail_text

if TYPE_CHECKING:
    from sglang.srt.configs.model_config import ModelConfig
    from sglang.srt.managers.schedule_batch import Req


class StopChecker:
    """Every rank runs the same checks on the same tokens, so every rank reaches the same decision."""

    def __init__(self, tokenizer_path: str, model_config: ModelConfig) -> None:
        self.tokenizer_path = tokenizer_path
        self.eos_ids = eos_token_ids(model_config)
        self._tokenizer: Any = None

    def stop_ids_for(self, req: Req) -> set[int]:
        """Token ids that end req (used to hold them back until min_new_tokens)."""
        ids = set(req.sampling_params.stop_token_ids)
        return ids if req.sampling_params.ignore_eos else ids | self.eos_ids

    def check(self, req: Req, context_len: int) -> None:
        """Set req.finished_reason if its newest token ends it."""
        params = req.sampling_params
        last = req.output_ids[-1]
        is_stop_token = last in params.stop_token_ids or (not params.ignore_eos and last in self.eos_ids)
        if is_stop_token and len(req.output_ids) >= params.min_new_tokens:
            req.finished_reason = {"type": "stop", "matched": last}
            return
        if params.stop and len(req.output_ids) >= params.min_new_tokens:
            if len(req.output_ids) <= max(params.min_new_tokens, 1):
                # The first check also sees stop strings made before min_new_tokens allowed stopping.
                text = self.tokenizer.decode(req.output_ids, skip_special_tokens=params.skip_special_tokens)
            else:
                # Later ones need only the end: decoding the whole output every step costs O(length) per token.
                longest = max(len(s) for s in params.stop)
                text = tail_text(self.tokenizer, req.output_ids, longest, params.skip_special_tokens)
            for s in params.stop:
                if s and s in text:
                    req.finished_reason = {"type": "stop", "matched": s}
                    return
        limit = params.max_new_tokens
        if (limit is not None and len(req.output_ids) >= limit) or req.seqlen >= context_len:
            req.finished_reason = {"type": "length", "matched": None}

    @property
    def tokenizer(self) -> Any:
        # Loaded on first use: most requests have no stop strings.
        if self._tokenizer is None:
            from sglang.srt.configs.hf_files import load_tokenizer

            self._tokenizer = load_tokenizer(self.tokenizer_path)
        return self._tokenizer


def eos_token_ids(model_config: ModelConfig) -> set[int]:
    """The model's end-of-sequence ids: config.json's and generation_config.json's."""
    ids: set[int] = set()
    for source in (getattr(model_config.hf_config, "eos_token_id", None), _generation_eos(model_config.model_path)):
        if isinstance(source, int):
            ids.add(source)
        elif isinstance(source, list):
            ids.update(int(x) for x in source)
    return ids


def _generation_eos(model_path: str) -> Any:
    path = os.path.join(model_path, "generation_config.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f).get("eos_token_id")
