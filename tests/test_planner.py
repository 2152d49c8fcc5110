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
