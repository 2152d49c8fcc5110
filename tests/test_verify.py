"""Exactness of the verification rules: exact enumeration, laws vs samplers, edge cases,
bad input."""

from __future__ import annotations

import itertools
from fractions import Fraction

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from hierspec.verify import RULES, block, check_inputs, hsd, token
from hierspec.verify.block import capped_weights
from hierspec.verify.core import token_probs
from hierspec.verify.law import output_joint, random_tables
from hierspec.verify.scan import backward_scan, emit, scan_law

STOCHASTIC = ["token", "block", "hsd"]


# ---------------------------------------------------------------- negative controls (tests only)
def lossy_hsd_law(draft_tokens, draft_probs, target_probs):
    """The public HSD repository's rule: block/capped levels, but the full draft is accepted with
    the *uncapped* min(1, R_K). Lossy; kept only to prove the tests have power."""
    k = draft_tokens.shape[0]
    p_tok, q_tok = token_probs(draft_tokens, draft_probs, target_probs)
    w = capped_weights(p_tok, q_tok)
    h_full = torch.clamp(torch.prod(p_tok / q_tok), max=1.0)
    q = draft_probs
    rho = (w[:k, None] * target_probs[:k] - q).clamp(min=0)
    s = rho.sum(-1)
    den = s + 1 - w[:k]
    h = torch.where(den > 0, s / torch.where(den > 0, den, 1), torch.ones_like(s))
    return scan_law(torch.cat([torch.minimum(h, w[:k]), h_full[None]]), rho, s, target_probs)


def lossy_hsd_verify(draft_tokens, draft_probs, target_probs, generator=None):
    """Sampler of `lossy_hsd_law`, built on the real backward scan."""
    b, k = draft_tokens.shape
    u = torch.rand(b, k + 2, generator=generator, dtype=target_probs.dtype)
    p_tok, q_tok = token_probs(draft_tokens, draft_probs, target_probs)
    w = capped_weights(p_tok, q_tok)
    full = torch.clamp(torch.prod(p_tok / q_tok, -1), max=1.0)

    def level_fn(rows, lv):
        wl = w[rows].gather(1, lv)
        rho = (wl[..., None] * target_probs[rows[:, None], lv] - draft_probs[rows[:, None], lv]).clamp(min=0)
        s = rho.sum(-1)
        h = torch.minimum(s / (s + 1 - wl).clamp(min=1e-300), wl)
        return h, rho

    tau, rows, resid = backward_scan(u[:, : k + 1], w, full, level_fn)
    return tau, emit(target_probs, tau, rows, resid, u[:, k + 1])


def token_wrong_residual_law(draft_tokens, draft_probs, target_probs):
    """Token-wise with the correction drawn from p instead of (p - q)^+ (a classic bug)."""
    law = token.law(draft_tokens, draft_probs, target_probs).clone()
    k = draft_tokens.shape[0]
    for t in range(k):
        mass = law[t].sum()
        law[t] = mass * target_probs[t]
    return law


# ------------------------------------------------------------------- exact enumeration
CASES = [(v, k, seed) for v, k in [(2, 1), (2, 4), (3, 2), (3, 3), (4, 3), (5, 2), (5, 4)] for seed in (0, 1)]


@pytest.mark.parametrize("name", STOCHASTIC)
@pytest.mark.parametrize("v,k,seed", CASES)
def test_exact_enumeration_lossless(name, v, k, seed):
    rng = np.random.default_rng(1000 * v + 10 * k + seed)
    target = random_tables(v, k + 1, rng)
    draft = random_tables(v, k, rng)
    res = output_joint(RULES[name].law, target, draft, k)
    assert res.max_abs_error < 1e-12, (name, res.max_abs_error)


@pytest.mark.parametrize("name", STOCHASTIC)
@pytest.mark.parametrize("seed", range(4))
def test_exact_enumeration_truncated_and_deterministic(name, seed):
    """Targets with zeros (p = 0 at drafted tokens, as top-k/top-p produce), sparse drafts, and
    one-hot (deterministic, draft_probs=None) drafts."""
    rng = np.random.default_rng(seed)
    v, k = 4, 3
    target = random_tables(v, k + 1, rng, zero_frac=0.5)
    sparse = random_tables(v, k, rng, zero_frac=0.4)
    assert output_joint(RULES[name].law, target, sparse, k).max_abs_error < 1e-12
    det = random_tables(v, k, rng, one_hot=True)
    res = output_joint(RULES[name].law, target, det, k, deterministic_draft=True)
    assert res.max_abs_error < 1e-12


