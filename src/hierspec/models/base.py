"""The `LanguageModel` protocol: one causal LM with its own KV cache, addressed by position.

A model holds the KV state of one batch of sequences (batch-first, batch size 1 is what the engine
uses today). Its cache covers positions ``0 .. cache_length-1``; ``forward(ids)`` runs the new
tokens at positions ``cache_length .. cache_length+T-1`` and appends them; ``crop(n)`` rolls the
cache back to its first ``n`` positions. Invariant the engine relies on::

    after forward(ids[:, a:b]) with cache_length == a:   cache_length == b
    after crop(n) with n <= cache_length:                cache_length == n, and the state equals a
                                                         fresh prefill of the first n tokens

``output_hidden`` / ``ForwardOutput.hidden`` serve feature-level drafters (EAGLE reads the
target's last hidden states, see `hierspec.drafters.base.FeatureDrafter`); early-exit drafts run
layer ranges of the target (`hierspec.models.layered`, `hierspec.models.early_exit`).

Optional capability (checked with ``isinstance``, never by attribute name in the decode loop):

    TreeModel(LanguageModel)   forward_tree(ids, parents) + compact(start, keep): verifies a whole
                               draft tree in one forward (tree attention; `hierspec.step.tree_step`).
                               `tree_support(model)` says whether a model can, and if not why.

Device: every tensor a model returns lives on ``model.device``; callers create the tensors they
feed it (ids, masks) and the RNG streams of the rules that read its rows on that device too.
"""

from __future__ import annotations

from collections.abc import Sequence
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


@runtime_checkable
class PrefillModel(LanguageModel, Protocol):
    """A model that can append a prompt to its cache without computing its logits (llama.cpp
    skips the output head: no [T, V] buffer for a prompt whose rows nobody reads)."""

    def prefill(self, input_ids: torch.Tensor) -> None: ...


@runtime_checkable
class TreeModel(LanguageModel, Protocol):
    """A `LanguageModel` that verifies a draft tree in one forward (tree attention, see
    `hierspec.models.treemask`). Invariant: after ``forward_tree(ids [1, N], parents)`` at
    cache_length ``s`` the cache holds s + N entries (nodes in node order, node i at position
    s + depth(i)); ``compact(s, [0] + path)`` keeps the root-to-node path, after which the state
    equals a fresh prefill of the committed tokens.

    A class that has these methods but cannot run them for some configurations sets
    ``tree_attention`` (a bool attribute or property) to False; see `tree_support`.
    """

    def forward_tree(
        self, input_ids: torch.Tensor, parents: torch.Tensor | Sequence[int], *, output_hidden: bool = False
    ) -> ForwardOutput:
        """Run the N tree nodes ``input_ids`` [1, N] (``parents`` [N]) and append them to the cache."""
        ...

    def compact(self, start: int, keep: Sequence[int] | torch.Tensor) -> None:
        """Keep cache positions 0..start-1 followed by those at ``start + keep[j]``."""
        ...


def tree_support(model: object) -> str | None:
    """None if ``model`` can verify draft trees, else a sentence saying why not (for errors)."""
    name = type(model).__name__
    if not isinstance(model, TreeModel):
        return (
            f"the target {name} cannot verify trees (no tree attention: it lacks forward_tree / compact); "
            "use a torch model (HFModel, TinyGPT) as the target"
        )
    if not getattr(model, "tree_attention", True):
        why = getattr(model, "tree_attention_reason", None)
        return f"the target {name} cannot verify trees" + (f" ({why})" if why else "")
    return None
