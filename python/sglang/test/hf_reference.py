"""HF transformers as the numerical reference for tests."""

from __future__ import annotations

import functools
from typing import Any

import torch


@functools.lru_cache(maxsize=4)
def hf_model(model_path: str) -> Any:
    """The HF model of a checkpoint in float32, loaded once per test process (only read, never changed)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()


def _greedy(model: Any, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    outs = []
    with torch.inference_mode():
        for prompt in prompts:
            ids = torch.tensor([prompt])
            new: list[int] = []
            for _ in range(max_new_tokens):
                nxt = int(model(ids).logits[0, -1].argmax())
                new.append(nxt)
                ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
            outs.append(new)
    return outs


def hf_greedy(model_path: str, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """Greedy continuation of each prompt with HF transformers (float32, full recompute, EOS ignored)."""
    return _greedy(hf_model(model_path), prompts, max_new_tokens)


@functools.cache
def hf_prefill_and_greedy(
    model_path: str, prompts: tuple[tuple[int, ...], ...], max_new_tokens: int
) -> tuple[list[torch.Tensor], list[list[int]]]:
    """HF prefill logits per prompt and HF greedy continuations, from one load of the model (cached per model)."""
    model = hf_model(model_path)
    with torch.inference_mode():
        logits = [model(torch.tensor([list(p)])).logits[0].float() for p in prompts]
    return logits, _greedy(model, [list(p) for p in prompts], max_new_tokens)


def assert_close_to_hf(
    model_path: str, prompts: list[list[int]], max_new_tokens: int, logits: list[Any], tokens: list[list[int]]
) -> None:
    """Our prefill logits within 1e-3 of HF's and our greedy tokens equal to HF's."""
    ref_logits, ref_tokens = hf_prefill_and_greedy(model_path, tuple(map(tuple, prompts)), max_new_tokens)
    for ours, ref in zip(logits, ref_logits):
        torch.testing.assert_close(torch.as_tensor(ours), ref, atol=1e-3, rtol=0)
    assert tokens == ref_tokens
