"""The batch scheduler's economics: how many drafted rows each sequence gets this step.

A step forwards R = R_0 + sum_i k_i rows in c(R) seconds, where R_0 = (one row per decoding
sequence) + (prompt rows prefilled this step) and c is the batched cost curve measured on this
host (learned online from the steps actually run). Sequence i, drafting k_i tokens whose
acceptance probabilities (each given the earlier ones were accepted) are a_{i,1}, a_{i,2}, ...,
commits in expectation 1 + sum_{j <= k_i} g_{i,j} tokens, g_{i,j} = prod_{m <= j} a_{i,m}. The
batch commits n + sum_i sum_{j <= k_i} g_{i,j} tokens per step, and the scheduler maximises

    rate(k) = (n + sum_i sum_{j <= k_i} g_{i,j}) / (c(R_0 + sum_i k_i) + d sum_i k_i)

(d: seconds per drafted token of the drafter). c is `hierspec.curve.OnlineCostCurve` over the
host's measured prior: per row count the median of the steps actually run, so a wrong prior
(a measurement on a busy host) heals within a few steps. Since a <= 1, g_{i,j} does not increase along j:
the best allocation of m extra rows takes the m largest gains over all sequences (a prefix of
each draft), so the optimum is argmax over m of rate(top-m gains) -- exact for this model, in
O(total draft tokens log). Ties go to fewer rows. Under load R_0 grows: on a curve that is steep
there (CPU) a drafted row must beat a whole decoding sequence's share and speculation shrinks by
itself; when load falls it comes back. With one sequence this is the adaptive policy's rule
(`hierspec.policy.best_length`).

Exactness: the lengths depend on the past (acceptance model, costs) and on the drafts'
confidences, never on this step's target rows; drafts the scheduler truncates are deterministic
(n-gram, suffix), so any prefix is exact (`hierspec.policy`, argument (D)).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence


def allocate(
    gains: Sequence[Sequence[float]],
    base_rows: int,
    cost: Callable[[int], float],
    draft_cost: float = 0.0,
    max_rows: int | None = None,
) -> list[int]:
    """Draft rows k_i per sequence maximising the batch's expected tokens per second (see module
    docstring). ``gains[i][j]`` = g_{i,j+1}, non-increasing in j; ``base_rows`` = R_0;
    ``max_rows`` caps R."""
    n = len(gains)
    cells = ((g, i, j) for i, row in enumerate(gains) for j, g in enumerate(row))
    order = sorted(cells, key=lambda t: (-t[0], t[1], t[2]))
    if max_rows is not None:
        order = order[: max(0, max_rows - base_rows)]
    best_m, best_rate, total = 0, n / max(cost(base_rows), 1e-12), float(n)
    for m, (g, _, _) in enumerate(order, start=1):
        total += g
        rate = total / max(cost(base_rows + m) + draft_cost * m, 1e-12)
        if rate > best_rate:
            best_m, best_rate = m, rate
    ks = [0] * n
    for _, i, j in order[:best_m]:
        ks[i] = max(ks[i], j + 1)
    return ks


def gains_from(acceptance: Sequence[float]) -> list[float]:
    """g_j = prod_{m <= j} a_m (the chance that draft position j is accepted)."""
    out, run = [], 1.0
    for a in acceptance:
        run *= min(max(a, 0.0), 1.0)
        out.append(run)
    return out
