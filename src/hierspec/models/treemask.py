"""Tree attention masks for verifying a draft *tree* in one target forward (EAGLE / SpecInfer).

Tree contract (shared with the drafters and the verifier)::

    parents: LongTensor [N] (or a list of ints), parents[0] == -1, 0 <= parents[i] < i for i >= 1
             (checked by `hierspec.treeshape.check_parents`, the one validator of this shape)
    node 0 is the root = the last committed token (not yet in the KV cache)
    depth(0) = 0, depth(i) = depth(parents[i]) + 1
    node i runs at absolute position cache_length + depth(i) and attends to every cached
    position 0..cache_length-1 and to its ancestors in the tree including itself (never to
    siblings or cousins)

Because ``parents[i] < i`` the node order is a topological order, so the N new cache entries can be
appended in node order; after acceptance ``compact(start, keep)`` (see `HFModel.compact`,
`TinyGPT.compact`) moves the entries of the accepted root-to-node path down to consecutive
positions. A path node's depth equals its final offset from ``start``, so its keys (RoPE or learned
positions applied at ``start + depth``) are exactly those of a fresh prefill.

All functions are plain and vectorised (N up to a few hundred); the returned tensors live on the
device of ``parents`` when it is a tensor, else on the CPU.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from hierspec.treeshape import check_parents

__all__ = [
    "ancestor_mask",
    "check_compact",
    "check_parents",
    "path_to",
    "tree_attention_mask",
    "tree_depths",
]


def ancestor_mask(parents: torch.Tensor | Sequence[int]) -> torch.Tensor:
    """BoolTensor [N, N]: ``mask[i, j]`` is True iff node j is node i or one of its ancestors.

    Pointer jumping: after k rounds ``mask[i]`` holds the ancestors within distance 2**k and
    ``jump[i]`` the ancestor at distance 2**k (clamped at the root); ceil(log2 N) rounds suffice.
    """
    p = check_parents(parents)
    n = p.numel()
    rows = torch.arange(n, device=p.device)
    jump = p.clamp(min=0)  # the root is its own parent
    mask = torch.zeros(n, n, dtype=torch.bool, device=p.device)
    mask[rows, rows] = True
    mask[rows, jump] = True
    reach = 1
    while reach < n - 1:  # depth <= n - 1
        mask = mask | mask[jump]
        jump = jump[jump]
        reach *= 2
    return mask


def tree_depths(parents: torch.Tensor | Sequence[int]) -> torch.Tensor:
    """LongTensor [N]: depth(0) = 0, depth(i) = depth(parents[i]) + 1 (number of strict ancestors)."""
    return ancestor_mask(parents).sum(dim=1) - 1


def tree_attention_mask(parents: torch.Tensor | Sequence[int], past: int) -> torch.Tensor:
    """BoolTensor [N, past + N], True where node i may attend: every cached position
    0..past-1, then (columns past + j) node j iff j is i or an ancestor of i."""
    if isinstance(past, bool) or not isinstance(past, int) or past < 0:
        raise ValueError(f"past must be an int >= 0, got {past!r}")
    tree = ancestor_mask(parents)
    prefix = torch.ones(tree.shape[0], past, dtype=torch.bool, device=tree.device)
    return torch.cat([prefix, tree], dim=1)


def path_to(parents: torch.Tensor | Sequence[int], node: int) -> list[int]:
    """Node indices of the path root..node (both included), e.g. ``[0, 2, 5]``."""
    p = check_parents(parents).tolist()
    if isinstance(node, bool) or not isinstance(node, int) or not 0 <= node < len(p):
        raise ValueError(f"node must be an int in 0..{len(p) - 1}, got {node!r}")
    path = [node]
    while path[-1] != 0:
        path.append(p[path[-1]])
    return path[::-1]


def check_compact(start: int, keep: torch.Tensor | Sequence[int], cache_length: int) -> torch.Tensor:
    """Validate the arguments of ``compact(start, keep)`` on a cache of ``cache_length`` positions.

    Requires ``0 <= start <= cache_length``, ``keep`` 1-D integer and strictly increasing with
    ``keep[0] >= 0`` and ``start + keep[-1] < cache_length`` (an empty ``keep`` is a crop to
    ``start``). Returns ``keep`` as a CPU LongTensor; raises ValueError naming the argument.
    """
    if isinstance(start, bool) or not isinstance(start, int):
        raise ValueError(f"start must be an int, got {type(start).__name__}")
    if not 0 <= start <= cache_length:
        raise ValueError(f"start must be in 0..{cache_length} (the cache length), got {start}")
    if isinstance(keep, torch.Tensor):
        k = keep.detach().cpu()
    else:
        try:
            k = torch.as_tensor(list(keep))
        except (TypeError, ValueError, RuntimeError) as err:
            raise ValueError(f"keep must be a 1-D sequence of ints, got {keep!r}") from err
    if k.numel() == 0:
        return torch.zeros(0, dtype=torch.long)
    if k.dtype == torch.bool or k.is_floating_point() or k.is_complex():
        raise ValueError(f"keep must hold integers, got dtype {k.dtype}")
    if k.ndim != 1:
        raise ValueError(f"keep must be 1-D, got shape {tuple(k.shape)}")
    k = k.to(torch.long)
    if int(k[0]) < 0:
        raise ValueError(f"keep must hold indices >= 0, got keep[0] = {int(k[0])}")
    if k.numel() > 1 and not bool((k[1:] > k[:-1]).all()):
        raise ValueError(f"keep must be strictly increasing, got {k.tolist()}")
    if start + int(k[-1]) >= cache_length:
        raise ValueError(
            f"keep indices must satisfy start + keep[-1] < cache_length: "
            f"{start} + {int(k[-1])} >= {cache_length}"
        )
    return k
