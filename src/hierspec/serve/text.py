"""Text of one served request: incremental detokenisation with OpenAI's stop-string rule.

The worker commits tokens cut at EOS / the token completing a stop string (`hierspec.output`);
the text returned to an OpenAI client is

    final = tokenizer.decode(all tokens, skip_special_tokens=True), cut where the earliest stop
            string starts (OpenAI excludes the stop string itself; `Output.text` keeps it)

and a stream sends pieces of exactly that text: each `TextStream.push` returns what can no longer
change -- an incomplete UTF-8 character at the end (decoded as U+FFFD) and the last
``len(longest stop) - 1`` characters (a stop string may be starting there) are held back -- and
`TextStream.finish` returns the rest of ``final``.

A push decodes a window, not every token so far (that would be O(n^2) over a long answer):

    prefix = decode(ids[a:b]);  full = decode(ids[a:])        a, b: the last two push boundaries
    if full is longer than prefix and does not end in U+FFFD:  text += full[len(prefix):]; a, b = b, n

(the window starts a push early, so a token's leading space or a character split across tokens
decodes as in the whole text). ``finish`` decodes everything once and sends only what lies beyond
the characters already sent.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["TextStream", "cut_at_stop", "final_text"]


def cut_at_stop(text: str, stop: Sequence[str]) -> int | None:
    """Index where the earliest stop string in ``text`` starts, or None."""
    starts = [i for i in (text.find(s) for s in stop if s) if i >= 0]
    return min(starts) if starts else None


def final_text(tokenizer: Any, token_ids: Sequence[int], stop: Sequence[str]) -> tuple[str, bool]:
    """(the text returned for ``token_ids``, whether a stop string cut it): see module docstring."""
    text = tokenizer.decode(list(token_ids), skip_special_tokens=True)
    cut = cut_at_stop(text, stop)
    return (text, False) if cut is None else (text[:cut], True)


class TextStream:
    """Incremental text of one request (see module docstring)."""

    def __init__(self, tokenizer: Any, stop: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.token_ids: list[int] = []
        self.sent = 0  # characters of the final text already returned
        self.stopped = False  # finish() cut the text at a stop string
        self.text = ""  # the decoded text of token_ids[:self._read]
        self._prefix = self._read = 0  # the window: token_ids[_prefix:_read] decodes to text's tail

    def push(self, token_ids: Sequence[int]) -> str:
        """Add committed tokens; returns the newly final text ("" when nothing is safe yet)."""
        self.token_ids.extend(token_ids)
        ids, a, b = self.token_ids, self._prefix, self._read
        prefix = self.tokenizer.decode(ids[a:b], skip_special_tokens=True) if b > a else ""
        full = self.tokenizer.decode(ids[a:], skip_special_tokens=True)
        pending = ""
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self.text += full[len(prefix) :]
            self._prefix, self._read = b, len(ids)
        else:  # an incomplete character: nothing of it is final yet
            pending = full[len(prefix) :]
        text = self.text + pending
        cut = cut_at_stop(text[max(self.sent - self.hold, 0) :], self.stop)
        if cut is not None:
            cut += max(self.sent - self.hold, 0)
        else:
            cut = max(len(text.rstrip("\ufffd")) - self.hold, 0)
        return self._advance(text[:cut])

    def finish(self, token_ids: Sequence[int] | None = None) -> str:
        """The rest of the final text (``token_ids``: all tokens of the request, when the worker's
        final list is authoritative; default: the pushed ones)."""
        if token_ids is not None:
            self.token_ids = list(token_ids)
        text, self.stopped = final_text(self.tokenizer, self.token_ids, self.stop)
        return self._advance(text)

    def _advance(self, text: str) -> str:
        # a tokenizer that re-merged earlier text (never byte-level BPE) cannot unsend it: only
        # what lies beyond the characters already sent is added
        delta = text[self.sent :]
        self.sent = max(self.sent, len(text))
        return delta