def test_exact_enumeration_greedy():
    rng = np.random.default_rng(7)
    for v, k in [(3, 3), (5, 2), (4, 4)]:
        target = random_tables(v, k + 1, rng, one_hot=True)
        draft = random_tables(v, k, rng)
        res = output_joint(RULES["greedy"].law, target, draft, k)
        assert res.max_abs_error < 1e-12


def test_instances_exercise_early_ratio_above_one():
    """The enumeration instances include drafts with R_j > 1 for some j < K and R_K < max R_j:
    exactly where the uncapped full acceptance differs from the capped one."""
    rng = np.random.default_rng(1000 * 3 + 10 * 3 + 0)
    target = random_tables(3, 4, rng)
    draft = random_tables(3, 3, rng)
    hits = 0
    for x in itertools.product(range(3), repeat=3):
        r = [target(x[:t])[x[t]] / draft(x[:t])[x[t]] for t in range(3)]
        big_r = np.cumprod(r)
        if big_r[:-1].max() > 1 and big_r[-1] < big_r[:-1].max():
            hits += 1
    assert hits > 0


@pytest.mark.parametrize("bad_law", [lossy_hsd_law, token_wrong_residual_law])
def test_negative_controls_fail_enumeration(bad_law):
    worst = 0.0
    for v, k, seed in CASES:
        if k < 2 and bad_law is lossy_hsd_law:
            continue  # with K = 1 the uncapped and capped full acceptance coincide
        rng = np.random.default_rng(1000 * v + 10 * k + seed)
        target = random_tables(v, k + 1, rng)
        draft = random_tables(v, k, rng)
        worst = max(worst, output_joint(bad_law, target, draft, k).max_abs_error)
    assert worst > 1e-3


# ------------------------------------------------------------------- Sun et al.'s toy case
def _const_tables(row, depth):
    return random_tables(2, depth, np.random.default_rng(0)).__class__(
        [np.broadcast_to(np.array(row, dtype=float), (2,) * i + (2,)).copy() for i in range(depth)]
    )


def test_sun_toy_expected_acceptance():
    p, q, k = (1 / 3, 2 / 3), (2 / 3, 1 / 3), 2
    target, draft = _const_tables(p, k + 1), _const_tables(q, k)
    got = {n: output_joint(RULES[n].law, target, draft, k) for n in STOCHASTIC}
    assert got["token"].expected_accepted == pytest.approx(10 / 9, abs=1e-14)
    assert got["block"].expected_accepted == pytest.approx(11 / 9, abs=1e-14)
    assert got["hsd"].expected_accepted == pytest.approx(11 / 9, abs=1e-14)
    lossy = output_joint(lossy_hsd_law, target, draft, k)
    assert lossy.expected_accepted == pytest.approx(12 / 9, abs=1e-14)
    # The repo's rule emits "ba" with probability 1/3 instead of 2/9, "bb" 1/3 instead of 4/9.
    two = lossy.output.sum(-1)
    assert two[1, 0] == pytest.approx(float(Fraction(1, 3)), abs=1e-14)
    assert got["block"].output.sum(-1)[1, 0] == pytest.approx(2 / 9, abs=1e-14)


# ------------------------------------------------------------------- HSD == block
def _random_draft(k, v, rng, dtype=torch.float64, concentration=1.0):
    p = torch.from_numpy(rng.dirichlet(np.full(v, concentration), size=k + 1)).to(dtype)
    q = torch.from_numpy(rng.dirichlet(np.full(v, concentration), size=k)).to(dtype)
    x = torch.tensor([rng.choice(v, p=q[t].numpy()) for t in range(k)])
    return x, q, p


def test_hsd_law_equals_block_law():
    rng = np.random.default_rng(3)
    for _ in range(300):
        k, v = int(rng.integers(1, 9)), int(rng.integers(2, 12))
        x, q, p = _random_draft(k, v, rng, concentration=float(rng.choice([0.3, 1.0, 3.0])))
        lb, lh = block.law(x, q, p), hsd.law(x, q, p)
        assert torch.allclose(lb, lh, atol=1e-12, rtol=0)


@pytest.mark.parametrize("v,k,seed", CASES)
def test_block_accepts_at_least_token_in_expectation(v, k, seed):
    """Sun et al.'s optimality is in expectation over drafts x ~ q (for one fixed draft, block can
    accept less than token-wise)."""
    rng = np.random.default_rng(1000 * v + 10 * k + seed)
    target = random_tables(v, k + 1, rng)
    draft = random_tables(v, k, rng)
    e_tok = output_joint(token.law, target, draft, k).expected_accepted
    e_blk = output_joint(block.law, target, draft, k).expected_accepted
    assert e_blk >= e_tok - 1e-12


