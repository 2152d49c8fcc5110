"""``ngram`` (prompt lookup, n = 3..1) and ``suffix`` (suffix decoding over the prompt and earlier
outputs): model-free drafters, also the bottom level of a hierarchy."""

from __future__ import annotations

from typing import Any

from ..drafters import NgramDrafter
from .modelset import ModelSet
from .parts import Parts
from .spec import MethodSpec

__all__ = ["build_lookup", "lookup_drafter"]


def lookup_drafter(kind: str) -> Any:
    """A fresh model-free drafter: ``suffix`` (suffix decoding) or ``ngram`` (prompt lookup)."""
    if kind == "suffix":
        from ..drafters.suffix import SuffixDrafter

        return SuffixDrafter()
    return NgramDrafter()


def build_lookup(spec: MethodSpec, models: ModelSet, rule: str, gamma: int) -> Parts:
    return Parts(models.target, lookup_drafter(spec.kind), gamma)
