"""The `LanguageModel` protocol: one causal LM with its own KV cache, addressed by position.

A model holds the KV state of one batch of sequences (batch-first, batch size 1 is what the engine
uses today). Its cache covers positions ``0 .. cache_length-1``; ``forward(ids)`` runs the new
tokens at positions ``cache_length .. cache_length+T-1`` and appends them; ``crop(n)`` rolls the
cache back to its first ``n`` positions. Invariant the engine relies on::

    after forward(ids[:, a:b]) with cache_length == a:   cache_length == b
    after crop(n) with n <= cache_length:                cache_length == n, and the state equals a
                                                         fresh prefill of the first n tokens

Room for what comes next (early exit, feature-level drafters, another process) is left by the
optional ``output_hidden`` flag and by ``ForwardOutput.hidden``; early-exit models extend this
protocol with layer ranges (see ``hierspec.models.early_exit`` once it exists).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch


@dataclass
class ForwardOutput:
    """Result of one forward over new tokens.

    logits: [B, T, V] float32 (float64 for float64 models), one row per new position; row t is the
        next-token distribution after the token at position ``start + t``.
    hidden: [B, T, H] last hidden states (after the final norm) when requested, else None.
    """

    logits: torch.Tensor
    hidden: torch.Tensor | None = None


@runtime_checkable
class LanguageModel(Protocol):
    """A causal LM with a position-addressed KV cache (see module docstring for the invariant)."""

    vocab_size: int
    max_length: int

    @property
    def device(self) -> torch.device: ...

    @property
    def dtype(self) -> torch.dtype: ...

    @property
    def cache_length(self) -> int:
        """Number of positions currently held in the KV cache."""
        ...

    def forward(self, input_ids: torch.Tensor, *, output_hidden: bool = False) -> ForwardOutput:
        """Run ``input_ids`` [B, T] at positions cache_length.. and append them to the cache."""
        ...

    def crop(self, length: int) -> None:
        """Drop every cached position >= length (0 <= length <= cache_length)."""
        ...

    def reset(self) -> None:
        """Empty the cache (equivalent to ``crop(0)``)."""
        ...

    def cost_per_forward(self, num_tokens: int) -> float | None:
        """Calibrated seconds per forward of ``num_tokens`` new tokens, or None if unknown."""
        ...