def test_long_drafts_do_not_underflow():
    """K = 200 tokens of probability ~1e-3 each: joints are ~1e-600 (0 in float64)."""
    rng = np.random.default_rng(0)
    k, v = 200, 1000
    x, q, p = _random_draft(k, v, rng, concentration=1.0)
    for name in STOCHASTIC:
        law = RULES[name].law(x, q, p)
        assert torch.isfinite(law).all() and abs(float(law.sum()) - 1) < 1e-9
        out = RULES[name](x[None], q[None], p[None], torch.Generator().manual_seed(0))
        assert 0 <= int(out.num_accepted) <= k
    assert torch.allclose(block.law(x, q, p), hsd.law(x, q, p), atol=1e-12)


# ------------------------------------------------------------------- law vs sampler (chi²)
def _chi2_pvalue(samples_tau, samples_y, law, n, min_expected=5.0):
    """Pearson chi² of (tau, Y) samples against a law; sparse cells are pooled into one."""
    k1, v = law.shape
    counts = torch.zeros(k1 * v, dtype=torch.float64)
    counts.index_add_(0, samples_tau * v + samples_y, torch.ones(n, dtype=torch.float64))
    expected = law.reshape(-1) * n
    assert counts[expected == 0].sum() == 0, "sampled an outcome of probability 0"
    small = expected < min_expected
    obs = torch.cat([counts[~small], counts[small].sum()[None]])
    exp = torch.cat([expected[~small], expected[small].sum()[None]])
    keep = exp > 0
    return chisquare(obs[keep].numpy(), exp[keep].numpy() * float(obs[keep].sum() / exp[keep].sum())).pvalue


def _chi2_instance(seed=5, k=3, v=4):
    rng = np.random.default_rng(seed)
    # A draft that under-weights its first token (R_1 > 1) so the capping matters.
    p = torch.from_numpy(rng.dirichlet(np.ones(v), size=k + 1))
    q = torch.from_numpy(rng.dirichlet(np.ones(v), size=k))
    x = torch.tensor(
        [int(torch.argmax(p[0] / q[0]))] + [int(rng.choice(v, p=q[t].numpy())) for t in range(1, k)]
    )
    return x, q, p


@pytest.mark.parametrize("name", STOCHASTIC)
@pytest.mark.parametrize("deterministic", [False, True])
def test_sampler_matches_law_chi2(name, deterministic):
    x, q, p = _chi2_instance()
    if deterministic:
        q = None
    n = 200_000
    rule = RULES[name]
    out = rule(
        x.expand(n, -1),
        None if q is None else q.expand(n, -1, -1),
        p.expand(n, -1, -1),
        torch.Generator().manual_seed(11),
    )
    pval = _chi2_pvalue(out.num_accepted, out.next_token, rule.law(x, q, p), n)
    assert pval > 1e-4, pval


def test_chi2_negative_control():
    """The lossy sampler (uncapped full acceptance) samples its own law but is rejected against
    the lossless law: the chi² test has power."""
    x, q, p = _chi2_instance()
    n = 200_000
    tau, y = lossy_hsd_verify(
        x.expand(n, -1), q.expand(n, -1, -1), p.expand(n, -1, -1), torch.Generator().manual_seed(11)
    )
    law_ok = block.law(x, q, p)
    assert not torch.allclose(law_ok, lossy_hsd_law(x, q, p), atol=1e-3)
    assert _chi2_pvalue(tau, y, lossy_hsd_law(x, q, p), n) > 1e-4  # it does sample its own law
    assert _chi2_pvalue(tau, y, law_ok, n) < 1e-10


