"""Batched branch decoding: many one-token continuations of one cached prefix in one forward.

A model that implements `BranchDecoder` (`TinyGPT`, `DraftLM`) lets SSD's speculator
(`hierspec.ssd.speculator`) advance all its speculation branches together. Branch b continues the
first ``prefix_len[b]`` cached positions with its own tokens; at tree depth d it feeds one token at
logical position ``pos[b]`` and attends to

    cache positions j < prefix_len[b]      (its own prefix; later cached tokens are masked out)
    its own branch tokens of depth <= d    (scratch K/V in `BranchState`, [B, H_kv, depth, hd])

which is a per-branch sequential decode up to float rounding (tested in float64). The model's KV
cache (batch size 1) is only read, never modified.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

__all__ = ["BranchDecoder", "BranchState", "prefix_mask"]


@dataclass
class BranchState:
    """Scratch keys/values of the branch tokens: per layer [B, n_kv_head, depth, head_dim]."""

    k: list[torch.Tensor]
    v: list[torch.Tensor]

    @staticmethod
    def zeros(like: torch.Tensor, n_layer: int, shape: tuple[int, int, int, int]) -> BranchState:
        """Zero scratch of ``shape`` per layer, with ``like``'s dtype and device."""
        return BranchState(
            [like.new_zeros(shape) for _ in range(n_layer)], [like.new_zeros(shape) for _ in range(n_layer)]
        )


def prefix_mask(cache_len: int, prefix_len: torch.Tensor, depth: int) -> torch.Tensor:
    """bool [B, 1, 1, cache_len + depth + 1]: branch b reads cache slots < prefix_len[b] and its
    own scratch slots 0..depth."""
    b = prefix_len.shape[0]
    visible = torch.arange(cache_len, device=prefix_len.device)[None, :] < prefix_len[:, None]
    return torch.cat([visible, visible.new_ones(b, depth + 1)], 1)[:, None, None, :]


@runtime_checkable
class BranchDecoder(Protocol):
    """A `LanguageModel` that can decode many branches of its cached prefix in one forward."""

    def supports_branches(self) -> bool:
        """Whether `decode_branches` can run now (its cache holds one sequence)."""
        ...

    def branch_state(self, branches: int, depth: int) -> BranchState:
        """Empty scratch for ``branches`` branches of at most ``depth`` tokens."""
        ...

    def decode_branches(
        self,
        ids: torch.Tensor,
        pos: torch.Tensor,
        prefix_len: torch.Tensor,
        state: BranchState,
        depth: int,
    ) -> torch.Tensor:
        """One step: ids / pos / prefix_len [B] (token, logical position, cache positions visible);
        writes the step's K/V at ``depth`` of ``state``; returns full-vocabulary logits [B, V]."""
        ...
