"""`Parts`: what a method family's build returns (`hierspec.methods.registry` wraps it into a
`Built` with the method spec and its verification rule)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["Parts"]


@dataclass
class Parts:
    """The engine's ``target`` view and ``drafter`` with ``gamma`` draft tokens per step (a
    ``tree`` shape for tree methods), or a self-speculative ``system`` with its own loop;
    ``options`` hold what peer / SSD runners need; ``note`` is shown to the user."""

    target: Any
    drafter: Any = None
    gamma: int = 1
    tree: Any = None
    system: Any = None
    options: dict[str, Any] = field(default_factory=dict)
    note: str | None = None
