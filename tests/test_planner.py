"""Latency model and hierarchy planner: closed forms, exact recursion vs Monte Carlo, DP vs brute force."""

from __future__ import annotations

import numpy as np
import pytest

from hierspec.planner import (
    affine_latency,
    brute_force,
    exact_latency,
    expected_tokens,
    plan,
    simulate_latency,
)


def const_cost(c):
    return lambda i, n: c[i]


def test_two_level_is_leviathan():
    alpha = np.array([[1.0, 0.8], [0.8, 1.0]])
    ell = affine_latency((0, 1), (4,), alpha, const_cost([0.05, 1.0]))
    assert 1.0 / ell == pytest.approx(2.8013, abs=1e-4)
    assert expected_tokens(0.8, 4) == pytest.approx((1 - 0.8**5) / 0.2)
    assert exact_latency((0, 1), (4,), alpha, const_cost([0.05, 1.0])) == pytest.approx(ell)


@pytest.mark.parametrize(
    "alphas,costs,thresholds",
    [
        ((0.75, 0.85), (0.03, 0.2, 1.0), (3, 6)),
        ((0.7, 0.9), (0.02, 0.15, 1.0), (2, 8)),
        ((0.6, 0.8, 0.9), (0.01, 0.05, 0.25, 1.0), (3, 5, 8)),
    ],
)
def test_exact_recursion_matches_monte_carlo(alphas, costs, thresholds):
    k = len(alphas)
    alpha = np.ones((k + 1, k + 1))
    for i, a in enumerate(alphas):
        alpha[i][i + 1] = a
    chain = tuple(range(k + 1))
    cost = const_cost(costs)
    exact = exact_latency(chain, thresholds, alpha, cost)
    mc = simulate_latency(chain, thresholds, alpha, cost, 150_000, np.random.default_rng(0))
    assert mc == pytest.approx(exact, rel=0.02)


def test_exact_recursion_with_length_dependent_cost():
    alpha = np.ones((3, 3))
    alpha[0][1], alpha[1][2] = 0.7, 0.85

    def cost(i, n):  # CPU-like: verification grows with tokens per forward
        return [0.02, 0.1, 1.0][i] * (1 + 0.15 * (n - 1))

    exact = exact_latency((0, 1, 2), (3, 5), alpha, cost)
    mc = simulate_latency((0, 1, 2), (3, 5), alpha, cost, 150_000, np.random.default_rng(1))
    assert mc == pytest.approx(exact, rel=0.02)


def _instance(m, rng, slope):
    q = np.sort(rng.random(m))
    q[0], q[-1] = 0.0, 1.0
    alpha = np.exp(-rng.uniform(0.6, 1.6) * np.abs(q[None, :] - q[:, None]))
    c = np.sort(rng.uniform(0.005, 0.5, m))
    c[-1] = 1.0
    return alpha, (lambda i, n: c[i] * (1 + slope * (n - 1)))


@pytest.mark.parametrize("seed", range(12))
def test_dp_finds_brute_force_optimum(seed):
    rng = np.random.default_rng(seed)
    m = 3 + seed % 3
    alpha, cost = _instance(m, rng, slope=0.1 * (seed % 2))
    ranked = plan(alpha, cost, n_max=6)
    bf = brute_force(alpha, cost, n_max=6)
    assert ranked[0].latency == pytest.approx(bf.latency, rel=1e-12)
    assert ranked[0].chain == bf.chain
    assert [p.latency for p in ranked] == sorted(p.latency for p in ranked)


@pytest.mark.parametrize("seed", range(8))
def test_dp_with_bottom_only_levels(seed):
    """Lookup levels (bottom_only) never sit above another level: the DP agrees with brute force
    under the constraint, and on the toy instance it must give up the unconstrained optimum."""
    rng = np.random.default_rng(100 + seed)
    m = 4 + seed % 2
    alpha, cost = _instance(m, rng, slope=0.1 * (seed % 2))
    bottom = (0, 1)
    ranked = plan(alpha, cost, n_max=5, top=20, bottom_only=bottom)
    bf = brute_force(alpha, cost, n_max=5, bottom_only=bottom)
    assert ranked[0].latency == pytest.approx(bf.latency, rel=1e-12) and ranked[0].chain == bf.chain
    assert all(i not in bottom for p in ranked for i in p.chain[1:])


