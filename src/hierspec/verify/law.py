"""Exact outcome laws: expected acceptance, and the exact output joint of a rule by enumeration.

`output_joint` is the losslessness proof harness (exact enumeration, no sampling), public so users
can check their own rules. For an autoregressive toy with vocabulary V, draft length K and
*context-dependent* conditionals p(. | s), q(. | s) for every prefix s:

    P_out(s) = sum_x Q(x) sum_{k,y} L_x[k, y] [x_{1:k} y = s_{1:k+1}] prod_{i>k+1} p(s_i | s_<i)

i.e. every draft x weighted by its draft probability, every outcome by the rule's exact law, and
outputs shorter than K+1 padded with target continuations. A rule is lossless iff P_out equals
the target joint P(s) = prod_i p(s_i | s_<i) for every s in V^{K+1}.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

LawFn = Callable[..., torch.Tensor]


def expected_accepted(law: torch.Tensor) -> float:
    """E[num_accepted] = sum_k k * P(tau = k) from a law L [K+1, V]."""
    k = law.shape[0] - 1
    return float((law.sum(-1) * torch.arange(k + 1, dtype=law.dtype, device=law.device)).sum())


def acceptance_distribution(law: torch.Tensor) -> torch.Tensor:
    """P(tau = k), k = 0..K, from a law L [K+1, V]."""
    return law.sum(-1)


@dataclass
class CondTables:
    """Conditional tables of an autoregressive toy: ``tables[i]`` has shape [V]*i + [V] and holds
    p(. | s) for every prefix s of length i (i = 0..depth-1)."""

    tables: list[np.ndarray]

    @property
    def vocab_size(self) -> int:
        return self.tables[0].shape[-1]

    def __call__(self, prefix: tuple[int, ...]) -> np.ndarray:
        return self.tables[len(prefix)][prefix]

    def joint(self, length: int) -> np.ndarray:
        """P(s) for all s in V^length, shape [V]*length."""
        out = np.ones(())
        for i in range(length):
            out = out[..., None] * self.tables[i]
        return out


def random_tables(
    vocab_size: int,
    depth: int,
    rng: np.random.Generator,
    alpha: float = 0.7,
    zero_frac: float = 0.0,
    one_hot: bool = False,
) -> CondTables:
    """Dirichlet(alpha) conditionals for every prefix up to length depth-1.

    `zero_frac` zeroes that fraction of entries (keeping each row's largest), like a top-k/top-p
    truncated distribution; `one_hot` makes every row deterministic (greedy target or draft).
    """
    tables = []
    for i in range(depth):
        t = rng.dirichlet(np.full(vocab_size, alpha), size=(vocab_size,) * i)
        if zero_frac > 0:
            keep = rng.random(t.shape) >= zero_frac
            keep |= t == t.max(-1, keepdims=True)
            t = np.where(keep, t, 0.0)
            t /= t.sum(-1, keepdims=True)
        if one_hot:
            t = np.eye(vocab_size)[t.argmax(-1)]
        tables.append(t)
    return CondTables(tables)


@dataclass
class JointResult:
    """Output of `output_joint`: the rule's output joint, the target joint (both [V]*(K+1)),
    and E[num_accepted] over drafts ~ q."""

    output: np.ndarray
    target: np.ndarray
    expected_accepted: float

    @property
    def max_abs_error(self) -> float:
        return float(np.abs(self.output - self.target).max())


def output_joint(
    law: LawFn, target: CondTables, draft: CondTables, k: int, *, deterministic_draft: bool = False
) -> JointResult:
    """Exact output joint of a verification rule's `law` (see module docstring).

    `target` needs depth >= K+1 and `draft` depth >= K. With `deterministic_draft`, the draft
    tables must be one-hot and the law is called with draft_probs=None.
    """
    v = target.vocab_size
    if len(target.tables) < k + 1 or len(draft.tables) < k:
        raise ValueError(f"tables too shallow for K = {k}: need target depth {k + 1}, draft depth {k}")
    # acc[j] accumulates the mass of outputs of length j (shape [V]*j).
    acc = [np.zeros((v,) * j) for j in range(k + 2)]
    e_acc = 0.0
    ar = torch.arange(k + 1)
    for x in itertools.product(range(v), repeat=k):
        qx = 1.0
        for t in range(k):
            qx *= draft(x[:t])[x[t]]
        if qx == 0:
            continue
        p_rows = torch.from_numpy(np.stack([target(x[:t]) for t in range(k + 1)]))
        q_rows = None
        if not deterministic_draft and k:
            q_rows = torch.from_numpy(np.stack([draft(x[:t]) for t in range(k)]))
        lx = law(torch.tensor(x, dtype=torch.long), q_rows, p_rows).double().numpy()
        e_acc += qx * float((lx.sum(-1) * ar.numpy()).sum())
        for j in range(k + 1):
            acc[j + 1][x[:j]] += qx * lx[j]
    # Pad every length-(j) output with target continuations up to length K+1.
    out = np.zeros((v,) * (k + 1))
    for j in range(1, k + 2):
        cont = acc[j]
        for i in range(j, k + 1):
            cont = cont[..., None] * target.tables[i]
        out += cont
    return JointResult(output=out, target=target.joint(k + 1), expected_accepted=e_acc)
