"""The coupled sampler of deterministic drafts and the match rule (`hierspec.verify.coupled`),
and what it buys: a seeded text that does not depend on the draft lengths (`hierspec.rng`)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from hierspec.drafters import ModelDrafter, NgramDrafter
from hierspec.engine import generate
from hierspec.models import make_tiny_pair
from hierspec.rng import Streams, check_seed, position_uniforms
from hierspec.sampling import SamplingParams
from hierspec.verify import RULES, coupled, token
from hierspec.verify.law import output_joint, random_tables

CASES = [(v, k, seed) for v, k in [(2, 1), (3, 2), (4, 3), (5, 4)] for seed in (0, 1)]


# --------------------------------------------------------------------------- exact laws
@pytest.mark.parametrize("v,k,seed", CASES)
def test_match_rule_lossless_by_enumeration(v, k, seed):
    """Any draft (dense, sparse, one-hot): the output joint is the target's exactly."""
    rng = np.random.default_rng(seed + 100 * v + 10 * k)
    target = random_tables(v, k + 1, rng, zero_frac=0.3 * seed)
    for draft, det in ((random_tables(v, k, rng), False), (random_tables(v, k, rng, one_hot=True), True)):
        res = output_joint(RULES["match"].law, target, draft, k, deterministic_draft=det)
        assert res.max_abs_error < 1e-12


@pytest.mark.parametrize("v,k,seed", CASES)
def test_one_hot_drafts_have_one_law_under_every_rule(v, k, seed):
    """token, block, hsd and match have the same law for a deterministic draft (what lets every
    rule verify one-hot drafts with the coupled sampler)."""
    rng = np.random.default_rng(seed)
    p = torch.from_numpy(rng.dirichlet(np.full(v, 0.6), size=k + 1))
    p[:, 0] = 0.0 if seed else p[:, 0]  # zeros, as top-k / top-p make them
    p = p / p.sum(-1, keepdim=True)
    x = torch.from_numpy(rng.integers(0, v, size=k))
    ref = coupled.law(x, None, p)
    for name in ("token", "block", "hsd"):
        assert torch.allclose(RULES[name].law(x, None, p), ref, atol=1e-12, rtol=0), name


def test_wrong_correction_fails_enumeration():
    """Negative control: accepting X_t with probability p_t(X_t) but drawing the correction from
    p_t itself (X_t not excluded) is lossy, and the enumeration sees it."""

    def wrong_law(x, q, p):
        out = coupled.law(x, q, p).clone()
        for t in range(x.shape[0]):
            out[t] = out[t].sum() * p[t]
        return out

    rng = np.random.default_rng(5)
    target, draft = random_tables(3, 3, rng), random_tables(3, 2, rng, one_hot=True)
    assert output_joint(wrong_law, target, draft, 2, deterministic_draft=True).max_abs_error > 1e-3


def _chi2(tau: torch.Tensor, y: torch.Tensor, law: torch.Tensor) -> float:
    v = law.shape[1]
    counts = torch.bincount(tau * v + y, minlength=law.numel()).double()
    expected = law.flatten() * tau.numel()
    keep = expected > 0
    assert counts[~keep].sum() == 0
    return float(chisquare(counts[keep].numpy(), expected[keep].numpy()).pvalue)


@pytest.mark.parametrize("deterministic", [False, True])
def test_match_sampler_matches_its_law_chi2(deterministic):
    rng = np.random.default_rng(3)
    v, k, n = 5, 3, 100_000
    p = torch.from_numpy(rng.dirichlet(np.ones(v), size=k + 1))
    q = torch.from_numpy(rng.dirichlet(np.ones(v), size=k))
    x = torch.tensor([1, 3, 0])
    qq = None if deterministic else q[None].expand(n, -1, -1)
    out = RULES["match"](x.expand(n, -1), qq, p.expand(n, -1, -1), torch.Generator().manual_seed(1))
    law = coupled.law(x, None, p)
    assert _chi2(out.num_accepted, out.next_token, law) > 1e-4
    # its acceptance is lower than token-wise rejection with the same q (why the engines lose)
    if not deterministic:
        tok = token.law(x, q, p)
        assert tok[1:].sum() > law[1:].sum()


