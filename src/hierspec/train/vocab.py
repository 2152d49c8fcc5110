"""Reduced draft vocabulary: the R most frequent target tokens of the training data + specials.

`select_vocab` picks the ids; `vocab_coverage` reports how much of the data and of the teacher's
probability mass they cover. Coverage of the teacher mass is computed from the cached top-k:
``lower`` = mass of the top-k tokens inside the vocabulary (certain), ``upper`` = lower + the
mass outside the top-k (which may or may not lie inside). The exact value needs the full
teacher distribution; the evaluator (`hierspec.train.distill.Evaluator`) measures it on the
held-out set as ``coverage``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch

from hierspec.train.data import DataError, list_shards, load_rows
from hierspec.train.teacher import load_teacher

__all__ = ["count_tokens", "inverse_map", "select_vocab", "vocab_coverage"]


def count_tokens(data_dir: str | os.PathLike[str], vocab_size: int) -> torch.Tensor:
    """Occurrences [V] (int64) of each token id at non-pad positions of every token shard."""
    shards = list_shards(data_dir)
    if not shards:
        raise DataError(f"no token shards in {data_dir}: prepare the data first")
    counts = torch.zeros(vocab_size, dtype=torch.long)
    for s in shards:
        ids, mask, _ = load_rows(s)
        sel = ids[mask > 0]
        if sel.numel() and int(sel.max()) >= vocab_size:
            raise DataError(f"{s} holds token id {int(sel.max())} >= vocab size {vocab_size}")
        counts += torch.bincount(sel, minlength=vocab_size)
    return counts


def select_vocab(counts: torch.Tensor, size: int, special_ids: Sequence[int] = ()) -> torch.Tensor:
    """Sorted LongTensor of ``size`` ids: all ``special_ids``, then the most frequent others.

    Ties are broken by the smaller id; ids never seen fill up the rest in id order.
    """
    vocab_size = counts.numel()
    if not 0 < size <= vocab_size:
        raise ValueError(f"vocabulary size must be in 1..{vocab_size}, got {size}")
    specials = sorted({int(i) for i in special_ids if 0 <= int(i) < vocab_size})
    if len(specials) > size:
        raise ValueError(f"{len(specials)} special tokens do not fit a vocabulary of {size}")
    key = counts.double().clone()
    key[specials] = float("inf")
    # stable descending sort: equal counts keep id order
    order = torch.sort(-key, stable=True).indices
    return torch.sort(order[:size]).values


def inverse_map(vocab_map: torch.Tensor | None, vocab_size: int) -> torch.Tensor:
    """[V] row index of each target id in the reduced vocabulary, R for ids outside it.

    ``vocab_map=None`` (a full-vocabulary student) gives the identity.
    """
    if vocab_map is None:
        return torch.arange(vocab_size)
    inv = torch.full((vocab_size,), vocab_map.numel(), dtype=torch.long)
    inv[vocab_map.cpu()] = torch.arange(vocab_map.numel())
    return inv


def vocab_coverage(
    data_dir: str | os.PathLike[str],
    vocab_map: torch.Tensor,
    vocab_size: int,
    *,
    counts: torch.Tensor | None = None,
    max_shards: int | None = 8,
) -> dict[str, Any]:
    """How much the reduced vocabulary covers.

    token_coverage: fraction of data tokens inside it. teacher_mass_lower / _upper: bounds on the
    mean teacher probability of the next token lying inside it (from the cached top-k of up to
    ``max_shards`` shards; None if no teacher files exist yet).
    """
    if counts is None:
        counts = count_tokens(data_dir, vocab_size)
    inside = torch.zeros(vocab_size, dtype=torch.bool)
    inside[vocab_map] = True
    total = int(counts.sum())
    report: dict[str, Any] = {
        "size": int(vocab_map.numel()),
        "token_coverage": float(counts[inside].sum()) / max(total, 1),
        "teacher_mass_lower": None,
        "teacher_mass_upper": None,
    }
    lo = hi = 0.0
    n = 0
    for s in list_shards(data_dir)[:max_shards]:
        _, mask, meta = load_rows(s)
        try:
            t = load_teacher(s, meta)
        except DataError:
            continue
        valid = mask > 0
        p = t["logp"].float().exp()
        p_in = (p * inside[t["ids"].long()]).sum(-1)
        tail = (1.0 - p.sum(-1)).clamp_min(0.0)
        lo += float(p_in[valid].sum())
        hi += float((p_in + tail)[valid].sum())
        n += int(valid.sum())
    if n:
        report["teacher_mass_lower"] = lo / n
        report["teacher_mass_upper"] = hi / n
    return report