def test_lazy_scan_equals_full_scan():
    """Given the same uniforms, the lazy scan (1 or 2 candidate levels) returns the same tau as
    evaluating every level."""
    gen = torch.Generator().manual_seed(0)
    b, k, v = 512, 6, 7
    p = torch.softmax(torch.randn(b, k + 1, v, generator=gen, dtype=torch.float64) * 2, -1)
    q = torch.softmax(torch.randn(b, k, v, generator=gen, dtype=torch.float64) * 2, -1)
    x = torch.multinomial(q.reshape(-1, v), 1, generator=gen).reshape(b, k)
    p_tok, q_tok = token_probs(x, q, p)
    w = capped_weights(p_tok, q_tok)
    eta = torch.rand(b, k + 1, generator=gen, dtype=torch.float64)

    def level_fn(rows, lv):
        wl = w[rows].gather(1, lv)
        rho = (wl[..., None] * p[rows[:, None], lv] - q[rows[:, None], lv]).clamp(min=0)
        return block.stop_probs(rho.sum(-1), wl), rho

    taus = [backward_scan(eta, w, w[:, k], level_fn, num_lazy=m)[0] for m in (1, 2, k)]
    assert torch.equal(taus[0], taus[2]) and torch.equal(taus[1], taus[2])
    assert len(set(taus[2].tolist())) > 3  # the instance exercises many levels


# ------------------------------------------------------------------- edge cases
@pytest.mark.parametrize("name", [*STOCHASTIC, "greedy"])
def test_edge_cases(name):
    rule = RULES[name]
    g = torch.Generator().manual_seed(0)
    # V = 1: everything is accepted, the next token is 0.
    out = rule(torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 3, 1), torch.ones(2, 4, 1), g)
    assert out.num_accepted.tolist() == [3, 3] and out.next_token.tolist() == [0, 0]
    # K = 0: plain sampling from p.
    p0 = torch.tensor([[[0.0, 1.0, 0.0]]])
    out = rule(torch.zeros(1, 0, dtype=torch.long), torch.zeros(1, 0, 3), p0, g)
    assert out.num_accepted.tolist() == [0] and out.next_token.tolist() == [1]
    # p = 0 at the first drafted token: never accepted; q = 0 elsewhere is fine.
    p = torch.tensor([[[0.0, 0.5, 0.5], [0.2, 0.3, 0.5]]])
    q = torch.tensor([[[1.0, 0.0, 0.0]]])
    for _ in range(20):
        out = rule(torch.tensor([[0]]), q, p, g)
        assert out.num_accepted.item() == 0 and out.next_token.item() in (1, 2)
    if name == "greedy":
        return
    # One-hot q passed explicitly has the same law as draft_probs=None.
    x, _, pp = _chi2_instance(seed=2)
    onehot = torch.nn.functional.one_hot(x, 4).double()
    assert torch.allclose(rule.law(x, onehot, pp), rule.law(x, None, pp), atol=1e-15)
    # K = 1 with p == q: always accepted.
    pq = torch.tensor([[0.25, 0.75]], dtype=torch.float64)
    law = rule.law(torch.tensor([1]), pq, torch.cat([pq, pq]))
    assert float(law[1].sum()) == pytest.approx(1.0)


def test_greedy_rule():
    logits = torch.tensor([[[0.1, 2.0, 0.3], [1.0, 0.0, 5.0], [3.0, 0.0, 1.0]]])
    out = RULES["greedy"](torch.tensor([[1, 2]]), None, logits)
    assert out.num_accepted.item() == 2 and out.next_token.item() == 0
    out = RULES["greedy"](torch.tensor([[1, 0]]), None, logits)
    assert out.num_accepted.item() == 1 and out.next_token.item() == 2
    assert out.tokens(torch.tensor([[1, 0]])).tolist() == [[1, 2, -1]]


@pytest.mark.parametrize("name", [*STOCHASTIC, "greedy"])
def test_inputs_not_modified(name):
    x, q, p = _chi2_instance()
    b = 64
    xs, qs, ps = x.expand(b, -1).clone(), q.expand(b, -1, -1).clone(), p.expand(b, -1, -1).clone()
    copies = (xs.clone(), qs.clone(), ps.clone())
    RULES[name](xs, qs, ps, torch.Generator().manual_seed(0))
    RULES[name](xs, None, ps, torch.Generator().manual_seed(0))
    assert all(torch.equal(a, c) for a, c in zip((xs, qs, ps), copies, strict=True))


def test_float32_batch_runs():
    gen = torch.Generator().manual_seed(0)
    b, k, v = 8, 8, 1000
    p = torch.softmax(torch.randn(b, k + 1, v, generator=gen), -1)
    q = torch.softmax(torch.randn(b, k, v, generator=gen), -1)
    x = torch.multinomial(q.reshape(-1, v), 1, generator=gen).reshape(b, k)
    for name in STOCHASTIC:
        out = RULES[name](x, q, p, gen)
        assert out.num_accepted.dtype == torch.long and out.next_token.shape == (b,)
        assert ((out.next_token >= 0) & (out.next_token < v)).all()


