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

llama.cpp's split (a context with one KV stream per sequence, ``kv_unified = False``): one
``llama_decode`` runs as several forwards ("ubatches") unless every sequence in the batch has
the same number of rows and their seq_ids are consecutive: each ubatch takes, from the first
sequence with rows left and the run of consecutive seq_ids after it that have rows left, the
same number of rows from each (the least any of them has left). `ubatch_rows` replays that
split; with ``split=True`` the step costs sum_u c(R_u) over its ubatches, not c(R), so ragged
drafts pay whole extra forwards. The allocation then compares the greedy prefixes above with
every uniform length k (k_i = min(k, d_i)) under that cost and keeps the best rate.

Exactness: the lengths depend on the past (acceptance model, costs) and on the drafts'
confidences, never on this step's target rows; drafts the scheduler truncates are deterministic
(n-gram, suffix), so any prefix is exact (`hierspec.policy`, argument (D)).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field


def ubatches(rows: Sequence[int]) -> list[tuple[int, int]]:
    """(rows, sequences) of each forward llama.cpp's equal split (``split_equal(sequential=True)``)
    makes of a batch whose sequence i (seq_id i, in this order) has ``rows[i]`` rows (0: not in
    the batch)."""
    left = list(rows)
    out = []
    while any(left):
        start = next(i for i, n in enumerate(left) if n)
        end = start
        while end + 1 < len(left) and left[end + 1]:
            end += 1
        take = min(left[start : end + 1])
        out.append((take * (end - start + 1), end - start + 1))
        for i in range(start, end + 1):
            left[i] -= take
    return out


def ubatch_rows(rows: Sequence[int]) -> list[int]:
    """Rows of each forward of `ubatches`."""
    return [r for r, _ in ubatches(rows)]


@dataclass(frozen=True)
class Layout:
    """Where a step's decoding sequences sit, for llama.cpp's split: the seq_id of each sequence
    being allocated, and the rows of the other decoding sequences by seq_id (fixed lengths)."""

    slots: Sequence[int]
    others: Mapping[int, int] = field(default_factory=dict)

    def rows(self, ks: Sequence[int]) -> list[int]:
        """Rows per seq_id 0..max (0: not in the step) when sequence i drafts ks[i]."""
        top = max([*self.slots, *self.others, -1])
        out = [0] * (top + 1)
        for slot, n in self.others.items():
            out[slot] = n
        for slot, k in zip(self.slots, ks, strict=True):
            out[slot] = 1 + k
        return out


def allocate(
    gains: Sequence[Sequence[float]],
    base_rows: int,
    cost: Callable[[int], float],
    draft_cost: float = 0.0,
    max_rows: int | None = None,
    layout: Layout | None = None,
    seq_cost: Callable[[int, int], float] | None = None,
) -> list[int]:
    """Draft rows k_i per sequence maximising the batch's expected tokens per second (see module
    docstring). ``gains[i][j]`` = g_{i,j+1}, non-increasing in j; ``base_rows`` = R_0 (one row per
    sequence and any others); ``max_rows`` caps R; ``layout``: the step runs as llama.cpp's
    equal split of the sequences at these seq_ids and costs its ubatches (`ubatches`), each by
    ``seq_cost(rows, sequences)`` if given (a forward over more sequences costs more), else by
    ``cost(rows)``."""
    n = len(gains)
    split = layout is not None
    fixed = sum(layout.others.values()) if layout is not None else 0
    extra = base_rows - n - fixed  # rows of no decoding sequence (prefill chunks): one more forward

    def seconds(ks: Sequence[int]) -> float:
        m = sum(ks)
        if layout is None:
            return cost(base_rows + m) + draft_cost * m
        forwards = ubatches(layout.rows(ks))
        each = sum(cost(r) if seq_cost is None else seq_cost(r, n) for r, n in forwards)
        return each + (cost(extra) if extra > 0 else 0.0) + draft_cost * m

    def tokens(ks: Sequence[int]) -> float:
        return n + sum(sum(g[:k]) for g, k in zip(gains, ks, strict=True))

    cap = None if max_rows is None else max(0, max_rows - base_rows)
    cells = ((g, i, j) for i, row in enumerate(gains) for j, g in enumerate(row))
    order = sorted(cells, key=lambda t: (-t[0], t[1], t[2]))
    if cap is not None:
        order = order[:cap]
    best_ks, best_rate = [0] * n, n / max(seconds([0] * n), 1e-12)
    ks = [0] * n
    candidates: list[list[int]] = []
    for _, i, j in order:  # the greedy prefixes: the m largest gains
        ks[i] = max(ks[i], j + 1)
        candidates.append(list(ks))
    if split:  # every sequence the same length where its draft allows: one forward
        longest = max((len(g) for g in gains), default=0)
        candidates += [[min(k, len(g)) for g in gains] for k in range(1, longest + 1)]
    for ks in candidates:
        if cap is not None and sum(ks) > cap:
            continue
        rate = tokens(ks) / max(seconds(ks), 1e-12)
        if rate > best_rate:
            best_ks, best_rate = ks, rate
    return best_ks


