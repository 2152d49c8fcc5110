"""Draft sampling as a choice (`ModelDrafter(model, sampling="sample" | "greedy")`): a greedy
draft at temperature > 0 (the engines' practice, probs=None) and a sampled draft are both exact
under every rule (token, block, hsd, match).

Exact laws: the toy's conditional tables are the tiny models' own processed rows after the
prompt (every prefix up to K), the draft tables what the drafter proposes (greedy: one-hot at its
token; sample: the row it reports), and `output_joint` enumerates every draft and outcome with
``RULES[rule].law``. Sampled outputs: chi² of the engine's 3-token outputs against the target's
exact joint, at T = 1 and T = 0.7 with top-p, with the bench's exact-expectation hook riding
along (z-score). Negative control: a greedy draft that reports the draft's full row q as probs."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from hierspec.bench.runner import _LawHook
from hierspec.drafters import Draft, ModelDrafter
from hierspec.drafters.model import DRAFT_SAMPLINGS, check_draft_sampling
from hierspec.engine import generate
from hierspec.models import make_tiny_pair
from hierspec.models.base import ForwardOutput
from hierspec.sampling import SamplingParams, process_logits
from hierspec.verify import RULES, coupled
from hierspec.verify.law import CondTables, output_joint

SPEC_RULES = ["token", "block", "hsd", "match"]
PARAMS = {
    "T1": SamplingParams(temperature=1.0),
    "T0.7-top-p": SamplingParams(temperature=0.7, top_p=0.9),
}
PROMPT = [1, 3]
N_CHI2 = 500
N_TOK = 3


@pytest.fixture(scope="module")
def pair():
    return make_tiny_pair(vocab_size=5, seed=11, dtype=torch.float64, logit_scale=2.5)


def _rows(model, ctx: list[int], params: SamplingParams) -> torch.Tensor:
    """Processed next-token row [V] of ``model`` after ``ctx`` (a fresh forward)."""
    model.reset()
    row = process_logits(model.forward(torch.tensor([ctx])).logits[0, -1:], params)[0]
    model.reset()
    return row


# --------------------------------------------------------------------------- the argument
def test_bad_sampling_is_one_clear_error(pair):
    _, draft = pair
    assert DRAFT_SAMPLINGS == ("sample", "greedy")
    for bad in ("Greedy", "argmax", "", None, 1):
        with pytest.raises(ValueError, match=r"^sampling: expected one of 'sample', 'greedy'"):
            ModelDrafter(draft, sampling=bad)
    with pytest.raises(ValueError, match=r"^--draft-sampling: "):
        check_draft_sampling("x", "--draft-sampling")
    assert ModelDrafter(draft).sampling == "sample"


# --------------------------------------------------------------------------- what is drafted
@pytest.mark.parametrize("key", list(PARAMS))
def test_greedy_draft_is_the_argmax_of_q_with_its_confidence(pair, key):
    """greedy: X_t = argmax q_t along its own path, probs None, c_t = q_t(X_t); sample: the
    rows reported are exactly the processed rows q_t."""
    _, draft = pair
    params = PARAMS[key]
    out = ModelDrafter(draft, "greedy").propose(torch.tensor([PROMPT]), 4, params, torch.Generator())
    assert out.probs is None and out.num_tokens == 4
    ctx = list(PROMPT)
    for t, x in enumerate(out.tokens[0].tolist()):
        q = _rows(draft, ctx, params)
        assert x == int(q.argmax())
        assert float(out.confidence[t]) == pytest.approx(float(q[x]), abs=1e-6)
        ctx.append(x)
    samp = ModelDrafter(draft, "sample").propose(torch.tensor([PROMPT]), 4, params, torch.Generator())
    ctx = list(PROMPT)
    for t, x in enumerate(samp.tokens[0].tolist()):
        assert torch.allclose(samp.probs[0, t], _rows(draft, ctx, params), atol=1e-12, rtol=0)
        ctx.append(x)


class _TiedModel:
    """A LanguageModel stub whose every row is the same logits vector (ties included)."""

    def __init__(self, logits: list[float]) -> None:
        self.row = torch.tensor(logits, dtype=torch.float64)
        self.vocab_size = len(logits)
        self.max_length = 64
        self.device = torch.device("cpu")
        self.n = 0

    def reset(self) -> None:
        self.n = 0

    def crop(self, n: int) -> None:
        self.n = n

    def forward(self, ids: torch.Tensor, **_kw) -> ForwardOutput:
        self.n += ids.shape[1]
        return ForwardOutput(self.row.expand(1, ids.shape[1], -1).clone())


def test_greedy_draft_takes_the_first_maximum():
    d = ModelDrafter(_TiedModel([0.0, 2.0, 2.0, -1.0]), "greedy")
    out = d.propose(torch.tensor([[0, 1]]), 3, SamplingParams(temperature=0.8, top_p=0.95))
    assert out.tokens[0].tolist() == [1, 1, 1] and out.probs is None


# --------------------------------------------------------------------------- exact laws
def _tables(pair, params: SamplingParams, sampling: str, k: int) -> tuple[CondTables, CondTables, dict]:
    """Target tables (depth k+1), the drafter's tables (depth k) and the draft's full rows q by
    prefix, all read from the tiny models after ``PROMPT``."""
    target, draft = pair
    v = target.vocab_size
    drafter = ModelDrafter(draft, sampling)
    t_tabs, d_tabs, q_full = [], [], {}
    for i in range(k + 1):
        t_tab = np.zeros((v,) * i + (v,))
        d_tab = np.zeros((v,) * i + (v,))
        for s in itertools.product(range(v), repeat=i):
            t_tab[s] = _rows(target, PROMPT + list(s), params).numpy()
            if i == k:
                continue
            q_full[s] = _rows(draft, PROMPT + list(s), params)
            drafter.reset()
            out = drafter.propose(torch.tensor([PROMPT + list(s)]), 1, params, torch.Generator())
            if sampling == "greedy":
                assert out.probs is None
                d_tab[s][int(out.tokens[0, 0])] = 1.0
            else:
                d_tab[s] = out.probs[0, 0].numpy()
        t_tabs.append(t_tab)
        d_tabs.append(d_tab)
    return CondTables(t_tabs), CondTables(d_tabs[:k]), q_full


@pytest.mark.parametrize("key", list(PARAMS))
@pytest.mark.parametrize("sampling", DRAFT_SAMPLINGS)
def test_every_rule_is_lossless_by_enumeration(pair, sampling, key):
    k = 3
    target, draft, _ = _tables(pair, PARAMS[key], sampling, k)
    for rule in SPEC_RULES:
        res = output_joint(RULES[rule].law, target, draft, k, deterministic_draft=sampling == "greedy")
        assert res.max_abs_error < 1e-12, (rule, sampling, key)
    if sampling == "greedy":  # one law for a deterministic draft: P(accept X_t) = p_t(X_t)
        e = {r: output_joint(RULES[r].law, target, draft, k, deterministic_draft=True) for r in SPEC_RULES}
        assert max(abs(e[r].expected_accepted - e["match"].expected_accepted) for r in SPEC_RULES) < 1e-12


@pytest.mark.parametrize("key", list(PARAMS))
def test_greedy_draft_reported_with_its_full_q_fails_enumeration(pair, key):
    """Negative control: greedy tokens verified as if drawn from the full row q (the draft's
    argmax is not a draw from q) are lossy under token, block and hsd; match ignores q."""
    k = 3
    target, draft, q_full = _tables(pair, PARAMS[key], "greedy", k)

    def wrong(rule):
        def law(x, _q, p):
            q = torch.stack([q_full[tuple(x[:t].tolist())] for t in range(x.shape[0])])
            return RULES[rule].law(x, q, p)

        return law

    for rule in SPEC_RULES:
        err = output_joint(wrong(rule), target, draft, k, deterministic_draft=True).max_abs_error
        assert (err < 1e-12) if rule == "match" else (err > 1e-3), (rule, err)


# --------------------------------------------------------------------------- sampled outputs
def _exact_joint(target, params: SamplingParams) -> np.ndarray:
    v = target.vocab_size
    joint = np.ones(())
    for i in range(N_TOK):
        tab = np.zeros((v,) * i + (v,))
        for s in itertools.product(range(v), repeat=i):
            tab[s] = _rows(target, PROMPT + list(s), params).numpy()
        joint = joint[..., None] * tab
    return joint


def _chi2_p(counts: np.ndarray, joint: np.ndarray, min_expected: float = 5.0) -> float:
    """Pearson chi² p-value; cells expected below ``min_expected`` pooled into one."""
    counts, exp = counts.reshape(-1), joint.reshape(-1) * counts.sum()
    assert counts[exp == 0].sum() == 0, "sampled a sequence of probability 0"
    small = exp < min_expected
    obs, ex = np.append(counts[~small], counts[small].sum()), np.append(exp[~small], exp[small].sum())
    keep = ex > 0
    return float(chisquare(obs[keep], ex[keep] * obs[keep].sum() / ex[keep].sum()).pvalue)


def _run(target, drafter, rule: str, params: SamplingParams, seed: int) -> tuple[np.ndarray, _LawHook]:
    counts = np.zeros((target.vocab_size,) * N_TOK)
    hook = _LawHook(rule)
    for i in range(N_CHI2):
        out = generate(
            target, PROMPT, drafter=drafter, rule=rule, gamma=2, params=params,
            max_new_tokens=N_TOK, seed=seed * 100_000 + i, on_verify=hook,
        )  # fmt: skip
        counts[tuple(out.token_ids)] += 1
    return counts, hook


@pytest.mark.parametrize("key", list(PARAMS))
@pytest.mark.parametrize("sampling", DRAFT_SAMPLINGS)
@pytest.mark.parametrize("rule", SPEC_RULES)
def test_engine_output_chi2_and_expected_acceptance(pair, rule, sampling, key):
    """The engine's outputs follow the target's law; the measured accepted tokens stay within the
    exact expectation the bench computes from ``RULES[rule].law`` (|z| < 4)."""
    target, draft = pair
    params = PARAMS[key]
    counts, hook = _run(target, ModelDrafter(draft, sampling), rule, params, 1)
    assert _chi2_p(counts, _exact_joint(target, params)) > 1e-3
    assert hook.steps > 0 and hook.variance > 0
    assert abs(hook.measured - hook.expected) / math.sqrt(hook.variance) < 4


class GreedyFullQDrafter(ModelDrafter):
    """Negative control: drafts the argmax of q but reports the full processed rows q."""

    def __init__(self, model) -> None:
        super().__init__(model, "greedy")

    def propose(self, context, num_tokens, params, generator=None, **kw):
        out = super().propose(context, num_tokens, params, generator, **kw)
        ctx = context[0].tolist()
        rows = []
        for x in out.tokens[0].tolist():
            rows.append(_rows(self.model, ctx, params))
            ctx.append(x)
        self.reset()  # the fresh forwards above replaced the cache
        return Draft(out.tokens, torch.stack(rows)[None], out.confidence)


def test_engine_chi2_negative_control_greedy_draft_with_full_q(pair):
    target, draft = pair
    params = PARAMS["T1"]
    counts, _ = _run(target, GreedyFullQDrafter(draft), "token", params, 1)
    assert _chi2_p(counts, _exact_joint(target, params)) < 1e-6


def test_greedy_expected_acceptance_is_p_of_the_draft_token():
    """For a deterministic draft every rule's law accepts position t (given t-1) with
    probability p_t(X_t): what the bench's z-score column uses for greedy drafts."""
    rng = np.random.default_rng(0)
    p = torch.from_numpy(rng.dirichlet(np.full(6, 0.5), size=4))
    x = torch.tensor([2, 0, 5])
    reach = torch.cumprod(p[torch.arange(3), x], 0)  # P(tau >= t), t = 1..3
    for rule in SPEC_RULES:
        law = RULES[rule].law(x, None, p)
        tail = law.sum(-1).flip(0).cumsum(0).flip(0)[1:]  # P(tau >= t)
        assert torch.allclose(tail, reach, atol=1e-12, rtol=0), rule
        assert torch.allclose(law, coupled.law(x, None, p), atol=1e-12, rtol=0), rule


