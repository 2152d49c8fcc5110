"""Host-memory prefix cache of the batch worker: copies of finished sequences' cells.

The worker keeps a finished sequence's cells where they are (its seq_id is free, its cells hold
its prompt and answer but the last token) and reuses them for a new prompt that shares a prefix.
With more distinct prompts than seq_ids those cells are overwritten; before that, the worker
`PrefixStore.put`s a copy here (``llama_state_seq_get_data``), and a later prompt that shares a
longer prefix with a copy than with any free seq_id gets it back (``llama_state_seq_set_data``)
and prefills only the rest -- what llama-server's ``--cache-ram`` does.

Entries are keyed by their tokens, least recently used first out, within ``budget`` bytes; an
entry whose tokens are a prefix of another's is dropped (the longer one serves it too).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of ``a`` and ``b``."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


class PrefixStore:
    """See module docstring. ``budget``: bytes of copies kept (0: none)."""

    def __init__(self, budget: int) -> None:
        if budget < 0:
            raise ValueError(f"budget: expected bytes >= 0, got {budget}")
        self.budget = int(budget)
        self.used = 0
        self._entries: OrderedDict[tuple[int, ...], tuple[Any, int]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, tokens: Sequence[int], state: Any, size: int) -> None:
        """Keep ``state`` (``size`` bytes) of the cells holding ``tokens``."""
        key = tuple(tokens)
        if not key or size > self.budget:
            return
        for other in list(self._entries):
            if len(other) >= len(key) and other[: len(key)] == key:  # already served by a longer one
                self._entries.move_to_end(other)
                return
            if other == key[: len(other)]:
                self._drop(other)
        self._entries[key] = (state, size)
        self.used += size
        while self.used > self.budget:
            self._drop(next(iter(self._entries)))

    def best(self, prompt: Sequence[int]) -> tuple[tuple[int, ...], Any, int]:
        """(tokens, state, n): the entry sharing the longest prefix (n tokens) with ``prompt``;
        ((), None, 0) when none shares any."""
        best: tuple[tuple[int, ...], Any, int] = ((), None, 0)
        for key, (state, _) in self._entries.items():
            n = common_prefix(key, prompt)
            if n > best[2]:
                best = (key, state, n)
        if best[2]:
            self._entries.move_to_end(best[0])
        return best

    def _drop(self, key: tuple[int, ...]) -> None:
        _, size = self._entries.pop(key)
        self.used -= size
