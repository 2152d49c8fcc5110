"""The committed output of one generation: EOS, stop strings, streaming, finish reason, text.

Every decode loop (`hierspec.engine.generate`, `hierspec.ssd.SSDSession.generate`) hands each
step's emitted tokens to one `Output`, which decides what is committed:

    step = tokens emitted by one verification        (X_1..X_tau, Y)
    cut after the first EOS id in step                finish = "eos"  (the EOS is kept)
    cut after the token completing a stop string      finish = "stop" (needs a tokenizer)
    on_tokens(committed part of step)                 streaming, never an empty list
    otherwise                                         finish stays "length"

and, at the end, the text: ``tokenizer.decode(tokens, skip_special_tokens=True)``, cut right after
the earliest stop string. Cutting only shortens the output, never changes a token, so it keeps
whatever law the loop's tokens have (exactness is the loop's business).
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable, Sequence
from typing import Any

__all__ = ["Output", "find_stop"]


def find_stop(text: str, stop_strings: Sequence[str]) -> int | None:
    """End index of the earliest stop-string occurrence in text, or None."""
    ends = [text.find(s) + len(s) for s in stop_strings if s and s in text]
    return min(ends) if ends else None


def _eos_set(eos_token_id: int | Sequence[int] | None) -> set[int]:
    if eos_token_id is None:
        return set()
    try:
        ids = list(eos_token_id) if isinstance(eos_token_id, Iterable) else [eos_token_id]
        return {operator.index(i) for i in ids}
    except TypeError:
        raise ValueError(
            f"eos_token_id: expected a token id, a list of token ids or None, got {eos_token_id!r}"
        ) from None


class Output:
    """Accumulates one generation's committed tokens (see module docstring).

    eos_token_id: id(s) that end generation (kept in the output). stop_strings: strings that end
    generation once the decoded new text contains one (needs ``tokenizer``). on_tokens: called
    with the committed part of every step. Raises ValueError for a bad argument (named).
    """

    def __init__(
        self,
        *,
        eos_token_id: int | Sequence[int] | None = None,
        stop_strings: Sequence[str] = (),
        tokenizer: Any = None,
        on_tokens: Callable[[list[int]], None] | None = None,
    ) -> None:
        if isinstance(stop_strings, str):
            raise ValueError(f"stop_strings: expected a list of strings, got the string {stop_strings!r}")
        stop_strings = list(stop_strings or ())
        if any(not isinstance(s, str) for s in stop_strings):
            raise ValueError(f"stop_strings: expected a list of strings, got {stop_strings!r}")
        if stop_strings and tokenizer is None:
            raise ValueError("stop_strings: a tokenizer is needed to match stop strings")
        self.eos = _eos_set(eos_token_id)
        self.stop_strings = stop_strings
        self.tokenizer = tokenizer
        self.on_tokens = on_tokens
        self.tokens: list[int] = []
        self.finish = "length"  # "length" | "eos" | "stop"

    @property
    def done(self) -> bool:
        """Whether an EOS or a stop string ended the generation."""
        return self.finish != "length"

    def commit(self, step: list[int]) -> list[int]:
        """Commit one step's tokens; returns the part kept (cut at EOS / stop string)."""
        for i, tok in enumerate(step):
            if tok in self.eos:
                step, self.finish = step[: i + 1], "eos"
                break
        self.tokens.extend(step)
        if self.stop_strings:
            text = self.tokenizer.decode(self.tokens, skip_special_tokens=False)
            if find_stop(text, self.stop_strings) is not None:
                step = self._cut_at_stop(step)
                self.finish = "stop"
        if self.on_tokens is not None and step:
            self.on_tokens(step)
        return step

    def _cut_at_stop(self, step: list[int]) -> list[int]:
        """Drop the tokens after the one that completes the stop string."""
        base = len(self.tokens) - len(step)
        for i in range(len(step)):
            text = self.tokenizer.decode(self.tokens[: base + i + 1], skip_special_tokens=False)
            if find_stop(text, self.stop_strings) is not None:
                self.tokens = self.tokens[: base + i + 1]
                return step[: i + 1]
        return step

    def text(self) -> str | None:
        """The decoded new text (None without a tokenizer), cut after a stop string."""
        if self.tokenizer is None:
            return None
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if self.finish == "stop":
            end = find_stop(text, self.stop_strings)
            if end is not None:
                text = text[:end]
        return text
