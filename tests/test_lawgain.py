"""The law-based gain analysis (`hierspec.bench.lawgain`) on the tiny pair: recorded rows are the
models' own, and the per-step exact expectations average to the exact E[accepted] that
enumeration over every draft gives (sampled drafts: within Monte Carlo error over drafts; greedy
drafts: exactly)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from hierspec.bench.lawgain import LAW_RULES, StepRows, law_gain, main, record_steps, step_expectations
from hierspec.models import make_tiny_pair
from hierspec.sampling import SamplingParams, process_logits
from hierspec.verify import RULES
from hierspec.verify.law import CondTables, output_joint

PROMPT = [1, 3]
K = 3


@pytest.fixture(scope="module")
def pair():
    return make_tiny_pair(vocab_size=5, seed=11, dtype=torch.float64, logit_scale=2.5)


def _row(model, ctx, params):
    model.reset()
    row = process_logits(model.forward(torch.tensor([ctx])).logits[0, -1:], params)[0]
    model.reset()
    return row


def _tables(model, depth, params, one_hot=False):
    v = model.vocab_size
    tabs = []
    for i in range(depth):
        t = np.zeros((v,) * i + (v,))
        for s in itertools.product(range(v), repeat=i):
            r = _row(model, PROMPT + list(s), params).numpy()
            t[s] = np.eye(v)[r.argmax()] if one_hot else r
        tabs.append(t)
    return CondTables(tabs)


@pytest.mark.parametrize(
    "params", [SamplingParams(temperature=1.0), SamplingParams(temperature=0.7, top_p=0.9)]
)
def test_recorded_expectations_match_enumeration(pair, params):
    target, draft = pair
    n = 300
    steps = [
        s
        for seed in range(n)
        for s in record_steps(target, draft, [PROMPT], params, K, new_tokens=1, seed=seed)
    ]
    assert len(steps) == n
    sampled, greedy = steps[0]
    assert greedy.q is None and sampled.q.shape == (K, 5) and sampled.p.shape == (K + 1, 5)
    ctx = list(PROMPT)
    for t, x in enumerate(greedy.tokens.tolist()):  # rows are the models' own along the draft
        assert torch.allclose(greedy.p[t], _row(target, ctx, params), atol=1e-12)
        assert x == int(_row(draft, ctx, params).argmax())
        ctx.append(x)
    tt, dt = _tables(target, K + 1, params), _tables(draft, K, params)
    a = np.stack([step_expectations(s) for s, _ in steps])  # [n, R, K]
    exact = {r: output_joint(RULES[r].law, tt, dt, K).expected_accepted for r in LAW_RULES}
    for i, r in enumerate(LAW_RULES):
        se = a[:, i, -1].std() / math.sqrt(n)
        assert abs(a[:, i, -1].mean() - exact[r]) < 4 * se + 1e-9, r
    # negative control: another rule's law (match's, ignoring q) is far from token's expectation
    m = LAW_RULES.index("match")
    assert abs(a[:, m, -1].mean() - exact["token"]) > 10 * a[:, m, -1].std() / math.sqrt(n)
    g = output_joint(
        RULES["match"].law, tt, _tables(draft, K, params, one_hot=True), K, deterministic_draft=True
    )
    res = law_gain(steps)
    assert res["steps"] == n and res["prompts"] == 1 and res["gamma"] == K
    assert res["mean"]["greedy"][-1] == pytest.approx(g.expected_accepted, abs=1e-9)
    assert res["mean"]["block"][0] == pytest.approx(res["mean"]["token"][0], abs=1e-12)  # g = 1
    np.testing.assert_allclose(res["mean"]["hsd"], res["mean"]["block"], atol=1e-9)
    tau = res["tau"]["block"]
    assert tau[0] == pytest.approx(1 + res["mean"]["block"][-1]) and tau[1] == tau[2] == tau[0]  # one prompt


def test_greedy_step_is_the_product_of_target_probabilities():
    rng = np.random.default_rng(1)
    p = torch.from_numpy(rng.dirichlet(np.full(7, 0.4), size=K + 1))
    x = torch.tensor([4, 0, 6])
    a = step_expectations(StepRows(x, None, p), ("token", "block", "match"))
    ref = np.cumsum(np.cumprod(p[torch.arange(K), x].numpy()))
    for row in a:
        np.testing.assert_allclose(row, ref, atol=1e-12)


def test_bad_input(pair, capsys):
    target, draft = pair
    with pytest.raises(ValueError, match="temperature > 0"):
        next(record_steps(target, draft, [PROMPT], SamplingParams(temperature=0), K))
    with pytest.raises(ValueError, match="nothing recorded"):
        law_gain([])
    for argv, msg in (
        (["--temperatures", "0,1"], "--temperatures"),
        (["--gamma", "0"], "--gamma"),
        (["--top-p", "1.5"], "--top-p"),
    ):
        with pytest.raises(SystemExit, match=msg):
            main(argv)


def test_cluster_bootstrap():
    from hierspec.bench.intervals import cluster_bootstrap

    sums = np.array([[3.0, 4.0], [1.0, 4.0], [8.0, 8.0]])  # per prompt: (accepted, steps)
    point, lo, hi = cluster_bootstrap(sums, lambda t: t[..., 0] / t[..., 1])
    assert point == pytest.approx(12 / 16) and 0.25 <= lo < point < hi <= 1.0
    assert cluster_bootstrap(sums[:1], lambda t: t[..., 0] / t[..., 1]) == (0.75, 0.75, 0.75)
    with pytest.raises(ValueError, match=r"^sums: expected shape"):
        cluster_bootstrap(np.zeros(3), lambda t: t)
