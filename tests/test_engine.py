"""The decode engine on tiny models: greedy identity, exactness by chi², cache state, stopping,
seeds, bad input."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from factories import tiny_hf
from hierspec.drafters import Draft, ModelDrafter, NgramDrafter
from hierspec.engine import generate
from hierspec.models import TinyGPT, TinyGPTConfig, make_tiny_pair
from hierspec.models.base import ForwardOutput
from hierspec.sampling import SamplingParams, categorical, process_logits

RULES = ["token", "block", "hsd"]
N_CHI2 = 2000


def plain_greedy(model, prompt, n):
    """Reference greedy decoding: a fresh full-prefix forward for every token (no cache reuse)."""
    seq = list(prompt)
    for _ in range(n):
        model.reset()
        logits = model.forward(torch.tensor([seq])).logits[0, -1]
        seq.append(int(logits.argmax()))
    model.reset()
    return seq[len(prompt) :]


@pytest.fixture(scope="module")
def pair():
    return make_tiny_pair(vocab_size=32, seed=3, dtype=torch.float64, max_length=256)


@pytest.mark.parametrize("method", ["ar", "draft", "ngram"])
@pytest.mark.parametrize("rule", RULES)
def test_greedy_identity(pair, method, rule):
    target, draft = pair
    prompt = [1, 5, 7, 5, 7, 5, 2, 9]
    ref = plain_greedy(target, prompt, 40)
    drafter = {"ar": None, "draft": ModelDrafter(draft), "ngram": NgramDrafter()}[method]
    for gamma in (1, 3, 6):
        out = generate(
            target,
            prompt,
            drafter=drafter,
            rule=rule,
            gamma=gamma,
            params=SamplingParams(temperature=0),
            max_new_tokens=40,
            seed=0,
        )
        assert out.token_ids == ref, (method, rule, gamma)
        assert out.stats.num_generated_tokens == 40


def test_greedy_identity_hf_llama():
    pytest.importorskip("transformers")
    from hierspec.models import HFModel

    target = HFModel(tiny_hf(seed=0, max_position_embeddings=256))
    draft = HFModel(tiny_hf(seed=1, num_hidden_layers=1, max_position_embeddings=256))
    prompt = [3, 9, 27, 3, 9, 27, 3]
    ref = plain_greedy(target, prompt, 24)
    for drafter in (None, ModelDrafter(draft), NgramDrafter()):
        out = generate(
            target,
            prompt,
            drafter=drafter,
            rule="block",
            gamma=4,
            params=SamplingParams(temperature=0),
            max_new_tokens=24,
        )
        assert out.token_ids == ref


# ------------------------------------------------------------------- exactness (chi²)
def exact_joint(model, prompt, n, params):
    """Exact processed-target joint of the next n tokens, by enumeration ([V]*n)."""
    v = model.vocab_size
    joint = np.zeros((v,) * n)
    for seq in itertools.product(range(v), repeat=n):
        model.reset()
        logits = model.forward(torch.tensor([list(prompt) + list(seq[:-1])])).logits[0, len(prompt) - 1 :]
        probs = process_logits(logits, params)
        joint[seq] = float(torch.prod(probs[torch.arange(n), torch.tensor(seq)]))
    model.reset()
    return joint


class RawQDrafter(ModelDrafter):
    """Negative control: samples from the processed draft rows but reports the *unprocessed*
    softmax rows as q (the bug class of HF issue #47932)."""

    def propose(self, context, num_tokens, params, generator=None):
        ctx = context[0]
        logits = self._sync(ctx)
        tokens, rows = [], []
        u = torch.rand(num_tokens, generator=generator, dtype=torch.float64)
        for t in range(num_tokens):
            q = process_logits(logits[None], params)[0]
            x = int(categorical(q[None], u[t : t + 1])[0])
            rows.append(torch.softmax(logits.double(), -1))
            tokens.append(x)
            if t + 1 < num_tokens:
                logits = self.model.forward(torch.tensor([[x]])).logits[0, -1]
        self._fed = torch.cat([self._fed, torch.tensor(tokens[:-1], dtype=torch.long)])
        return Draft(torch.tensor([tokens]), torch.stack(rows)[None])


def sample_counts(target, drafter, prompt, n_tok, params, rule, gamma, n, seed):
    v = target.vocab_size
    counts = np.zeros((v,) * n_tok)
    for i in range(n):
        out = generate(
            target,
            prompt,
            drafter=drafter,
            rule=rule,
            gamma=gamma,
            params=params,
            max_new_tokens=n_tok,
            seed=seed * 100_000 + i,
        )
        counts[tuple(out.token_ids)] += 1
    return counts


def chi2_p(counts, joint, min_expected=5.0):
    """Pearson chi² p-value of counts against an exact joint; cells expected below
    `min_expected` are pooled into one (the chi² approximation fails on sparse cells)."""
    counts, exp = counts.reshape(-1), joint.reshape(-1) * counts.sum()
    assert counts[exp == 0].sum() == 0, "sampled a sequence of probability 0"
    small = exp < min_expected
    obs = np.append(counts[~small], counts[small].sum())
    ex = np.append(exp[~small], exp[small].sum())
    keep = ex > 0
    return chisquare(obs[keep], ex[keep] * obs[keep].sum() / ex[keep].sum()).pvalue


@pytest.fixture(scope="module")
def small_pair():
    return make_tiny_pair(vocab_size=5, seed=11, dtype=torch.float64, logit_scale=2.5)


CHI2_CASES = [
    ("token", 2, SamplingParams(temperature=1.0)),
    ("block", 3, SamplingParams(temperature=0.7, top_p=0.9)),
    ("hsd", 2, SamplingParams(temperature=1.0, top_k=4)),
    ("block", 1, SamplingParams(temperature=1.0, min_p=0.05)),
]


@pytest.mark.parametrize("rule,gamma,params", CHI2_CASES)
def test_engine_exact_chi2(small_pair, rule, gamma, params):
    target, draft = small_pair
    prompt = [1, 3]
    joint = exact_joint(target, prompt, 3, params)
    counts = sample_counts(target, ModelDrafter(draft), prompt, 3, params, rule, gamma, N_CHI2, 1)
    assert chi2_p(counts, joint) > 1e-3


def test_engine_exact_chi2_ngram(small_pair):
    target, _ = small_pair
    prompt = [1, 3, 1, 3, 1]
    params = SamplingParams(temperature=0.7)
    joint = exact_joint(target, prompt, 3, params)
    counts = sample_counts(target, NgramDrafter(), prompt, 3, params, "block", 3, N_CHI2, 2)
    assert chi2_p(counts, joint) > 1e-3


def test_engine_chi2_negative_control(small_pair):
    """Verifying against the unprocessed draft distribution is detected."""
    target, draft = small_pair
    prompt = [1, 3]
    params = SamplingParams(temperature=0.7, top_p=0.9)
    joint = exact_joint(target, prompt, 3, params)
    counts = sample_counts(target, RawQDrafter(draft), prompt, 3, params, "token", 3, N_CHI2, 1)
    assert chi2_p(counts, joint) < 1e-6


# ------------------------------------------------------------------- cache state, stopping, seeds
def test_caches_equal_fresh_prefill_after_every_step(pair):
    target, draft = pair
    fresh = TinyGPT(target.config, dtype=torch.float64)
    fresh_draft = TinyGPT(draft.config, dtype=torch.float64)
    drafter = ModelDrafter(draft)
    prompt = [4, 8, 15, 16, 23]
    committed = list(prompt)
    checks = []

    def on_tokens(step):
        committed.extend(step)
        assert target.cache_length == len(committed) - 1
        fresh.reset()
        ref = fresh.forward(torch.tensor([committed])).logits[0, -1]
        got = target.forward(torch.tensor([[committed[-1]]])).logits[0, -1]
        target.crop(len(committed) - 1)
        assert torch.allclose(got, ref, atol=1e-10)
        # The draft's cache holds exactly the tokens it has fed.
        n = draft.cache_length
        fed = drafter._fed.tolist()
        assert n == len(fed)
        if n:  # its next-token logits equal a fresh prefill's
            got_d = draft.forward(torch.tensor([[fed[-1]]])).logits[0, -1]
            draft.crop(n)
            fresh_draft.reset()
            ref_d = fresh_draft.forward(torch.tensor([[*fed, fed[-1]]])).logits[0, -1]
            assert torch.allclose(got_d, ref_d, atol=1e-10)
        checks.append(1)

    generate(
        target,
        prompt,
        drafter=drafter,
        rule="block",
        gamma=4,
        params=SamplingParams(temperature=1.0),
        max_new_tokens=30,
        seed=5,
        on_tokens=on_tokens,
    )
    assert len(checks) >= 5


def test_eos_max_tokens_and_streaming(pair):
    target, draft = pair
    prompt = [1, 2, 3]
    full = generate(target, prompt, params=SamplingParams(temperature=0), max_new_tokens=30)
    eos = full.token_ids[7]
    first = full.token_ids.index(eos)
    streamed = []
    out = generate(
        target,
        prompt,
        drafter=ModelDrafter(draft),
        params=SamplingParams(temperature=0),
        max_new_tokens=30,
        eos_token_id=eos,
        on_tokens=streamed.extend,
        gamma=4,
    )
    assert out.token_ids == full.token_ids[: first + 1] and out.finish_reason == "eos"
    assert streamed == out.token_ids
    out = generate(
        target,
        prompt,
        drafter=ModelDrafter(draft),
        params=SamplingParams(temperature=1),
        max_new_tokens=13,
        gamma=5,
        seed=1,
    )
    assert len(out.token_ids) == 13 and out.finish_reason == "length"


class CharTokenizer:
    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(97 + i % 26) for i in ids)