def test_bottom_only_changes_the_toy_optimum():
    q = np.array([0, 0.35, 0.6, 0.8, 1.0])
    alpha = np.exp(-1.1 * np.abs(q[None, :] - q[:, None]))
    c = const_cost([0.02, 0.06, 0.15, 0.40, 1.0])
    assert plan(alpha, c, n_max=12)[0].chain == (0, 1, 2, 4)  # M1 verifies M0 ...
    best = plan(alpha, c, n_max=12, bottom_only=(0, 1))[0]  # ... unless both only propose
    assert best.chain[0] in (0, 1) and 1 not in best.chain[1:]
    with pytest.raises(ValueError, match="bottom_only"):
        plan(alpha, c, bottom_only=(4,))


def test_toy_selection_problem():
    """The reference notes' five-model toy: the DP picks M0 -> M1 -> M2 -> M4 with n = (2, 2, 3)."""
    q = np.array([0, 0.35, 0.6, 0.8, 1.0])
    alpha = np.exp(-1.1 * np.abs(q[None, :] - q[:, None]))
    c = [0.02, 0.06, 0.15, 0.40, 1.0]
    best = plan(alpha, const_cost(c), n_max=12)[0]
    assert best.chain == (0, 1, 2, 4) and best.batches == (2, 2, 3)
    assert best.speedup == pytest.approx(1.772, abs=2e-3)
    single = max(
        (p for p in plan(alpha, const_cost(c), n_max=12, top=50) if len(p.chain) == 2),
        key=lambda p: p.speedup,
    )
    assert best.speedup > single.speedup


# ------------------------------------------------------------------- calibration on tiny models
@pytest.mark.filterwarnings("ignore:models are not sorted")  # sub-ms tiny-model timings are noise
def test_calibrate_tiny_models(tmp_path):
    import torch

    from hierspec.calibrate import Calibration, calibrate
    from hierspec.models import TinyGPT, TinyGPTConfig, make_tiny_pair

    target, mid = make_tiny_pair(vocab_size=16, seed=2, dtype=torch.float64, max_length=128)
    small = TinyGPT(TinyGPTConfig(vocab_size=16, n_layer=1, d_model=16, seed=5), dtype=torch.float64)
    models = [small, mid, target]
    cal = calibrate(
        models,
        ["small", "mid", "target"],
        [[1, 2, 3], [4, 5], [6, 7, 8, 9]],
        sizes=(1, 4),
        context=32,
        new_tokens=12,
        repeats=2,
    )
    a = cal.alpha_matrix()
    assert np.allclose(np.diag(a), 1.0) and np.allclose(a, a.T)
    assert a[1, 2] > a[0, 2]  # the related 1-layer copy agrees with the target more
    assert all(
        lo <= x <= hi
        for lo, x, hi in zip(np.ravel(cal.alpha_lo), a.ravel(), np.ravel(cal.alpha_hi), strict=True)
    )
    assert cal.cost(2, 2) == pytest.approx(cal.costs[2][0] + (cal.costs[2][1] - cal.costs[2][0]) / 3)
    path = tmp_path / "cal.json"
    cal.save(path)
    assert Calibration.load(path, models).names == ["small", "mid", "target"]
    with pytest.raises(ValueError, match="made for other models"):
        Calibration.load(path, [mid, small, target])
    path.write_text("{not json")
    with pytest.raises(ValueError, match="unreadable or malformed"):
        Calibration.load(path)
    ranked = plan(a, cal.cost, n_max=4)
    assert ranked and ranked[0].chain[-1] == 2
    other = TinyGPT(TinyGPTConfig(vocab_size=7), dtype=torch.float64)
    with pytest.raises(ValueError, match="vocabularies differ"):
        calibrate([other, target], ["a", "b"], [[1]])


