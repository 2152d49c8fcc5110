"""Saguaro's three knobs as pure functions: outcome prediction (fork), fan-out allocation, and
Saguaro sampling (Kumar, Dao, May, "Speculative Speculative Decoding", arXiv 2603.03251, §4).

Outcome of one verification of a draft s_1..s_n: (k, t) = (accepted draft tokens, bonus or
correction token), k = 0..n. The speculator predicts it before the verifier returns it:

    fork          for k = 0..n, the candidate bonus tokens at k are the top-F_k tokens of the
                  draft's scores z_k (the draft's logits after the context and s_1..s_k),
                  excluding s_{k+1} when k < n: a rejected token X has p(X) < q(X), so the
                  residual (p - q)^+ is 0 at X and X can never be the correction (under greedy,
                  X != argmax p). There are sum_k F_k = budget branches.

    fan-out       uniform:    F_k = budget / (n + 1), the remainder to the smallest k.
                  geometric (Theorem 12, capped geometric series from the power-law miss model
                  1 - p_hit(F) = F^(-r) and the per-token acceptance rate a):
                      F_k = F_0 a^(k / (1 + r))                          k < n
                      F_n = F_0 a^(n / (1 + r)) (1 - a)^(-1 / (1 + r))   (all accepted: boosted)
                  with F_0 set so that sum_k F_k = budget, rounded to integers >= 1.

    Saguaro       the draft samples from q' = sigma_{F,C}(q): the top-m tokens of q are
    sampling      multiplied by C in (0, 1], the rest kept, then renormalised (m = F_{j-1} + 1 at
                  draft position j: the F cached candidates plus the draft's own token, as in the
                  reference code's top-(F+1)). The residual (p - q')^+ then puts more mass on the
                  cached candidates, so hits get likelier, at the price of a lower acceptance
                  sum min(p, q'). Invariant: the verifier ALWAYS gets q' (the rows the tokens were
                  drawn from), never q -- speculative sampling is exact for any proposal it is
                  told the truth about.

`FanoutEstimator` estimates a (accepted / (accepted + rejections)) and r (least-squares slope of
log miss(F) against log F, from the ranks of the realised bonus tokens among the candidates) online.
"""

from __future__ import annotations

import math

import torch

FANOUTS = ("uniform", "geometric")


def check_saguaro_c(c: float) -> float:
    """C must lie in (0, 1]; ValueError naming `saguaro_c` otherwise."""
    if isinstance(c, bool) or not isinstance(c, (int, float)) or not math.isfinite(c) or not 0 < c <= 1:
        raise ValueError(f"saguaro_c: expected a number in (0, 1] (1 = plain sampling), got {c!r}")
    return float(c)


def check_budget(budget: int, gamma: int) -> int:
    """The budget (branches per round) must cover one branch per accepted length: >= gamma + 1."""
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < gamma + 1:
        raise ValueError(
            f"budget: expected an integer >= gamma + 1 = {gamma + 1} (one branch per accepted length "
            f"k = 0..gamma), got {budget!r}"
        )
    return budget


def uniform_fanout(budget: int, n: int) -> list[int]:
    """F_0..F_n for a draft of n tokens: budget // (n + 1) each, the remainder to the smallest k."""
    if n < 0 or budget < n + 1:
        raise ValueError(f"budget: need at least n + 1 = {n + 1} branches, got {budget}")
    base, rem = divmod(budget, n + 1)
    return [base + (1 if k < rem else 0) for k in range(n + 1)]


def _round_to_budget(weights: list[float], budget: int) -> list[int]:
    """Integers >= 1 summing to `budget`, proportional to `weights` (largest remainders)."""
    m = len(weights)
    total = sum(weights)
    spare = budget - m  # one branch each first
    ideal = [spare * w / total for w in weights]
    out = [1 + math.floor(x) for x in ideal]
    order = sorted(range(m), key=lambda i: (ideal[i] - math.floor(ideal[i]), -i), reverse=True)
    for i in order[: budget - sum(out)]:
        out[i] += 1
    return out


def geometric_fanout(budget: int, n: int, accept_rate: float, r: float) -> list[int]:
    """Theorem-12 allocation F_0..F_n (see module docstring), integers >= 1 summing to budget."""
    if n < 0 or budget < n + 1:
        raise ValueError(f"budget: need at least n + 1 = {n + 1} branches, got {budget}")
    a = min(max(float(accept_rate), 1e-3), 1 - 1e-3)
    r = max(float(r), 1e-3)
    e = 1.0 / (1.0 + r)
    w = [a ** (k * e) for k in range(n)] + [a ** (n * e) * (1 - a) ** (-e)]
    return _round_to_budget(w, budget)


