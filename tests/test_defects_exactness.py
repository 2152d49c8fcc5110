"""Exactness defects of issue #27: greedy ties (chain, tree, engine), the inverse-CDF draw at the
edge of [0, 1), k = 0 block / HSD steps off the CPU, `Built` keeping its rule, and the stop-symbol
reduction behind block / HSD exactness under stopping-time drafts (docs/exactness-adaptive.md).

Each exactness check comes with a deliberately wrong variant (the old behaviour) that must fail
the same check, so the test has power."""

from __future__ import annotations

import pytest
import torch

from hierspec.drafters import Draft
from hierspec.engine import generate
from hierspec.methods import ModelSet, build_method
from hierspec.models import TinyGPT, TinyGPTConfig
from hierspec.models.tiny import make_tiny_pair
from hierspec.sampling import SamplingParams, categorical
from hierspec.verify import RULES
from hierspec.verify.core import VerifyOutput
from hierspec.verify.tree import verify_tree_greedy

GREEDY = SamplingParams(temperature=0)


# ------------------------------------------------------------------- item 4: greedy ties
def first_argmax(row: torch.Tensor) -> int:
    """Plain greedy decoding's choice: the lowest index attaining the maximum (pure Python)."""
    vals = row.tolist()
    return vals.index(max(vals))


def plain_greedy_outcome(x: list[int], scores: torch.Tensor) -> tuple[int, int]:
    """(tau, Y) that plain greedy decoding implies for draft x and score rows [K+1, V]."""
    tau = 0
    while tau < len(x) and x[tau] == first_argmax(scores[tau]):
        tau += 1
    return tau, first_argmax(scores[tau])


def max_match_verify(x, q, scores, generator=None, **_):
    """The old rule (negative control): accept a token that merely attains the row maximum."""
    k = x.shape[1]
    match = scores[:, :k].gather(-1, x.long()[..., None]).squeeze(-1) == scores[:, :k].amax(-1)
    tau = match.long().cumprod(-1).sum(-1)
    return VerifyOutput(tau, scores[torch.arange(x.shape[0]), tau].argmax(-1))


