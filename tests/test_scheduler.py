"""The batch scheduler's allocation (`hierspec.serve.scheduler`): optimal for its model, shrinks
speculation as load rises on a steep cost curve, and the online curve heals a wrong prior."""

from __future__ import annotations

import itertools

import pytest

from hierspec.curve import OnlineCostCurve
from hierspec.serve.scheduler import allocate, gains_from

# llama.cpp Q4_1 on a 2-core AVX2 host (ms): steep, as CPUs are
STEEP = {1: 12.0, 2: 22.0, 3: 30.0, 4: 36.5, 6: 53.0, 8: 69.0}


def steep(r: int) -> float:
    xs = sorted(STEEP)
    if r <= xs[0]:
        return STEEP[xs[0]]
    for a, b in itertools.pairwise(xs):
        if r <= b:
            return STEEP[a] + (STEEP[b] - STEEP[a]) * (r - a) / (b - a)
    return STEEP[xs[-1]] + 8.0 * (r - xs[-1])


def flat(r: int) -> float:
    return 30.0 + 0.1 * r


def rate(gains, ks, base, cost):
    tokens = len(gains) + sum(sum(g[:k]) for g, k in zip(gains, ks, strict=True))
    return tokens / cost(base + sum(ks))


@pytest.mark.parametrize("cost", [steep, flat])
def test_allocation_is_optimal_by_brute_force(cost):
    gains = [gains_from([0.9, 0.8, 0.7]), gains_from([0.5, 0.5]), gains_from([0.95, 0.95, 0.95, 0.9])]
    base = len(gains)
    ks = allocate(gains, base, cost)
    best = max(
        rate(gains, list(c), base, cost) for c in itertools.product(*(range(len(g) + 1) for g in gains))
    )
    assert rate(gains, ks, base, cost) == pytest.approx(best)


def test_speculation_shrinks_with_load_and_returns():
    """On the steep CPU curve: one sequence drafts, eight identical ones draft less per sequence
    (a row spent on a draft competes with whole sequences), and one alone drafts again."""
    g = gains_from([0.9] * 8)
    alone = allocate([g], 1, steep)[0]
    four = allocate([g] * 4, 4, steep)
    eight = allocate([g] * 8, 8, steep)
    assert alone >= 2
    assert max(four) < alone and sum(eight) < sum(four)
    assert allocate([g], 1, steep)[0] == alone
    # a flat curve (GPU-like): drafting stays long under load
    assert min(allocate([g] * 8, 8, flat)) >= alone


def test_weak_drafts_get_no_rows():
    assert allocate([gains_from([0.05, 0.05])] * 4, 4, steep) == [0, 0, 0, 0]


def test_max_rows_caps_the_allocation():
    ks = allocate([gains_from([0.99] * 8)] * 4, 4, flat, max_rows=10)
    assert sum(ks) + 4 <= 10


def test_online_curve_heals_a_poisoned_prior():
    """A prior measured under load (c(4..8) 20-35x too dear) is corrected by the forwards run:
    the row counts observed take their measured cost, the others follow the observed ratio."""
    poisoned = {1: 27.0, 2: 92.0, 3: 92.0, 4: 745.0, 6: 1216.0, 8: 1216.0}

    def prior(r):
        return poisoned[min(poisoned, key=lambda x: abs(x - r))]

    curve = OnlineCostCurve(prior, 16)
    for _ in range(40):
        for r in (1, 2, 4):
            curve.observe(r, steep(r))
    assert curve(4) == pytest.approx(steep(4), rel=0.1)
    assert curve(1) == pytest.approx(steep(1), rel=0.1)
    g = gains_from([0.9] * 8)
    assert allocate([g], 1, curve)[0] >= 1  # speculation comes back


def test_ubatch_rows_replays_llama_cpps_equal_split():
    from hierspec.serve.scheduler import ubatch_rows

    assert ubatch_rows([1, 1, 1, 1]) == [4]
    assert ubatch_rows([3, 3, 3]) == [9]
    assert ubatch_rows([1, 0, 1]) == [1, 1]  # a gap in the seq_ids: two forwards
    assert ubatch_rows([1, 3, 5, 2]) == [4, 3, 2, 2]
    assert ubatch_rows([0, 0]) == []


def test_split_cost_prefers_equal_lengths_or_none():
    """Under the split, ragged drafts pay whole forwards: the allocation drafts the same length
    everywhere (one forward) or not at all, and it never loses to the split-blind choice."""
    from hierspec.serve.scheduler import Layout, ubatch_rows

    g = [gains_from([0.9] * 4), gains_from([0.9] * 4), gains_from([0.9] * 2), gains_from([0.9] * 4)]
    layout = Layout([0, 1, 2, 3])
    ks = allocate(g, 4, flat, layout=layout)
    assert len(ubatch_rows(layout.rows(ks))) == 1 and max(ks) >= 1

    def split_rate(ks):
        tokens = 4 + sum(sum(gi[:k]) for gi, k in zip(g, ks, strict=True))
        return tokens / sum(flat(r) for r in ubatch_rows(layout.rows(ks)))

    blind = allocate(g, 4, flat)
    assert split_rate(ks) >= split_rate(blind)
    weak = [gains_from([0.3] * 4)] * 4
    assert allocate(weak, 4, steep, layout=layout) == [0, 0, 0, 0]
    others = Layout([0, 2], {1: 1})  # seq 1 decodes one row (fixed), 0 and 2 are allocated
    assert others.rows([2, 2]) == [3, 1, 3]


def test_draft_guard_follows_the_measured_rates():
    """Drafting is held back where its measured rate is below plain decoding's, at that number
    of sequences only, with one step in ``explore`` running the other arm."""
    from hierspec.serve.scheduler import DraftGuard

    g = DraftGuard(explore=4, min_steps=2)
    assert all(g.allow(3) for _ in range(3))  # nothing measured: draft
    for _ in range(5):
        g.observe(3, True, 4, 0.040)  # drafting: 100 tok/s
        g.observe(3, False, 3, 0.020)  # plain: 150 tok/s
        g.observe(1, True, 3, 0.020)  # one sequence: drafting pays
        g.observe(1, False, 1, 0.010)
    assert g.rate(3, True) == pytest.approx(100) and g.rate(3, False) == pytest.approx(150)
    assert not g.prefers_draft(3) and g.prefers_draft(1)
    allowed = [g.allow(3) for _ in range(40)]
    assert sum(allowed) == 10  # only the explorations draft
    assert sum(g.allow(1) for _ in range(40)) == 30  # drafting, a plain step in four
    assert g.snapshot()["3"] == {"draft": pytest.approx(100), "plain": pytest.approx(150)}
    for _ in range(30):  # the load changed: drafting now pays at 3 sequences too
        g.observe(3, True, 12, 0.040)
    assert g.prefers_draft(3)
    with pytest.raises(ValueError, match="explore"):
        DraftGuard(explore=1)