def gains_from(acceptance: Sequence[float]) -> list[float]:
    """g_j = prod_{m <= j} a_m (the chance that draft position j is accepted)."""
    out, run = [], 1.0
    for a in acceptance:
        run *= min(max(a, 0.0), 1.0)
        out.append(run)
    return out


class DraftGuard:
    """Whether letting the scheduler draft pays at the current load, measured rather than
    predicted. The allocation above trusts its acceptance estimates and its cost curve; where
    either is off (a drafter whose confidences flatter it, forwards the curve prices wrong), a
    batch can commit fewer tokens per second drafting than not. So, per number n of decoding
    sequences, two arms are timed: steps where the scheduler may draft ("draft") and steps where
    nobody auto-drafts, nor asks a drafter ("plain"); each keeps exponential averages of tokens
    committed and step seconds (weight ``alpha``), and its rate is their ratio. Drafting is held
    back while its rate is below plain's once both have ``min_steps`` steps; either way every
    ``explore``-th step runs the other arm, so both stay measured and the choice follows the
    load (at most 1 / ``explore`` of the steps run the worse arm). Steps that also prefill a
    prompt are not timed (their seconds are mostly the prompt's). The choice depends on past
    timings only, never on this step's target rows: every rule stays exact (`hierspec.policy`)."""

    def __init__(self, explore: int = 8, alpha: float = 0.1, min_steps: int = 4) -> None:
        if explore < 2 or not 0 < alpha <= 1 or min_steps < 1:
            raise ValueError(f"draft guard: expected explore >= 2, 0 < alpha <= 1, min_steps >= 1; "
                             f"got {explore}, {alpha}, {min_steps}")  # fmt: skip
        self.explore, self.alpha, self.min_steps = explore, alpha, min_steps
        self._arms: dict[tuple[int, bool], list[float]] = {}  # (n, draft) -> [tokens, seconds, steps]
        self._count: dict[int, int] = {}

    def rate(self, n: int, draft: bool) -> float | None:
        """Measured tokens per second of an arm at n sequences (None: fewer than min_steps)."""
        arm = self._arms.get((n, draft))
        if arm is None or arm[2] < self.min_steps:
            return None
        return arm[0] / arm[1]

    def prefers_draft(self, n: int) -> bool:
        """The better arm at n sequences as measured so far (drafting until both are known)."""
        d, p = self.rate(n, True), self.rate(n, False)
        return d is None or p is None or d >= p

    def allow(self, n: int) -> bool:
        """May the scheduler draft at this step with n decoding sequences?"""
        i = self._count.get(n, 0)
        self._count[n] = i + 1
        best = self.prefers_draft(n)
        return (not best) if i % self.explore == self.explore - 1 else best

    def observe(self, n: int, draft: bool, tokens: int, seconds: float) -> None:
        """One timed step of arm ``draft`` at n sequences committed ``tokens`` in ``seconds``."""
        if seconds <= 0:
            return
        arm = self._arms.get((n, draft))
        if arm is None:
            self._arms[(n, draft)] = [float(tokens), seconds, 1.0]
            return
        a = self.alpha
        arm[0] += a * (tokens - arm[0])
        arm[1] += a * (seconds - arm[1])
        arm[2] += 1.0

    def snapshot(self) -> dict[str, dict[str, float | None]]:
        return {
            str(n): {"draft": self.rate(n, True), "plain": self.rate(n, False)}
            for n in sorted({n for n, _ in self._arms})
        }