# ------------------------------------------------------------------- bad input
def _good():
    x, q, p = _chi2_instance()
    return x[None], q[None], p[None]


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda x, q, p: (x.float(), q, p), "draft_tokens: expected an int64/int32"),
        (lambda x, q, p: (x[0], q, p), r"draft_tokens: expected shape \[B, K\]"),
        (lambda x, q, p: (x, q, p[:, :-1]), "target_probs: expected shape"),
        (lambda x, q, p: (x, q[:, :, :-1], p), "draft_probs: expected shape"),
        (lambda x, q, p: (x + 10, q, p), r"draft_tokens: expected token ids in \[0, 4\)"),
        (lambda x, q, p: (x, q, p * 2), "target_probs: expected rows summing to 1"),
        (lambda x, q, p: (x, q, torch.log(p)), "target_probs: expected probabilities >= 0"),
        (
            lambda x, q, p: (x, q, p.masked_fill(p > 0.3, float("nan"))),
            "target_probs: expected finite",
        ),
        (lambda x, q, p: (x, -q, p), "draft_probs: expected probabilities >= 0"),
        (lambda x, q, p: (x, _zero_at(q, x), p), "draft_probs: expected q > 0 at every drafted"),
    ],
)
def test_bad_input(mutate, match):
    x, q, p = mutate(*_good())
    for name in STOCHASTIC:
        with pytest.raises(ValueError, match=match):
            RULES[name](x, q, p)
    with pytest.raises(ValueError, match=match):
        check_inputs(x, q, p)


def _zero_at(q, x):
    q = q.clone()
    q[0, 1] = 0.0
    q[0, 1, (x[0, 1] + 1) % 4] = 1.0
    return q


def test_unknown_rule():
    from hierspec.verify import get_rule

    with pytest.raises(ValueError, match=r"unknown verification rule 'foo'.*block"):
        get_rule("foo")


# ------------------------------------------------------------------- naive HSD (analysis API)
def _naive_joint(target, draft, k, law_fn):
    """Output joint over V^{K+1} of naive HSD: K-token outputs padded with one target token."""
    v = target.vocab_size
    out = np.zeros((v,) * (k + 1))
    for x in itertools.product(range(v), repeat=k):
        qx = float(np.prod([draft(x[:t])[x[t]] for t in range(k)]))
        if qx == 0:
            continue
        for seq, prob in law_fn(x, target, draft).items():
            if len(seq) == k + 1:
                out[seq] += qx * prob
            else:
                out[seq] += qx * prob * target(seq)
    return out


@pytest.mark.parametrize("v,k,seed", [(2, 2, 0), (3, 2, 1), (3, 3, 2), (4, 3, 3)])
def test_naive_hsd_lossless(v, k, seed):
    from hierspec.verify import naive_hsd

    rng = np.random.default_rng(seed)
    target, draft = random_tables(v, k + 1, rng), random_tables(v, k, rng)
    assert np.abs(_naive_joint(target, draft, k, naive_hsd.law) - target.joint(k + 1)).max() < 1e-12


def test_naive_hsd_without_forward_sampling_is_lossy():
    """Negative control: after a level stop, continue with plain target sampling instead of the
    forward-sampled branch residuals (the uncapped prefix masses then leave excess uncorrected)."""
    from hierspec.verify import naive_hsd

    def no_forward(x, target, draft):
        out = {}
        for seq, prob in naive_hsd.law(x, target, draft).items():
            if len(seq) == len(x) + 1:
                out[seq] = out.get(seq, 0.0) + prob
                continue
            k = next(i for i in range(len(x)) if seq[i] != x[i])
            key = seq[: k + 1]
            out[key] = out.get(key, 0.0) + prob
        # Re-pad the truncated outputs with target continuations up to K tokens.
        full = {}
        for seq, prob in out.items():
            stack = [(seq, prob)]
            while stack:
                s, pr = stack.pop()
                if len(s) >= len(x):
                    full[s] = full.get(s, 0.0) + pr
                    continue
                for z, pz in enumerate(target(s)):
                    if pz > 0:
                        stack.append(((*s, z), pr * pz))
        return full

    worst = 0.0
    for seed in range(4):
        rng = np.random.default_rng(seed)
        target, draft = random_tables(3, 4, rng), random_tables(3, 3, rng)
        worst = max(worst, np.abs(_naive_joint(target, draft, 3, no_forward) - target.joint(4)).max())
    assert worst > 1e-3
