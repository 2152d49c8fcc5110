"""`encode_prompt`: the token ids of a `Prompt` (chat prompts through the tokenizer's chat
template, raw text as is), the one encoding the command line, the benchmark and calibration share."""

from __future__ import annotations

from typing import Any

from .prompt import Prompt

__all__ = ["encode_prompt"]


def encode_prompt(tokenizer: Any, prompt: Prompt) -> list[int]:
    """Token ids of a prompt: chat prompts through the chat template, raw text as is."""
    if prompt.chat:
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt.text}], add_generation_prompt=True, tokenize=True
        )
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
    else:
        ids = tokenizer(prompt.text)["input_ids"]
    return [int(i) for i in ids]
