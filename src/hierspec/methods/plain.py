"""``ar``: plain decoding, the target alone (the reference of every speed-up)."""

from __future__ import annotations

from .modelset import ModelSet
from .parts import Parts
from .spec import MethodSpec

__all__ = ["build_plain"]


def build_plain(spec: MethodSpec, models: ModelSet, rule: str, gamma: int) -> Parts:
    return Parts(models.target)
