"""--chat-template: a Jinja file, or the name of a template built in here, replacing the tokenizer's own."""

from __future__ import annotations

import os

_CHATML = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

_LLAMA3 = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + "
    "'<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)

# Built-in templates by the names upstream SGLang gives them.
BUILTIN_CHAT_TEMPLATES: dict[str, str] = {"chatml": _CHATML, "llama-3-instruct": _LLAMA3}


class ChatTemplateError(ValueError):
    """--chat-template names neither a readable file nor a built-in template."""


def resolve_chat_template(value: str) -> str:
    """The Jinja text that --chat-template value stands for: a file's contents or a built-in template."""
    if os.path.isfile(value):
        with open(value, encoding="utf-8") as f:
            return f.read()
    if value in BUILTIN_CHAT_TEMPLATES:
        return BUILTIN_CHAT_TEMPLATES[value]
    raise ChatTemplateError(
        f"--chat-template {value!r} is neither a file nor a built-in template "
        f"({', '.join(sorted(BUILTIN_CHAT_TEMPLATES))})."
    )
