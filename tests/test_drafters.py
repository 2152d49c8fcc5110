"""Prompt-lookup drafter: match policy, incremental index, rebuild on a new context."""

from __future__ import annotations

import pytest
import torch

from hierspec.drafters import NgramDrafter


def propose(d, ctx, k):
    return d.propose(torch.tensor([ctx]), k).tokens[0].tolist()


def test_latest_match_with_full_continuation():
    d = NgramDrafter()
    # "2 3" occurs at the start (followed by 4 5 6) and later (followed by 9 9 9 2 3).
    assert propose(d, [2, 3, 4, 5, 6, 2, 3, 9, 9, 9, 2, 3], 3) == [9, 9, 9]


def test_falls_back_to_earliest_when_latest_is_too_close_to_the_end():
    d = NgramDrafter()
    ctx = [5, 1, 1, 1, 1, 1, 1, 1]
    # The latest earlier "1 1 1" ends one position before the end: only one token follows it.
    assert propose(d, ctx, 4) == [1, 1, 1, 1]


def test_incremental_index_and_rebuild():
    d = NgramDrafter(max_ngram=2)
    assert propose(d, [1, 2, 3], 2) == []
    assert propose(d, [1, 2, 3, 1, 2], 2) == [3, 1]  # extended context reuses the index
    assert propose(d, [4, 1, 2, 3, 1, 2, 7, 2], 2) == [7, 2]  # not an extension: rebuilt; "2" @5
    assert propose(d, [9, 8], 3) == []
    assert propose(d, [1, 2, 1], 0) == []


def test_bad_arguments():
    with pytest.raises(ValueError, match="min_ngram <= max_ngram"):
        NgramDrafter(max_ngram=1, min_ngram=2)
    with pytest.raises(ValueError, match=r"context: expected shape \[1, L\]"):
        NgramDrafter().propose(torch.tensor([1, 2]), 2)