TIE = [[0.5, 2.0, -1.0, 2.0, 0.0], [0.0, 1.0, 3.0, 3.0, 3.0], [1.0, 1.0, 0.0, 0.0, 0.0]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_greedy_chain_rejects_a_tie_at_a_higher_index(dtype):
    """Row 0 ties at tokens 1 and 3: plain greedy takes 1, so a draft of 3 is rejected (Y = 1)."""
    scores = torch.tensor([TIE], dtype=dtype)
    for x, want in (([3, 2], (0, 1)), ([1, 2], (2, 0)), ([1, 4], (1, 2))):
        assert plain_greedy_outcome(x, scores[0]) == want
        out = RULES["greedy"](torch.tensor([x]), None, scores)
        assert (int(out.num_accepted), int(out.next_token)) == want, x
        law = RULES["greedy"].law(torch.tensor(x), None, scores[0])
        assert float(law[want[0], want[1]]) == 1.0 and float(law.sum()) == 1.0
    bad = max_match_verify(torch.tensor([[3, 2]]), None, scores)
    assert int(bad.num_accepted) != 0  # the old rule accepts the tie: the check has power


def test_greedy_chain_matches_plain_greedy_on_tie_heavy_batches():
    """Integer scores in {0, 1, 2} tie constantly; every row of a batch follows plain greedy."""
    g = torch.Generator().manual_seed(0)
    b, k, v = 64, 4, 5
    scores = torch.randint(0, 3, (b, k + 1, v), generator=g).float()
    x = torch.randint(0, v, (b, k), generator=g)
    x[: b // 2] = scores[: b // 2, :k].argmax(-1)  # half the rows: long accepted prefixes
    x[:8, 0] = 4 - scores[:8, 0].flip(-1).argmax(-1)  # the LAST index attaining the max
    ref = [plain_greedy_outcome(x[i].tolist(), scores[i]) for i in range(b)]
    for rule in (RULES["greedy"], max_match_verify):
        out = rule(x, None, scores)
        got = list(zip(out.num_accepted.tolist(), out.next_token.tolist(), strict=True))
        assert (got == ref) == (rule is RULES["greedy"])


def test_greedy_tree_rejects_a_tie_at_a_higher_index():
    """Root row ties at 1 and 3: the child with token 3 (first in index order) is not followed,
    the child with token 1 is; with only the child 3, nothing is accepted and Y = 1."""
    logits = torch.tensor([[0.5, 2.0, -1.0, 2.0], [4.0, 0.0, 0.0, 0.0], [0.0, 0.0, 5.0, 0.0]])
    both = verify_tree_greedy(torch.tensor([-1, 0, 0]), torch.tensor([0, 3, 1]), logits, validate=True)
    assert both.path == [2] and both.next_token == 2
    only = verify_tree_greedy(torch.tensor([-1, 0]), torch.tensor([0, 3]), logits[:2], validate=True)
    assert only.path == [] and only.next_token == 1


class TwinDrafter:
    """Proposes the plain greedy continuation with every `lo` replaced by its twin `hi`."""

    vocab_size = None

    def __init__(self, sequence: list[int], lo: int, hi: int) -> None:
        self.seq = [hi if t == lo else t for t in sequence]

    def propose(self, context, num_tokens, params, generator=None):
        n = context.shape[1]
        return Draft(torch.tensor([self.seq[n : n + num_tokens]], dtype=torch.long))

    def reset(self) -> None:
        pass


def twin_model(lo: int, hi: int) -> TinyGPT:
    """A TinyGPT whose lm_head rows lo and hi are equal (bitwise-equal logits)."""
    model = TinyGPT(TinyGPTConfig(vocab_size=16, seed=5, max_length=128), dtype=torch.float64)
    with torch.no_grad():
        model.lm_head.weight[hi] = model.lm_head.weight[lo]
    return model


def test_engine_greedy_with_identical_lm_head_rows(monkeypatch):
    lo, hi, n = 1, 2, 20
    model = twin_model(lo, hi)
    ties = changed = 0
    for seed in range(6):
        prompt = torch.randint(0, 16, (5,), generator=torch.Generator().manual_seed(seed)).tolist()
        seq = list(prompt)
        for _ in range(n):  # plain greedy decoding, one full forward per token
            model.reset()
            row = model.forward(torch.tensor([seq])).logits[0, -1]
            assert row[lo] == row[hi]  # bitwise: the premise of the test
            ties += int(row.argmax()) == lo
            seq.append(int(row.argmax()))
        model.reset()
        drafter = TwinDrafter(seq, lo, hi)
        out = generate(model, prompt, drafter=drafter, gamma=4, params=GREEDY, max_new_tokens=n)
        assert out.token_ids == seq[len(prompt) :], seed
        with monkeypatch.context() as m:  # negative control: the old rule accepts the twin
            m.setattr(RULES["greedy"], "_verify", max_match_verify)
            old = generate(model, prompt, drafter=drafter, gamma=4, params=GREEDY, max_new_tokens=n)
        changed += old.token_ids != seq[len(prompt) :]
    assert ties >= 3 and changed >= 3, (ties, changed)


# ------------------------------------------------------------------- item 5: categorical edges
def old_categorical(weights, uniform):
    """The old draw (negative control): u cast to the weights' dtype, clamped to V - 1."""
    csum = weights.cumsum(-1)
    idx = torch.searchsorted(csum, uniform.to(csum.dtype)[:, None] * csum[:, -1:], right=True)
    return idx.clamp_(max=weights.shape[-1] - 1).squeeze(-1)


EDGE_U = [
    torch.tensor([1 - 2**-53], dtype=torch.float64),
    torch.tensor([1 - 2**-25], dtype=torch.float64),  # rounds to 1.0 in float32
    torch.nextafter(torch.ones(1), torch.zeros(1)),  # float32, 1 - 2^-24
    torch.zeros(1, dtype=torch.float64),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_categorical_edge_uniforms_return_positive_weight(dtype):
    """q with zeros at the end: u at the top edge gives the last positive-weight token."""
    w = torch.tensor([[0.0, 0.25, 0.5, 0.25, 0.0, 0.0]], dtype=dtype)
    for u in EDGE_U:
        idx = int(categorical(w, u))
        assert float(w[0, idx]) > 0, (u, idx)
        assert idx == (1 if float(u) == 0 else 3)
    # fallback rows and batches keep the guarantee
    fb = torch.tensor([[0.0, 1.0, 1.0, 0.0, 0.0, 0.0]], dtype=dtype)
    assert int(categorical(torch.zeros_like(w), EDGE_U[0], fallback=fb)) == 2
    both = categorical(torch.cat([w, fb]), torch.cat([EDGE_U[1], EDGE_U[1]]))
    assert both.tolist() == [3, 2]


def test_categorical_old_draw_fails_the_edge_check():
    w = torch.tensor([[0.0, 0.25, 0.5, 0.25, 0.0, 0.0]])
    assert int(old_categorical(w, EDGE_U[0])) == 5  # q(5) = 0: the defect the test catches
    assert int(old_categorical(w.bfloat16(), EDGE_U[2])) == 5


def test_categorical_bfloat16_weights_are_summed_in_float32():
    """A bfloat16 cumsum saturates (1 + 2^-8 == 1); the draw must follow the float32 sum."""
    w = torch.full((1, 4096), 1.0 / 4096).bfloat16()
    u = torch.linspace(0, 1 - 2**-20, 257, dtype=torch.float64)
    ref = categorical(w.float().expand(257, -1), u)
    assert torch.equal(categorical(w.expand(257, -1), u), ref)
    assert not torch.equal(old_categorical(w.expand(257, -1), u), ref)


def test_model_drafter_edge_uniform_never_drafts_a_zero_probability_token(monkeypatch):
    """Every caller draws through `categorical`: a draft model with top-k rows (zeros inside and
    at the end of q) and u forced to 1 - 2^-53 drafts tokens with q > 0."""
    import hierspec.drafters.model as dm

    _, draft = make_tiny_pair(vocab_size=16, seed=2, dtype=torch.float32)
    edge = lambda n, g, dev: torch.full((n,), 1 - 2**-53, dtype=torch.float64)  # noqa: E731
    monkeypatch.setattr(dm, "uniforms", edge)
    params = SamplingParams(temperature=1.0, top_k=3)
    out = dm.ModelDrafter(draft).propose(torch.tensor([[1, 2, 3]]), 4, params)
    q = out.probs[0].gather(-1, out.tokens[0, :, None]).squeeze(-1)
    assert bool((q > 0).all()), out.tokens
    monkeypatch.setattr(dm, "categorical", lambda w, u: old_categorical(w, u))
    bad = dm.ModelDrafter(draft).propose(torch.tensor([[1, 2, 3]]), 4, params)
    assert not bool((bad.probs[0].gather(-1, bad.tokens[0, :, None]) > 0).all())


# ------------------------------------------------------------------- item 6: k = 0 off the CPU
@pytest.mark.parametrize("name", ["block", "hsd"])
def test_zero_length_step_stays_on_the_device(name, monkeypatch):
    """A k = 0 one-hot step of block / HSD (their own samplers, `dense_scan`) builds every tensor
    on the rows' device. On `meta` a CPU tensor mixed in raises; host reads (nonzero, the
    residual draw) are stubbed."""
    import torch.fx.experimental._config as fx_config

    from hierspec.verify import block, hsd, scan

    monkeypatch.setattr(scan, "categorical", lambda w, u, fallback=None: w.argmax(-1))
    b, v = 3, 7
    x = torch.zeros(b, 0, dtype=torch.long, device="meta")
    p = torch.empty(b, 1, v, device="meta")
    eta, h, full = (torch.empty(*shape, device="meta") for shape in ((b, 1), (b, 0), (b,)))
    with fx_config.patch(meta_nonzero_assume_all_nonzero=True):
        out = {"block": block, "hsd": hsd}[name].verify(x, None, p, None)
        tau, rows, _ = scan.dense_scan(eta, h, full)
    assert out.num_accepted.device.type == "meta" and out.next_token.device.type == "meta"
    assert tau.device.type == rows.device.type == "meta"


# ------------------------------------------------------------------- item 8: Built keeps its rule
@pytest.fixture
def pair(tmp_path):
    target, draft = make_tiny_pair(vocab_size=32, seed=3, dtype=torch.float64, max_length=256)
    return ModelSet(target, drafts={str(tmp_path): draft}), str(tmp_path)


def test_built_generate_verifies_with_the_rule_it_was_built_with(pair, monkeypatch):
    import hierspec.methods.registry as registry

    models, path = pair
    seen = []
    real = registry.generate
    monkeypatch.setattr(registry, "generate", lambda *a, **kw: seen.append(kw["rule"]) or real(*a, **kw))
    kw = dict(params=SamplingParams(temperature=1.0), max_new_tokens=12, seed=4)
    for rule in ("token", "block", "hsd"):
        built = build_method(f"draft:{path}", models, rule=rule, gamma=3)
        assert built.rule == rule
        a = built.generate([1, 2, 3], **kw).token_ids
        assert built.generate([1, 2, 3], rule=rule, **kw).token_ids == a  # the same rule: fine
        ref = real(models.target, [1, 2, 3], drafter=built.drafter, gamma=3, rule=rule, **kw)
        assert a == ref.token_ids
        other = "token" if rule != "token" else "block"
        with pytest.raises(ValueError, match=rf"^rule: .*{rule!r}.*{other!r}"):
            built.generate([1, 2, 3], rule=other, **kw)
    assert seen[:2] == ["token", "token"] and seen[-2:] == ["hsd", "hsd"]


# ------------------------------------------------------------------- item 9: the stop symbol
def _rows(g: torch.Generator, n: int, v: int, zero_last: bool = False) -> torch.Tensor:
    r = torch.rand(n, v, generator=g, dtype=torch.float64) ** 3
    if zero_last:
        r[:, -1] = 0
    return r / r.sum(-1, keepdim=True)


@pytest.mark.parametrize("name", ["block", "hsd"])
def test_stop_symbol_reduction_block_law(name):
    """docs/exactness-adaptive.md: a k-token draft verified as (X_1..X_k, ⊥, ..., ⊥) over V + 1
    symbols (q = δ_⊥ from position k + 1 on, p(⊥) = 0) has exactly the law of the k-token draft;
    folding a fractional stop into q (q~ = (1 - s) q + s δ_⊥) does not (negative control)."""
    law = RULES[name].law
    g = torch.Generator().manual_seed(1)
    v, kmax, worst = 4, 4, 0.0
    for trial in range(30):
        k = trial % kmax
        p = _rows(g, kmax + 1, v)
        q = _rows(g, kmax, v)
        x = torch.multinomial(q, 1, generator=g)[:, 0]
        short = law(x[:k], q[:k], p[: k + 1])  # [k+1, V]
        stop = v  # ⊥
        p_ext = torch.cat([p, torch.zeros(kmax + 1, 1, dtype=p.dtype)], -1)
        p_ext[k + 1 :] = 0
        p_ext[k + 1 :, stop] = 1  # after ⊥ anything works; ⊥ forever
        q_ext = torch.cat([q, torch.zeros(kmax, 1, dtype=q.dtype)], -1)
        q_ext[k:] = 0
        q_ext[k:, stop] = 1
        x_ext = torch.cat([x[:k], torch.full((kmax - k,), stop)])
        ext = law(x_ext, q_ext, p_ext)  # [kmax+1, V+1]
        assert float(ext[k + 1 :].abs().sum()) < 1e-12 and float(ext[:, stop].abs().sum()) < 1e-12
        assert torch.allclose(ext[: k + 1, :v], short, atol=1e-12, rtol=0), trial
        # negative control: the stop folded into q with s = 0.3 at every position
        s = 0.3
        q_fold = torch.cat([(1 - s) * q, torch.full((kmax, 1), s, dtype=q.dtype)], -1)
        q_fold[k + 1 :] = 0
        q_fold[k + 1 :, stop] = 1
        worst = max(worst, float((law(x_ext, q_fold, p_ext)[: k + 1, :v] - short).abs().max()))
    assert worst > 0.05
