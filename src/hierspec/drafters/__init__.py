"""Drafters: things that propose tokens together with their proposal distribution q."""

from .base import Draft, Drafter
from .model import ModelDrafter
from .ngram import NgramDrafter
from .suffix import SuffixDrafter
from .text import TextDrafter

__all__ = ["Draft", "Drafter", "ModelDrafter", "NgramDrafter", "SuffixDrafter", "TextDrafter"]