# --------------------------------------------------------------------------- the bench axis
class _CharTokenizer:
    eos_token_id = None

    def __call__(self, text: str) -> dict:
        return {"input_ids": [3 + ord(c) % 29 for c in text]}


def test_bench_draft_sampling_axis_and_intervals(tmp_path):
    """``--draft-sampling greedy,sample``: one cell per draft sampling for draft models only,
    labelled ``[greedy]``; greedy cells of every rule emit the same text (one coupled sampler),
    so their Δτ against match [greedy] is 0 exactly; the report gives τ with its interval."""
    from hierspec.bench import harness
    from hierspec.bench.config import build_parser, config_from_args, plan_cells
    from hierspec.bench.intervals import acceptance_intervals
    from hierspec.bench.report import write_report
    from hierspec.methods import MethodError, MethodSpec, build_method
    from hierspec.methods.modelset import ModelSet
    from hierspec.prompts import Prompt

    argv = ["--out", str(tmp_path / "o"), "--methods", "ar,ngram,draft:small", "--rules", "match,block"]
    cfg = config_from_args(build_parser().parse_args([*argv, "--draft-sampling", "greedy,sample"]))
    assert cfg.draft_samplings == ["greedy", "sample"]
    assert config_from_args(build_parser().parse_args(argv)).draft_samplings == ["sample"]
    with pytest.raises(harness.BenchError, match=r"^--draft-sampling: expected one of"):
        config_from_args(build_parser().parse_args([*argv, "--draft-sampling", "greedy,argmax"]))
    cfg.temperatures, cfg.gammas = [0.0, 0.8], [3]
    labels = [c.label for c in plan_cells(cfg) if c.temperature > 0]
    assert "draft:small/block/γ3 [greedy]" in labels and "draft:small/block/γ3" in labels
    assert sum("ngram" in x for x in labels) == 2 and not any("ngram" in x and "[" in x for x in labels)

    target, draft = make_tiny_pair(vocab_size=32, seed=3, dtype=torch.float64, max_length=256)
    with pytest.raises(MethodError, match="draft sampling 'greedy' applies to"):
        build_method("ngram", ModelSet(target), draft_sampling="greedy")
    with pytest.raises(ValueError, match=r"^draft_sampling: expected one of"):
        build_method("ngram", ModelSet(target), draft_sampling="top")
    path = str(tmp_path)
    cfg = harness.BenchConfig(
        out=tmp_path / "o",
        methods=[MethodSpec("ar", "ar"), MethodSpec(f"draft:{path}", "draft", path)],
        rules=["match", "token", "block"],
        draft_samplings=["greedy", "sample"],
        temperatures=[0.8],
        gammas=[3],
        max_new_tokens=20,
        repeats=2,
        warmup=0,
    )
    prompts = [Prompt(f"p{i}", "code", "def f(x):" * (i + 1), False) for i in range(3)]
    res = harness.run_bench(cfg, target, _CharTokenizer(), prompts, drafts={path: draft}, progress=False)
    greedy = {}
    for r in res["rows"]:
        if r["kind"] == "draft" and r["draft_sampling"] == "greedy":
            greedy.setdefault((r["prompt_id"], r["repeat"]), set()).add(tuple(r["token_ids"]))
    assert len(greedy) == 6 and all(len(v) == 1 for v in greedy.values())
    entries = {e["label"]: e for e in acceptance_intervals(res)}
    assert len(entries) == 6
    for label, e in entries.items():
        lo, hi = e["tau"][1], e["tau"][2]
        assert lo <= e["tau"][0] <= hi and e["prompts"] == 3 and e["runs"] == 6
        assert e["vs_match"]["prompts"] == e["vs_engines"]["prompts"] == 3
        if e["draft_sampling"] == "greedy":
            assert e["vs_engines"]["d_tau"] == (0.0, 0.0, 0.0), label
    written = write_report(res, tmp_path / "o")
    md = (tmp_path / "o" / "report.md").read_text()
    assert "## Acceptance length with 95% intervals" in md and "[greedy]" in md
    assert any(p.name == "results.json" for p in written)
