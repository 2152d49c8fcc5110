"""The adaptive draft-length policy: economics, online calibration, exploration, and exactness
(exact enumeration of draft-side choices, chi² of the engine, greedy identity), with negative
controls that peek at the target or drop a stochastic draft token because of its own value."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hierspec import policy
from hierspec.costs import CostCurve
from hierspec.drafters import Draft, ModelDrafter, NgramDrafter
from hierspec.engine import generate
from hierspec.models import TinyGPT, make_tiny_pair
from hierspec.policy import (
    AcceptanceModel,
    AdaptiveDrafter,
    best_length,
    continue_pays,
    expected_tokens,
    step_rates,
)
from hierspec.sampling import SamplingParams, process_logits
from hierspec.verify import RULES
from hierspec.verify.law import random_tables
from test_engine import chi2_p, exact_joint, plain_greedy, sample_counts

FLAT = CostCurve((1, 2, 4, 8), (1.0, 1.02, 1.06, 1.2))
STEEP = CostCurve((1, 2, 4, 6, 8), (1.0, 1.89, 2.75, 3.8, 4.33))  # llama.cpp Q4_1 (models.md §0)
MILD = CostCurve((1, 2, 3, 4), (1.0, 1.35, 1.7, 2.05))
GENTLE = CostCurve((1, 2, 3, 4), (1.0, 1.15, 1.3, 1.45))


# ------------------------------------------------------------------- economics
def test_expected_tokens_and_best_length():
    assert expected_tokens([]) == [1.0]
    assert expected_tokens([0.5, 0.5]) == [1.0, 1.5, 1.75]
    assert best_length([0.9] * 6, FLAT) == 6
    assert best_length([0.3] * 6, STEEP) == 0
    assert best_length([0.99, 0.99, 0.1, 0.99], STEEP) == 2
    assert best_length([0.9] * 6, FLAT, draft_cost=5.0) == 0  # an expensive drafter never pays
    rates = step_rates([0.9, 0.9], FLAT)
    assert rates[0] == pytest.approx(1.0) and rates[2] > rates[1] > rates[0]
    assert continue_pays([0.9], 0.9, 4, FLAT, 0.0, keep_all=True)
    assert not continue_pays([0.9], 0.1, 4, STEEP, 0.0, keep_all=True)


def test_acceptance_model_learns_and_forgets():
    m = AcceptanceModel(bins=10, prior_strength=2.0, max_count=50)
    assert m.estimate(0.95) == pytest.approx(0.95)  # prior: the raw confidence
    for _ in range(200):
        m.update([0.95, 0.95, 0.95], accepted=0)  # first rejected; later positions unobserved
    assert m.estimate(0.95) < 0.05
    assert m.n[9] == pytest.approx(50)  # capped: old observations decay
    for _ in range(200):
        m.update([0.95], accepted=1)
    assert m.estimate(0.95) > 0.9
    assert "0.9-1.0" in m.snapshot()["buckets"]


# ------------------------------------------------------------------- exact enumeration
def mixture_joint(law, target, draft, kmax, *, stop, final=None, deterministic=False):
    """Exact output joint ([V]*(kmax+1)) of one step whose draft length is chosen on the fly.

    The draft is drawn position by position from `draft`'s tables; ``stop(xs)`` (xs = tokens
    drafted so far, possibly empty) ends drafting; ``final(xs, p_rows)`` may then cut the draft
    (it sees the target's rows only in negative controls). Outputs shorter than kmax + 1 are
    padded with target continuations (as `hierspec.verify.law.output_joint`)."""
    v = target.vocab_size
    out = np.zeros((v,) * (kmax + 1))

    def verify(xs, weight):
        p_all = np.stack([target(xs[:t]) for t in range(len(xs) + 1)])
        k = len(xs) if final is None else final(xs, p_all)
        xs = xs[:k]
        p_rows = torch.from_numpy(p_all[: k + 1])
        q_rows = (
            None if deterministic or k == 0 else torch.from_numpy(np.stack([draft(xs[:t]) for t in range(k)]))
        )
        lx = law(torch.tensor(xs, dtype=torch.long), q_rows, p_rows).double().numpy()
        for j in range(k + 1):
            cont = np.zeros((v,) * (j + 1))
            cont[xs[:j]] = weight * lx[j]
            for i in range(j + 1, kmax + 1):
                cont = cont[..., None] * target.tables[i]
            out[...] += cont

    def walk(xs, weight):
        if len(xs) == kmax or stop(xs):
            verify(xs, weight)
            return
        for x in range(v):
            q = draft(xs)[x]
            if q > 0:
                walk((*xs, x), weight * q)

    walk((), 1.0)
    return out


def _policy_model(rng):
    """An AcceptanceModel with uneven learned counts (so the choices vary with confidence)."""
    m = AcceptanceModel()
    for _ in range(30):
        c = float(rng.random())
        m.update([c], accepted=int(rng.random() < c**2))
    return m


@pytest.mark.parametrize("name", ["token", "block", "hsd"])
@pytest.mark.parametrize("seed", range(3))
def test_enumeration_deterministic_draft_any_draft_side_length(name, seed):
    """(D) one-hot drafts: the policy's k from the drafted tokens' confidences is exact."""
    rng = np.random.default_rng(seed)
    v, kmax = 3, 3
    target = random_tables(v, kmax + 1, rng)
    det = random_tables(v, kmax, rng, one_hot=True)
    confs = random_tables(v, kmax, rng)  # an arbitrary draft-side "confidence" per prefix
    acc = _policy_model(rng)
    chosen = set()

    def policy_cut(xs, p_rows):
        del p_rows  # draft-side only
        a = [acc.estimate(float(confs(xs[:t]).max())) for t in range(len(xs))]
        chosen.add(best_length(a, MILD))
        return best_length(a, MILD)

    for stop_at in range(kmax + 1):  # also vary how far it drafts before cutting
        out = mixture_joint(
            RULES[name].law, target, det, kmax, stop=lambda xs, s=stop_at: len(xs) >= s, final=policy_cut,
            deterministic=True,
        )  # fmt: skip
        assert np.abs(out - target.joint(kmax + 1)).max() < 1e-12


@pytest.mark.parametrize("name", ["token", "block", "hsd"])
@pytest.mark.parametrize("seed", range(3))
def test_enumeration_stochastic_draft_stopping_time(name, seed):
    """(S) sampled drafts: stopping after X_i from q_i(X_i) (the wrapper's stop callback) is exact."""
    rng = np.random.default_rng(10 + seed)
    v, kmax = 3, 3
    target = random_tables(v, kmax + 1, rng)
    draft = random_tables(v, kmax, rng)
    acc = _policy_model(rng)
    lengths = set()

    def stop(xs):
        if not xs:
            return False
        a = [acc.estimate(float(draft(xs[:t])[xs[t]])) for t in range(len(xs))]
        s = not continue_pays(a, acc.rate, kmax, MILD, 0.0, keep_all=True)
        if s:
            lengths.add(len(xs))
        return s

    out = mixture_joint(RULES[name].law, target, draft, kmax, stop=stop)
    assert np.abs(out - target.joint(kmax + 1)).max() < 1e-12
    assert len(lengths) >= 1  # the stop rule fired (the test has power)


@pytest.mark.parametrize("name", ["token", "block"])
def test_enumeration_negative_controls(name):
    """Cutting a SAMPLED draft by its tokens' own confidences, or before the first position where
    the target's p(x) < q(x) (peeking), is biased; the same harness detects both."""
    rng = np.random.default_rng(3)
    v, kmax = 3, 3
    target = random_tables(v, kmax + 1, rng)
    draft = random_tables(v, kmax, rng)

    def own_value_cut(xs, p_rows):
        del p_rows
        for t in range(len(xs)):
            if draft(xs[:t])[xs[t]] < 0.4:
                return t
        return len(xs)

    def peek_cut(xs, p_rows):
        for t in range(len(xs)):
            if p_rows[t][xs[t]] < draft(xs[:t])[xs[t]]:
                return t
        return len(xs)

    never = lambda xs: False  # noqa: E731
    for cut in (own_value_cut, peek_cut):
        out = mixture_joint(RULES[name].law, target, draft, kmax, stop=never, final=cut)
        assert np.abs(out - target.joint(kmax + 1)).max() > 1e-3, cut.__name__


# ------------------------------------------------------------------- engine: chi² and identity
@pytest.fixture(scope="module")
def small_pair():
    return make_tiny_pair(vocab_size=5, seed=11, dtype=torch.float64, logit_scale=2.5)


@pytest.mark.parametrize("rule", ["token", "block"])
def test_engine_chi2_adaptive_model_drafter(small_pair, rule):
    target, draft = small_pair
    prompt = [1, 3]
    params = SamplingParams(temperature=1.0)
    joint = exact_joint(target, prompt, 3, params)
    # 3-token runs never show the policy their last step (see hierspec.policy), so its learned
    # acceptance would collapse towards 0; a strong prior keeps the estimates near the raw
    # confidences and the chosen k varied, which is what this test needs
    acc = AcceptanceModel(prior_strength=1e4)
    ad = AdaptiveDrafter(ModelDrafter(draft), GENTLE, draft_cost=0.0, k_max=3, acceptance=acc)
    counts = sample_counts(target, ad, prompt, 3, params, rule, 3, 2000, 5)
    assert chi2_p(counts, joint) > 1e-3
    assert len([k for k, n in ad.stats()["k_hist"].items() if n >= 20]) >= 2  # k really varied


def test_engine_chi2_adaptive_ngram(small_pair):
    target, _ = small_pair
    prompt = [1, 3, 1, 3, 1]
    params = SamplingParams(temperature=0.7)
    joint = exact_joint(target, prompt, 3, params)
    ad = AdaptiveDrafter(NgramDrafter(), STEEP, draft_cost=0.0, k_max=3, explore_every=2)
    counts = sample_counts(target, ad, prompt, 3, params, "block", 3, 2000, 6)
    assert chi2_p(counts, joint) > 1e-3
    assert len(ad.stats()["k_hist"]) >= 2


class PeekingDrafter(ModelDrafter):
    """Negative control: drafts k_max tokens, then cuts the draft just before the first position
    where the (processed) TARGET gives the drafted token less than the draft did."""

    def __init__(self, model, target_copy):
        super().__init__(model)
        self.peek = target_copy

    def propose(self, context, num_tokens, params, generator=None):
        d = super().propose(context, num_tokens, params, generator)
        if d.probs is None or d.num_tokens == 0:
            return d
        self.peek.reset()
        seq = torch.cat([context, d.tokens], 1)
        p = process_logits(self.peek.forward(seq).logits[0, context.shape[1] - 1 : -1], params)
        x = d.tokens[0]
        bad = (p[torch.arange(len(x)), x] < d.probs[0, torch.arange(len(x)), x]).nonzero()
        k = int(bad[0]) if len(bad) else len(x)
        return Draft(d.tokens[:, :k], d.probs[:, :k])


def test_engine_chi2_negative_control_peeking(small_pair):
    target, _ = small_pair
    _, draft = make_tiny_pair(vocab_size=5, seed=11, dtype=torch.float64, logit_scale=2.5, related=False)
    prompt = [1, 3]
    params = SamplingParams(temperature=1.0)
    joint = exact_joint(target, prompt, 3, params)
    peek = PeekingDrafter(draft, TinyGPT(target.config, dtype=torch.float64))
    counts = sample_counts(target, peek, prompt, 3, params, "token", 3, 2000, 5)
    assert chi2_p(counts, joint) < 1e-6


@pytest.mark.parametrize("curve", [FLAT, STEEP, MILD], ids=["flat", "steep", "mild"])
@pytest.mark.parametrize("rule", ["token", "block"])
def test_greedy_identity(curve, rule):
    target, draft = make_tiny_pair(vocab_size=32, seed=3, dtype=torch.float64, max_length=256)
    prompt = [1, 5, 7, 5, 7, 5, 2, 9]
    ref = plain_greedy(target, prompt, 40)
    for inner in (ModelDrafter(draft), NgramDrafter()):
        ad = AdaptiveDrafter(inner, curve, k_max=6, explore_every=2)
        for _ in range(2):  # the second run starts from what the first learned
            out = generate(
                target, prompt, drafter=ad, rule=rule, gamma=6, params=SamplingParams(temperature=0),
                max_new_tokens=40,
            )  # fmt: skip
            assert out.token_ids == ref


# ------------------------------------------------------------------- learning and exploration
class FixedDrafter:
    """Deterministic drafter proposing the same tokens with a fixed confidence."""

    vocab_size = None

    def __init__(self, tokens, conf):
        self.tokens, self.conf = tokens, conf

    def reset(self):
        pass

    def propose(self, context, num_tokens, params, generator=None):
        toks = self.tokens[:num_tokens]
        return Draft(torch.tensor([toks]), None, torch.full((len(toks),), self.conf))


class FakeClock:
    """Seconds that pass only when told (`advance`)."""

    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t

    def advance(self, seconds):
        self.t += seconds


def drive(ad, steps, accept, clock=None, costs=None):
    """Run `steps` fake steps: the committed tokens repeat the first `accept(k)` drafted ones;
    with a fake ``clock``, each step's target forward takes ``costs(k + 1)`` seconds."""
    ctx = torch.tensor([[1, 2, 3]])
    params = SamplingParams(temperature=0)
    for _ in range(steps):
        d = ad.propose(ctx, 4, params)
        k = d.num_tokens
        if clock is not None:
            clock.advance(costs(k + 1))
        m = min(accept(k), k)
        new = [*d.tokens[0, :m].tolist(), 63]
        ctx = torch.cat([ctx, torch.tensor([new])], 1)


def test_bad_drafter_falls_back_to_plain_and_explores_less_and_less():
    clock = FakeClock()
    ad = AdaptiveDrafter(
        FixedDrafter([9, 9, 9, 9], 0.95), STEEP, draft_cost=0.0, k_max=4, explore_every=4, clock=clock
    )
    drive(ad, 400, lambda k: 0, clock, STEEP)
    s = ad.stats()
    assert s["k_hist"][0] > 350  # k = 0 almost always
    assert 3 <= s["explorations"] <= 20  # explorations happen, with a growing interval
    assert s["acceptance"]["buckets"]["0.9-1.0"]["estimate"] < 0.3


def test_improving_drafter_is_noticed():
    clock = FakeClock()
    ad = AdaptiveDrafter(
        FixedDrafter([9, 9, 9, 9], 0.95), STEEP, draft_cost=0.0, k_max=4, explore_every=4, clock=clock
    )
    drive(ad, 100, lambda k: 0, clock, STEEP)
    ad.k_hist.clear()
    drive(ad, 400, lambda k: k, clock, STEEP)  # now every drafted token is accepted
    hist = ad.stats()["k_hist"]
    assert hist.get(4, 0) > 250


class SlowStoppableDrafter(FixedDrafter):
    """A model-like drafter (takes ``stop``) whose every consultation takes ``seconds`` of ``clock``."""

    stoppable = True

    def __init__(self, tokens, conf, seconds, clock):
        super().__init__(tokens, conf)
        self.seconds, self.clock = seconds, clock

    def propose(self, context, num_tokens, params, generator=None, *, stop=None):
        self.clock.advance(self.seconds)
        return super().propose(context, num_tokens, params, generator)


@pytest.mark.parametrize("budget,most", [(policy.EXPLORE_BUDGET, 1), (10.0, None)])
def test_dear_explorations_are_spaced_by_their_cost(monkeypatch, budget, most):
    """Exploring a drafter too costly to ask (consultations of 100 ms against c(1) = 10 ms) spaces
    the explorations so that they cost <= EXPLORE_BUDGET of the time: >= 500 steps apart here,
    so one in 300 steps; with a lax budget (negative control) the doubling interval alone
    (4, 8, 16, ...) explores several times."""
    monkeypatch.setattr(policy, "EXPLORE_BUDGET", budget)
    curve = CostCurve((1, 2, 4, 8), (0.010, 0.014, 0.020, 0.035))
    clock = FakeClock()
    drafter = SlowStoppableDrafter([9, 9, 9, 9], 0.95, 0.1, clock)
    ad = AdaptiveDrafter(drafter, curve, k_max=4, explore_every=4, clock=clock)
    ad._consult = 0.050  # as if measured: asking it cannot pay
    drive(ad, 300, lambda k: k, clock, curve)
    n = ad.stats()["explorations"]
    assert n <= most if most is not None else n >= 3, n


# ------------------------------------------------------------------- confidences, stop, bad input
def test_model_drafter_confidences_and_early_stop(small_pair):
    _, draft = small_pair
    ctx = torch.tensor([[1, 3, 2]])
    md = ModelDrafter(draft)
    d = md.propose(ctx, 4, SamplingParams(temperature=1.0), torch.Generator().manual_seed(0))
    q_tok = d.probs[0, torch.arange(4), d.tokens[0]].float()
    assert torch.allclose(d.confidence, q_tok)
    g = md.propose(ctx, 3, SamplingParams(temperature=0))
    assert g.probs is None and ((g.confidence > 0) & (g.confidence <= 1)).all()
    calls = []
    orig = draft.forward
    draft.forward = lambda *a, **k: (calls.append(1), orig(*a, **k))[1]
    try:
        md.reset()
        s = md.propose(ctx, 4, SamplingParams(temperature=0), stop=lambda conf: len(conf) >= 2)
    finally:
        del draft.forward
    assert s.num_tokens == 2 and len(calls) == 2  # sync forward + one draft forward, none wasted


def test_a_draft_as_costly_as_the_target_is_not_even_asked(small_pair):
    """Consulting a model drafter costs its catch-up forward even when it then drafts nothing:
    once a consultation is measured to cost more than drafting can win back (even at the best
    learned acceptance), the policy decodes plainly without asking it, except to explore; a cheap
    consultation keeps it asking (negative control)."""
    target, draft = small_pair
    curve = CostCurve((1, 2, 4, 8), (0.010, 0.014, 0.020, 0.035))
    calls = []
    orig = draft.forward
    draft.forward = lambda *a, **k: (calls.append(1), orig(*a, **k))[1]
    for consult, asked in ((0.050, False), (0.0001, True)):
        ad = AdaptiveDrafter(ModelDrafter(draft), curve, k_max=4, explore_every=1000)
        ad._consult = consult  # as if measured
        calls.clear()
        res = generate(
            target, [1, 3, 2], drafter=ad, gamma=4, params=SamplingParams(temperature=0), max_new_tokens=12
        )
        assert res.token_ids == plain_greedy(target, [1, 3, 2], 12)
        assert (len(calls) > 0) == asked, consult
    del draft.forward


def test_ngram_confidence_is_match_length():
    d = NgramDrafter(max_ngram=3).propose(torch.tensor([[4, 5, 6, 7, 4, 5, 6]]), 2)
    assert d.tokens[0].tolist() == [7, 4] and d.confidence.tolist() == pytest.approx([0.75, 0.75])


def test_bad_arguments():
    with pytest.raises(ValueError, match="costs"):
        AdaptiveDrafter(NgramDrafter(), [1.0, 2.0])
    with pytest.raises(ValueError, match="k_max"):
        AdaptiveDrafter(NgramDrafter(), FLAT, k_max=0)
    with pytest.raises(ValueError, match="draft_cost"):
        AdaptiveDrafter(NgramDrafter(), FLAT, draft_cost=-1.0)
    with pytest.raises(ValueError, match="explore_every"):
        AdaptiveDrafter(NgramDrafter(), FLAT, explore_every=0)