def test_unsorted_costs_warn():
    alpha = np.full((3, 3), 0.8)
    with pytest.warns(UserWarning, match="not sorted by increasing decode cost"):
        plan(alpha, const_cost([0.5, 0.1, 1.0]))


@pytest.mark.parametrize(
    ("alpha", "cost", "kw", "match"),
    [
        (np.ones((2, 3)), const_cost([1.0, 2.0]), {}, r"alpha: expected a square M x M matrix"),
        (np.zeros((0, 0)), const_cost([]), {}, r"alpha: expected a square"),
        ([[1.0, 0.5], [0.5]], const_cost([1.0, 2.0]), {}, r"alpha: .*ragged"),
        (
            np.array([[1.0, 5.0], [5.0, 1.0]]),
            const_cost([1.0, 2.0]),
            {},
            r"alpha: expected acceptance rates in \[0, 1\]",
        ),
        (
            np.array([[1.0, np.nan], [0.5, 1.0]]),
            const_cost([1.0, 2.0]),
            {},
            r"alpha: expected acceptance rates",
        ),
        (np.eye(2), const_cost([-1.0, 2.0]), {}, r"cost: expected positive finite"),
        (np.eye(2), const_cost([1.0, 2.0]), {"n_max": 0}, r"n_max: expected an integer >= 1"),
        (np.eye(2), const_cost([1.0, 2.0]), {"top": 1.5}, r"top: expected an integer >= 1"),
    ],
)
def test_plan_rejects_bad_inputs(alpha, cost, kw, match):
    with pytest.raises(ValueError, match=match):
        plan(alpha, cost, **kw)


@pytest.mark.filterwarnings("ignore:models are not sorted")
def test_calibrate_with_a_lookup_level():
    """An n-gram level: alpha(ngram, target) = mean over target-sampled positions of p_target(x),
    x its one-token proposal from the context before the position (0 where it proposes none).
    Checked against a direct computation; the same computation shifted by one position (the
    proposal made after seeing the token) must disagree."""
    import torch

    from hierspec.calibrate import calibrate, fingerprint
    from hierspec.drafters import NgramDrafter
    from hierspec.engine import generate
    from hierspec.models import make_tiny_pair
    from hierspec.sampling import SamplingParams, process_logits

    target, mid = make_tiny_pair(vocab_size=8, seed=4, dtype=torch.float64, max_length=128)
    prompts = [[1, 2, 3, 1, 2, 3, 1, 2], [4, 5, 4, 5, 4]]
    params = SamplingParams(temperature=1.0)
    cal = calibrate(
        [NgramDrafter(), mid, target],
        ["ngram", "mid", "target"],
        prompts,
        params=params,
        sizes=(1, 4),
        context=16,
        new_tokens=16,
        repeats=1,
    )
    assert cal.costs[0][0] < cal.costs[2][0] and fingerprint(NgramDrafter()) == cal.fingerprints[0]

    def direct(shift: int) -> float:
        rates = []
        for pi, prompt in enumerate(prompts):
            seq = list(prompt) + generate(target, prompt, params=params, max_new_tokens=16, seed=pi).token_ids
            target.reset()
            probs = process_logits(target.forward(torch.tensor([seq])).logits[0].double(), params)
            target.reset()
            ngram, got = NgramDrafter(), []
            for t in range(len(prompt), len(seq)):
                d = ngram.propose(torch.tensor([seq[: t + shift]]), 1)
                got.append(float(probs[t - 1, int(d.tokens[0, 0])]) if d.num_tokens else 0.0)
            rates.append(sum(got) / len(got))
        return sum(rates) / len(rates)

    a = cal.alpha_matrix()
    assert a[0, 2] == pytest.approx(direct(0), abs=1e-9) and a[0, 2] > 0
    assert a[0, 2] != pytest.approx(direct(1), abs=1e-3)  # negative control: peeking one token ahead
    assert a[0, 0] <= 1 and a[0, 2] <= a[0, 0]  # diagonal: how often it proposes at all
    ranked = plan(a, cal.cost, n_max=4)
    assert ranked[0].chain[-1] == 2