def test_stop_strings(pair):
    target, _ = pair
    tok = CharTokenizer()
    full = generate(target, [1, 2], params=SamplingParams(temperature=0), max_new_tokens=20, tokenizer=tok)
    stop = full.text[5:7]
    out = generate(
        target,
        [1, 2],
        drafter=NgramDrafter(),
        params=SamplingParams(temperature=0),
        max_new_tokens=20,
        tokenizer=tok,
        stop_strings=[stop],
    )
    assert out.finish_reason == "stop"
    assert out.text == full.text[: full.text.index(stop) + len(stop)]
    assert tok.decode(out.token_ids) == out.text


def test_seed_reproducible(pair):
    target, draft = pair
    kw = dict(
        drafter=ModelDrafter(draft),
        params=SamplingParams(temperature=1.0, top_p=0.9),
        max_new_tokens=25,
        rule="hsd",
    )
    a = generate(target, [1, 2, 3], seed=7, **kw).token_ids
    b = generate(target, [1, 2, 3], seed=7, **kw).token_ids
    c = generate(target, [1, 2, 3], seed=8, **kw).token_ids
    assert a == b and a != c


def test_stats(pair):
    target, draft = pair
    out = generate(
        target,
        [1, 2, 3],
        drafter=ModelDrafter(draft),
        gamma=4,
        params=SamplingParams(temperature=0),
        max_new_tokens=40,
    )
    s = out.stats
    assert s.num_generated_tokens == 40
    assert s.num_generated_tokens == s.num_accepted_draft_tokens + s.num_target_forwards
    assert s.mean_acceptance_length == pytest.approx(1 + s.num_accepted_draft_tokens / s.num_spec_steps)
    assert sum(s.acceptance_histogram) == s.num_spec_steps
    d = s.to_dict()
    for key in (
        "mean_acceptance_length",
        "draft_acceptance_rate",
        "per_position_acceptance_rate",
        "num_spec_steps",
        "num_draft_tokens",
        "num_accepted_draft_tokens",
        "target_forwards_per_token",
        "tokens_per_second",
        "time_draft",
        "time_target_forward",
        "time_verify_rule",
        "time_rollback",
    ):
        assert key in d


