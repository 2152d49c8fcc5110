"""The shape of a draft tree, shared by the drafters, the tree forwards of the models and the
tree verifier: ``parents[N]`` with parents[0] == -1 (node 0 is the root) and 0 <= parents[i] < i
for i >= 1, so node order is a topological order. `check_parents` is its one validator.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["check_parents"]


def _fail(arg: str, expected: str, got: str) -> None:
    raise ValueError(f"{arg}: expected {expected}, got {got}")


def check_parents(parents: torch.Tensor | Sequence[int], n: int | None = None) -> torch.Tensor:
    """The tree-shape contract, the one check of it for every user (the tree rules of
    `hierspec.verify.tree`, the tree masks and tree forwards of `hierspec.models`): ``parents`` is
    a non-empty 1-D vector of integers (a tensor or a sequence), of length ``n`` when given, with
    parents[0] == -1 and 0 <= parents[i] < i for i >= 1 (parents before children, so node order
    is a topological order).

    Returns it as a LongTensor [N] on its device; ValueError "parents: expected ..." otherwise.
    """
    if isinstance(parents, torch.Tensor):
        p = parents
    else:
        try:
            p = torch.as_tensor(list(parents))
        except (TypeError, ValueError, RuntimeError):
            _fail("parents", "a 1-D sequence of ints", repr(parents))
    if p.ndim != 1 or p.numel() == 0 or (n is not None and p.numel() != n):
        want = f"shape [N] with N = {n} (one node per input column)" if n is not None else "shape [N], N >= 1"
        _fail("parents", want, str(tuple(p.shape)))
    if p.dtype == torch.bool or p.is_floating_point() or p.is_complex():
        _fail("parents", "integer entries", str(p.dtype))
    p = p.long()
    if int(p[0]) != -1:
        _fail("parents", "parents[0] == -1 (node 0 is the root)", f"parents[0] = {int(p[0])}")
    if p.numel() > 1:
        idx = torch.arange(1, p.numel(), device=p.device)
        bad = (p[1:] < 0) | (p[1:] >= idx)
        if bool(bad.any()):
            i = int(idx[bad][0])
            want = "0 <= parents[i] < i for i >= 1 (parents before children)"
            _fail("parents", want, f"parents[{i}] = {int(p[i])}")
    return p
