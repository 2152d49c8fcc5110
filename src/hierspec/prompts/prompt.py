"""`Prompt`, one prompt of a prompt set, and the selection helper shared by the prompt-set loaders."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["Prompt"]


@dataclass(frozen=True)
class Prompt:
    """One benchmark prompt.

    Attributes:
        id: Stable identifier within its set (e.g. ``"HumanEval/0"``, ``"hamlet:3"``).
        category: Coarse category (``"code"``, ``"chat"``, ``"prose"`` or a Spec-Bench category).
        text: The prompt text.
        chat: ``True`` if ``text`` is a user message to be wrapped in the model's chat
            template by the caller; ``False`` if it is raw text to continue.
    """

    id: str
    category: str
    text: str
    chat: bool


# --------------------------------------------------------------------------------------------
# shared helpers
# --------------------------------------------------------------------------------------------


def _select(items: Sequence[Prompt], n: int | None, offset: int) -> list[Prompt]:
    """Return ``items[offset:offset + n]`` (all from ``offset`` on when ``n`` is None)."""
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 0):
        raise ValueError(f"n must be a non-negative int or None, got {n!r}")
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
        raise ValueError(f"offset must be a non-negative int, got {offset!r}")
    stop = None if n is None else offset + n
    return list(items[offset:stop])
