"""Naive HSD (Zhou et al.): uncapped hierarchical speculative sampling with forward sampling.
An analysis API, not a rule: it needs target and draft conditionals *off* the draft path.

With prefix joints P_k, Q_k of the draft X_1..X_K (uncapped), d(z) = P(z) - Q(z) for any node z
of the prefix tree, and for the branch at level k:
    E_k = sum_x [P_k p_{k+1}(x) - Q_k q_{k+1}(x)]^+,   F_k = sum_x [Q_k q_{k+1}(x) - P_k p_{k+1}(x)]^+

    1. accept all K tokens with probability min(1, R_K), R_K = P_K / Q_K; then Y ~ p_{K+1};
    2. otherwise for k = K-1 .. 0 stop at level k with probability a_k = E_k / max(E_k, F_k)
       (a_0 = 1) and draw Z_{k+1} ~ [P_k p_{k+1} - Q_k q_{k+1}]^+ / E_k;
    3. forward sampling: for j = k+2..K, with z = (X_{1:k}, Z_{k+1..j-1}) draw
       Z_j ~ [P(z) p(.|z) - Q(z) q(.|z)]^+ (normalised) — a new target *and* draft call per j.
       The output is X_{1:k} Z_{k+1..K}: K tokens, no bonus.

Lossless by a mass-flow argument (every node passes up [-d(z)]^+ and receives [d(z)]^+; a node
reached by forward sampling has d(z) > 0, so its positive part is never empty). Its cost — up to
K-k-1 extra *sequential* target and draft calls — is why hierspec's rule "hsd" is the capped
variant, which needs none and equals block verification. Not the same shape as the other laws
(outputs have K or K+1 tokens and depend on conditionals off the draft), so `law` returns
{output sequence: probability}. Probability space in float64: for analysis on small toys only.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence

import numpy as np

Cond = Callable[[tuple[int, ...]], np.ndarray]


def _joint(fn: Cond, seq: tuple[int, ...]) -> float:
    out = 1.0
    for t in range(len(seq)):
        out *= float(fn(seq[:t])[seq[t]])
    return out


def law(draft_tokens: Sequence[int], target: Cond, draft: Cond) -> dict[tuple[int, ...], float]:
    """Exact {output: probability} of naive HSD for one draft; `target(prefix)` and
    `draft(prefix)` return the conditional distributions after any prefix."""
    x = tuple(int(t) for t in draft_tokens)
    k_len = len(x)
    out: dict[tuple[int, ...], float] = defaultdict(float)

    def forward(prefix: tuple[int, ...], weight: float) -> None:
        if len(prefix) == k_len:
            out[prefix] += weight
            return
        d = _joint(target, prefix) * target(prefix) - _joint(draft, prefix) * draft(prefix)
        pos = np.clip(d, 0, None)
        dist = pos / pos.sum() if pos.sum() > 0 else target(prefix)
        for z in np.flatnonzero(dist):
            forward((*prefix, int(z)), weight * float(dist[z]))

    p_full, q_full = _joint(target, x), _joint(draft, x)
    a_full = min(1.0, p_full / q_full)
    bonus = target(x)
    for y in np.flatnonzero(bonus):
        out[(*x, int(y))] += a_full * float(bonus[y])
    reach = 1.0 - a_full
    for k in range(k_len - 1, -1, -1):
        if reach <= 0:
            break
        prefix = x[:k]
        d = _joint(target, prefix) * target(prefix) - _joint(draft, prefix) * draft(prefix)
        e, f = float(np.clip(d, 0, None).sum()), float(np.clip(-d, 0, None).sum())
        a = 1.0 if k == 0 or max(e, f) == 0 else e / max(e, f)
        stop = reach * a
        if stop > 0:
            pos = np.clip(d, 0, None)
            dist = pos / e if e > 0 else target(prefix)
            for z in np.flatnonzero(dist):
                forward((*prefix, int(z)), stop * float(dist[z]))
        reach -= stop
    return dict(out)


def extra_calls(draft_tokens: Sequence[int], target: Cond, draft: Cond) -> float:
    """Expected number of extra sequential (target + draft) call pairs spent on forward sampling
    for this draft: sum over outputs of (K - 1 - stop level) for stops below K - 1."""
    x = tuple(int(t) for t in draft_tokens)
    total = 0.0
    for seq, prob in law(x, target, draft).items():
        if len(seq) == len(x):  # no bonus: a stop at some level k < K
            k = next((i for i in range(len(x)) if seq[i] != x[i]), len(x))
            total += prob * max(0, len(x) - 1 - k)
    return total
