"""Latency model of draft hierarchies and the search for the fastest one (Mohri et al., arXiv
2510.19705; the formulas below are checked in our tests by simulation).

Chain M_0 -> M_1 -> ... -> M_K (M_K the target). Level i verifies batches handed up by level i-1
with acceptance alpha_i = alpha[i-1][i] per token (i.i.d. model). A pass of M_i over n new tokens
costs cost(i, n) seconds (measured per host: on CPUs it grows with n, see `calibrate.py`).

Fixed batch lengths n_{i-1} (level i-1 hands up exactly n tokens; T_i = n_i):

    E[tokens per pass of M_i | n] = y(alpha, n) = (1 - alpha^{n+1}) / (1 - alpha)
    l_0 = cost(0, 1)                                  (M_0 decodes autoregressively)
    l_i = (n_{i-1} * l_{i-1} + cost(i, n_{i-1} + 1)) / y(alpha_i, n_{i-1})      (affine in l_{i-1})

l_K is the expected time per output token; cost(K, 1) / l_K the speed-up over plain decoding.
Because l_i is increasing in l_{i-1}, the best chain ending at each model is found by one DP over
models sorted by cost (generalised shortest path): O(M^2 n_max).

Thresholded levels (a level keeps running rounds until it holds >= T_i tokens) hand up a random
batch length N_i; `exact_latency` uses the renewal-reward recursion with the batch-length law:

    l_i = (E[N_{i-1}] l_{i-1} + E[cost(i, N_{i-1}+1)]) (1 - alpha_i) / (1 - alpha_i E[alpha_i^{N_{i-1}}])
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

CostFn = Callable[[int, int], float]  # (model index, tokens per forward) -> seconds


def expected_tokens(alpha: float, n: int) -> float:
    """E[tokens emitted per verification pass over n drafts] = (1 - a^{n+1}) / (1 - a)."""
    if alpha >= 1.0:
        return float(n + 1)
    return (1.0 - alpha ** (n + 1)) / (1.0 - alpha)


def affine_latency(chain: Sequence[int], batches: Sequence[int], alpha: np.ndarray, cost: CostFn) -> float:
    """Time per output token of `chain` (model indices bottom -> target) with fixed batch lengths
    `batches` (len(chain) - 1; batches[i] = tokens level chain[i] hands up per round)."""
    if len(batches) != len(chain) - 1:
        raise ValueError(f"batches: expected {len(chain) - 1} values, got {len(batches)}")
    ell = cost(chain[0], 1)
    for (lo, hi), n in zip(itertools.pairwise(chain), batches, strict=True):
        ell = (n * ell + cost(hi, n + 1)) / expected_tokens(float(alpha[lo][hi]), n)
    return ell


def _round_law(alpha: float, batch_law: dict[int, float]) -> dict[int, float]:
    """Law of Y = tokens from one verification round over a batch of random length N."""
    out: dict[int, float] = {}
    for n, pn in batch_law.items():
        for y in range(1, n + 1):
            out[y] = out.get(y, 0.0) + pn * alpha ** (y - 1) * (1 - alpha)
        out[n + 1] = out.get(n + 1, 0.0) + pn * alpha**n
    return out


def _threshold_law(round_law: dict[int, float], threshold: int) -> dict[int, float]:
    """Law of the buffer length when rounds (i.i.d. with `round_law`) first reach >= threshold."""
    visit = np.zeros(threshold)
    visit[0] = 1.0
    out: dict[int, float] = {}
    for s in range(threshold):
        if visit[s] == 0:
            continue
        for y, py in round_law.items():
            t = s + y
            if t >= threshold:
                out[t] = out.get(t, 0.0) + visit[s] * py
            else:
                visit[t] += visit[s] * py
    return out


def exact_latency(chain: Sequence[int], thresholds: Sequence[int], alpha: np.ndarray, cost: CostFn) -> float:
    """Time per output token with thresholded levels: level chain[i] (i < K) hands up its buffer
    once it holds >= thresholds[i] tokens; M_0 hands up exactly thresholds[0]."""
    if len(thresholds) != len(chain) - 1:
        raise ValueError(f"thresholds: expected {len(chain) - 1} values, got {len(thresholds)}")
    ell = cost(chain[0], 1)
    law = {int(thresholds[0]): 1.0}
    for i, (lo, hi) in enumerate(itertools.pairwise(chain)):
        a = float(alpha[lo][hi])
        mean_n = sum(n * p for n, p in law.items())
        mean_cost = sum(p * cost(hi, n + 1) for n, p in law.items())
        pgf = sum(p * a**n for n, p in law.items())
        ell = (
            (mean_n * ell + mean_cost) * (1 - a) / (1 - a * pgf)
            if a < 1
            else ((mean_n * ell + mean_cost) / (mean_n + 1))
        )
        if i + 1 < len(thresholds):
            law = _threshold_law(_round_law(a, law), int(thresholds[i + 1]))
    return ell


@dataclass
class Plan:
    """A candidate hierarchy: model indices bottom -> target, batch lengths per edge, predicted
    seconds per token, and the predicted speed-up over the target alone."""

    chain: tuple[int, ...]
    batches: tuple[int, ...]
    latency: float
    speedup: float


def _check_alpha(alpha: np.ndarray) -> np.ndarray:
    """``alpha`` as a float array if it is a non-empty square matrix of rates in [0, 1]."""
    try:
        a = np.asarray(alpha, dtype=float)
    except (TypeError, ValueError):
        raise ValueError("alpha: expected a square matrix of acceptance rates, got a ragged array") from None
    if a.ndim != 2 or a.shape[0] != a.shape[1] or a.shape[0] == 0:
        raise ValueError(f"alpha: expected a square M x M matrix (M models), got shape {a.shape}")
    if not np.all(np.isfinite(a)) or a.min() < 0 or a.max() > 1 + 1e-6:
        raise ValueError(f"alpha: expected acceptance rates in [0, 1], got values in [{a.min()}, {a.max()}]")
    return a


def plan(
    alpha: np.ndarray, cost: CostFn, n_max: int = 8, top: int = 5, bottom_only: Sequence[int] = ()
) -> list[Plan]:
    """Ranked candidate hierarchies over models 0..M-1 sorted by cost (M-1 = target).

    DP over models (the best sub-hierarchy topped by each model), then the `top` best distinct
    chains re-ranked by their affine latency. Polynomial: O(M^2 n_max) for the DP. Levels in
    ``bottom_only`` (lookup drafters: they propose but cannot verify) only start a chain.
    ValueError for a non-square ``alpha``, values outside [0, 1], non-positive costs or bounds.
    """
    alpha = _check_alpha(alpha)
    for name, value in (("n_max", n_max), ("top", top)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: expected an integer >= 1, got {value!r}")
    m = alpha.shape[0]
    target = m - 1
    bottom = set(bottom_only)
    if not bottom <= set(range(target)):
        raise ValueError(
            f"bottom_only: expected indices of drafting levels (0..{target - 1}), got {bottom_only}"
        )
    decode = [cost(i, 1) for i in range(m)]
    if not all(math.isfinite(c) and c > 0 for c in decode):
        raise ValueError(f"cost: expected positive finite seconds per forward, got cost(i, 1) = {decode}")
    if any(b < a for a, b in itertools.pairwise(decode)):
        warnings.warn(
            f"models are not sorted by increasing decode cost ({[f'{c:.3g}' for c in decode]}); the "
            "planner only lets a model draft for models after it, so a cheaper model listed later "
            "can never be a drafter. Sort the models by cost (target last).",
            stacklevel=2,
        )
    best: list[tuple[float, tuple[int, ...], tuple[int, ...]]] = []
    for j in range(m):
        cand = [(cost(j, 1), (j,), ())]
        for i in range(j) if j not in bottom else ():
            ell_i, chain_i, batches_i = best[i]
            for n in range(1, n_max + 1):
                ell = (n * ell_i + cost(j, n + 1)) / expected_tokens(float(alpha[i][j]), n)
                cand.append((ell, (*chain_i, j), (*batches_i, n)))
        cand.sort(key=lambda c: c[0])
        best.append(cand[0])
    # Candidates for the report: the DP optimum plus the best single-level choices per edge.
    pool = {best[target][1]: best[target]}
    for i in range(target):
        for n in range(1, n_max + 1):
            ell = (n * best[i][0] + cost(target, n + 1)) / expected_tokens(float(alpha[i][target]), n)
            key = (*best[i][1], target)
            if key not in pool or ell < pool[key][0]:
                pool[key] = (ell, key, (*best[i][2], n))
    pool[(target,)] = (cost(target, 1), (target,), ())
    ranked = sorted(pool.values(), key=lambda c: c[0])[:top]
    c_ar = cost(target, 1)
    return [Plan(chain=c[1], batches=c[2], latency=c[0], speedup=c_ar / c[0]) for c in ranked]


def brute_force(alpha: np.ndarray, cost: CostFn, n_max: int = 8, bottom_only: Sequence[int] = ()) -> Plan:
    """Exhaustive search over all chains ending at the target and all batch lengths (affine
    model; ``bottom_only`` levels only at the bottom); exponential, for testing the DP."""
    m = alpha.shape[0]
    target = m - 1
    best = Plan((target,), (), cost(target, 1), 1.0)
    for r in range(0, m - 1):
        for sub in itertools.combinations(range(m - 1), r + 1):
            if any(i in bottom_only for i in sub[1:]):
                continue
            chain = (*sub, target)
            for batches in itertools.product(range(1, n_max + 1), repeat=len(chain) - 1):
                ell = affine_latency(chain, batches, alpha, cost)
                if ell < best.latency:
                    best = Plan(chain, batches, ell, cost(target, 1) / ell)
    return best


def simulate_latency(
    chain: Sequence[int],
    thresholds: Sequence[int],
    alpha: np.ndarray,
    cost: CostFn,
    num_tokens: int,
    rng: np.random.Generator,
) -> float:
    """Monte Carlo of a thresholded hierarchy under i.i.d. Bernoulli acceptance: time per output
    token. Used to check `exact_latency`."""

    def produce(level: int) -> tuple[int, float]:
        """(tokens handed up, time) for one batch of level `level`."""
        if level == 0:
            t = thresholds[0]
            return t, t * cost(chain[0], 1)
        need = thresholds[level] if level < len(thresholds) else 1
        a = float(alpha[chain[level - 1]][chain[level]])
        got, time_spent = 0, 0.0
        while got < need:
            n, t = produce(level - 1)
            time_spent += t + cost(chain[level], n + 1)
            acc = 0
            while acc < n and rng.random() < a:
                acc += 1
            got += acc + 1
        return got, time_spent

    top = len(chain) - 1
    total_tokens, total_time = 0, 0.0
    while total_tokens < num_tokens:
        n, t = produce(top)
        total_tokens += n
        total_time += t
    return total_time / total_tokens
