"""Limits on one request's size (from the server flags) and the checks that need the model's vocabulary."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sglang.srt.managers.io_struct import InvalidRequestError
from sglang.srt.sampling.sampling_params import SamplingParams, SamplingParamsError

if TYPE_CHECKING:
    from sglang.srt.server_args import ServerArgs

# A normalizer (NFC/NFKC, accent stripping) can shorten text before it is split into tokens; the prompt-length
# estimate leaves this much room for it so that no prompt that would fit is refused.
_NORMALIZER_SLACK = 2


@dataclass(frozen=True)
class RequestLimits:
    """What one request may ask for; each check raises an error naming the field and the flag that sets it."""

    vocab_size: int
    max_prompt_tokens: int
    max_token_chars: int  # the most characters any single token stands for
    max_stop_strings: int
    max_stop_string_length: int
    max_n: int
    max_top_logprobs_num: int

    @classmethod
    def build(cls, server_args: ServerArgs, vocab_size: int, max_prompt_tokens: int, tokenizer: Any) -> RequestLimits:
        """Limits of a server: its flags, its model's vocabulary and how many prompt tokens it takes."""
        longest = max((len(piece) for piece in tokenizer.get_vocab()), default=1)
        return cls(
            vocab_size=vocab_size,
            max_prompt_tokens=max_prompt_tokens,
            max_token_chars=max(longest, 1),
            max_stop_strings=server_args.max_stop_strings,
            max_stop_string_length=server_args.max_stop_string_length,
            max_n=server_args.max_n,
            max_top_logprobs_num=min(server_args.max_top_logprobs_num, vocab_size),
        )

    @property
    def max_prompt_chars(self) -> int:
        """A text longer than this cannot fit in max_prompt_tokens, whatever it says: refused without tokenizing."""
        return (self.max_prompt_tokens + 1) * self.max_token_chars * _NORMALIZER_SLACK

    def check_prompt_text(self, text: str, field: str) -> None:
        """Refuse a prompt too long to be tokenized into max_prompt_tokens, before spending time on tokenizing."""
        if len(text) > self.max_prompt_chars:
            raise InvalidRequestError(
                field,
                f"the prompt has {len(text)} characters; this server takes at most {self.max_prompt_tokens} prompt "
                f"tokens (--context-length), which no text over {self.max_prompt_chars} characters fits. "
                "Shorten the prompt.",
            )

    def check_n(self, n: int) -> None:
        """Refuse more choices than --max-n (before the request is expanded into them)."""
        if n > self.max_n:
            raise SamplingParamsError("n", f"must be in [1, {self.max_n}] (--max-n), got {n}")

    def check_top_logprobs_num(self, num: int) -> None:
        """Refuse more alternatives per token than the vocabulary has or --max-top-logprobs-num allows."""
        if not 0 <= num <= self.max_top_logprobs_num:
            raise InvalidRequestError(
                "top_logprobs_num",
                f"must be in [0, {self.max_top_logprobs_num}] (the smaller of --max-top-logprobs-num and the "
                f"vocabulary size {self.vocab_size}), got {num}.",
            )

    def check_sampling(self, params: SamplingParams) -> None:
        """The sampling checks that depend on this server: token ids in the vocabulary, stop strings."""
        self._check_in_vocab("logit_bias", [int(t) for t in params.logit_bias or {}])
        if len(params.stop) > self.max_stop_strings:
            raise SamplingParamsError(
                "stop", f"at most {self.max_stop_strings} stop strings (--max-stop-strings), got {len(params.stop)}"
            )
        longest = max((len(s) for s in params.stop), default=0)
        if longest > self.max_stop_string_length:
            raise SamplingParamsError(
                "stop",
                f"a stop string has {longest} characters, more than {self.max_stop_string_length} "
                "(--max-stop-string-length)",
            )
        self._check_in_vocab("stop_token_ids", params.stop_token_ids)

    def _check_in_vocab(self, field: str, ids: list[int]) -> None:
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise SamplingParamsError(field, f"token id {bad[0]} is not in the vocabulary [0, {self.vocab_size})")