# ------------------------------------------------------------------- bad input
class NaNModel(TinyGPT):
    def forward(self, input_ids, *, output_hidden=False):
        out = super().forward(input_ids, output_hidden=output_hidden)
        return ForwardOutput(out.logits * float("nan"), out.hidden)


def test_bad_input(pair):
    target, _draft = pair
    with pytest.raises(ValueError, match="prompt is empty"):
        generate(target, [])
    with pytest.raises(ValueError, match="context holds 256"):
        generate(target, [1] * 300)
    with pytest.raises(ValueError, match="gamma: expected an integer >= 1"):
        generate(target, [1], gamma=0)
    with pytest.raises(ValueError, match="temperature must be"):
        SamplingParams(temperature=-1)
    with pytest.raises(ValueError, match="top_p must be in"):
        SamplingParams(top_p=1.5)
    with pytest.raises(ValueError, match="top_p must be in"):
        SamplingParams(top_p=0)
    with pytest.raises(ValueError, match="unknown verification rule"):
        generate(target, [1], rule="nope")
    other = TinyGPT(TinyGPTConfig(vocab_size=7), dtype=torch.float64)
    with pytest.raises(ValueError, match="drafter: its vocabulary has 7 tokens"):
        generate(target, [1], drafter=ModelDrafter(other))
    nan = NaNModel(TinyGPTConfig(vocab_size=8), dtype=torch.float64)
    for t in (0, 1):
        with pytest.raises(ValueError, match="NaN"):
            generate(nan, [1, 2], params=SamplingParams(temperature=t))