def fork_candidates(scores: torch.Tensor, draft_tokens: list[int], fanout: list[int]) -> list[list[int]]:
    """Candidate bonus tokens per accepted length k = 0..n (see module docstring).

    scores: [n+1, V] draft scores (logits) after the context and s_1..s_k; draft_tokens: s_1..s_n;
    fanout: F_0..F_n. Returns cands[k], the top-F_k tokens of scores[k] (descending), s_{k+1}
    excluded for k < n; F_k is capped at the number of tokens available.
    """
    n = len(draft_tokens)
    if scores.shape[0] != n + 1 or len(fanout) != n + 1:
        raise ValueError(
            f"fork_candidates: expected {n + 1} score rows and fan-outs, got "
            f"{scores.shape[0]} and {len(fanout)}"
        )
    v = scores.shape[-1]
    out: list[list[int]] = []
    for k in range(n + 1):
        row = scores[k]
        f = fanout[k]
        if k < n:
            row = row.clone()
            row[draft_tokens[k]] = -math.inf
            f = min(f, v - 1)
        f = min(f, v)
        out.append(row.topk(f).indices.tolist() if f > 0 else [])
    return out


def bonus_rank(scores_row: torch.Tensor, token: int, exclude: int | None) -> int:
    """1-based rank of `token` in `scores_row` (descending, ties to the lower id, `exclude` removed):
    the smallest fan-out F whose candidates would contain `token`."""
    s = scores_row[token]
    higher = scores_row > s
    ties = (scores_row == s) & (torch.arange(scores_row.shape[-1]) < token)
    rank = int((higher | ties).sum()) + 1
    if exclude is not None and exclude != token and bool(higher[exclude] | ties[exclude]):
        rank -= 1
    return rank


def saguaro_reshape(q: torch.Tensor, num_top: int, c: float) -> torch.Tensor:
    """q' = sigma_{F,C}(q) [..., V]: the `num_top` largest entries of each row times `c`, renormalised.

    c = 1 or num_top = 0 returns q unchanged. Support is preserved (q' > 0 exactly where q > 0),
    so any token drawn from q' has q' > 0 -- what the verifier needs. Not in place.
    """
    if c == 1.0 or num_top <= 0:
        return q
    m = min(num_top, q.shape[-1])
    idx = q.topk(m, dim=-1).indices
    w = torch.ones_like(q)
    w.scatter_(-1, idx, c)
    out = q * w
    return out / out.sum(-1, keepdim=True)


class FanoutEstimator:
    """Online estimates of the per-token acceptance rate a and the power-law exponent r.

    a = (prior_a * w + accepted) / (w + accepted + rejections), one rejection per round that
    stopped before the end of its draft (the geometric-acceptance MLE with a Beta-like prior).
    r: with miss(F) = P(rank of the realised bonus > F) from the rank histogram, the least-squares
    slope of log miss(F) against log F over F = 1..max_f where miss(F) > 0 (free intercept);
    `prior_r` until `min_obs` ranks are seen. Clamped to [0.1, 10].
    """

    def __init__(self, prior_a: float = 0.7, prior_r: float = 1.0, weight: float = 2.0, min_obs: int = 8):
        self.prior_a, self.prior_r, self.weight, self.min_obs = prior_a, prior_r, weight, min_obs
        self.accepted = 0
        self.rejections = 0
        self.ranks: list[int] = []

    def observe(self, accepted: int, drafted: int, rank: int | None) -> None:
        """One verification outcome: `accepted` of `drafted` tokens, bonus rank (None: unknown)."""
        self.accepted += accepted
        self.rejections += int(accepted < drafted)
        if rank is not None and rank > 0:
            self.ranks.append(rank)

    @property
    def accept_rate(self) -> float:
        return (self.prior_a * self.weight + self.accepted) / (self.weight + self.accepted + self.rejections)

    def power_law_r(self, max_f: int) -> float:
        n = len(self.ranks)
        if n < self.min_obs or max_f < 2:
            return self.prior_r
        ranks = torch.tensor(self.ranks, dtype=torch.float64)
        xs, ys = [], []
        for f in range(1, max_f + 1):
            miss = float((ranks > f).double().mean())
            if miss <= 0:
                break
            xs.append(math.log(f))
            ys.append(math.log(miss))
        if len(xs) < 2:
            return self.prior_r
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        sxx = sum((x - mx) ** 2 for x in xs)
        slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx
        return min(max(-slope, 0.1), 10.0)

    def fanout(self, mode: str, budget: int, n: int) -> list[int]:
        """F_0..F_n for the next draft of n tokens."""
        if mode == "uniform":
            return uniform_fanout(budget, n)
        return geometric_fanout(budget, n, self.accept_rate, self.power_law_r(budget))