def test_coupled_rows_use_their_own_uniforms():
    """Row t emits F_t^{-1}(u_t): the same token as a one-row (k = 0) step with u_t."""
    rng = np.random.default_rng(0)
    v, k = 50, 4
    p = torch.from_numpy(rng.dirichlet(np.full(v, 0.3), size=k + 1))[None]
    u = torch.rand(1, k + 1, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    for x in (torch.zeros(1, k, dtype=torch.long), p[0, :k].argmax(-1)[None]):
        out = coupled.verify(x, None, p, None, uniforms=u)
        tau = int(out.num_accepted)
        alone = coupled.verify(x[:, :0], None, p[:, tau : tau + 1], None, uniforms=u[:, tau : tau + 1])
        assert int(out.next_token) == int(alone.next_token)


# --------------------------------------------------------------------------- seeded text
@pytest.fixture(scope="module")
def pair():
    return make_tiny_pair(vocab_size=16, seed=4, dtype=torch.float64, max_length=256)


PARAMS = SamplingParams(temperature=0.9, top_k=8)
PROMPT = [1, 5, 7, 5, 7, 5, 2, 9, 5, 7]


@pytest.mark.parametrize("rule", ["token", "block", "hsd", "match"])
def test_seeded_text_does_not_depend_on_draft_length(pair, rule):
    """A deterministic draft under every rule: the seeded text equals plain sampling's with the
    same seed, for every gamma (the adaptive policy and the server choose lengths by timing/load)."""
    target, _ = pair
    for seed in (0, 7):
        ar = generate(target, PROMPT, params=PARAMS, max_new_tokens=40, seed=seed).token_ids
        for gamma in (1, 3, 6):
            out = generate(
                target, PROMPT, drafter=NgramDrafter(), rule=rule, gamma=gamma,
                params=PARAMS, max_new_tokens=40, seed=seed,
            )  # fmt: skip
            assert out.token_ids == ar, (rule, seed, gamma)
        assert out.stats.num_accepted_draft_tokens > 0  # the drafts did something


def test_seeded_text_depends_on_draft_length_without_position_keys(pair, monkeypatch):
    """Negative control: uniforms drawn as the next numbers of the step's stream (not keyed by
    the position of the row) make the text depend on gamma."""

    def stream_uniforms(self, position, n):
        return torch.rand(1, n, generator=self.verify, dtype=torch.float64)

    monkeypatch.setattr(Streams, "uniforms", stream_uniforms)
    target, _ = pair
    texts = {
        g: tuple(generate(target, PROMPT, drafter=NgramDrafter(), gamma=g, params=PARAMS,
                          max_new_tokens=40, seed=0).token_ids)
        for g in (1, 3, 6)
    }  # fmt: skip
    texts[0] = tuple(generate(target, PROMPT, params=PARAMS, max_new_tokens=40, seed=0).token_ids)
    assert len(set(texts.values())) > 1


def test_stochastic_draft_reproducible_for_fixed_gamma(pair):
    """A sampling draft model: the same seed and gamma give the same text (streams re-seeded
    per step by position), another seed another text."""
    target, draft = pair
    runs = [
        generate(target, PROMPT, drafter=ModelDrafter(draft), rule="block", gamma=3, params=PARAMS,
                 max_new_tokens=30, seed=s).token_ids
        for s in (3, 3, 4)
    ]  # fmt: skip
    assert runs[0] == runs[1] != runs[2]


def test_position_uniforms_and_seed_range():
    u = position_uniforms(1, 3, 10, 5)
    assert u == position_uniforms(1, 3, 10, 5) and len(set(u)) == 5
    assert position_uniforms(1, 3, 11, 4) == u[1:]  # keyed by position, not by call
    assert all(0.0 <= x < 1.0 for x in position_uniforms(2**63 - 1, 1, 0, 1000))
    assert check_seed(2**63 - 1) == 2**63 - 1
    for bad in (-1, 2**63, 2**70, 1.5, True, "1"):
        with pytest.raises(ValueError, match="seed"):
            check_seed(bad)


def test_greedy_host_path_equals_the_rule():
    """`greedy.verify_host` (the engine's CPU path) gives the rule's (tau, Y) on tie-heavy
    rows, and refuses the rows `check_logits` refuses."""
    from hierspec.verify import greedy

    rng = np.random.default_rng(0)
    for _ in range(300):
        k = int(rng.integers(0, 5))
        scores = torch.from_numpy(rng.integers(0, 3, size=(k + 1, 6)).astype(np.float32))  # ties
        a = scores.argmax(-1)
        draft = [int(a[t]) if rng.random() < 0.7 else int(rng.integers(0, 6)) for t in range(k)]
        out = RULES["greedy"](torch.tensor([draft], dtype=torch.long).reshape(1, k), None, scores[None])
        assert greedy.verify_host(draft, scores.numpy()) == (int(out.num_accepted), int(out.next_token))
    ok = np.zeros((2, 4), dtype=np.float32)
    ok[0, 1] = -np.inf  # -inf entries are fine
    assert greedy.verify_host([0], ok) == (1, 0)
    for bad in (np.nan, np.inf):
        rows = ok.copy()
        rows[1, 3] = bad
        with pytest.raises(ValueError, match="NaN"):
            greedy.verify_host([0], rows)
    with pytest.raises(ValueError, match="NaN"):
        greedy.verify_host([], np.full((1, 4), -np.inf, dtype=np.float32))
