"""HiSpec and early-exit self-speculation over a `LayerStack`: every range equals a fresh prefill
of the tokens it holds (after random view operations and after every generation step), greedy
identity with plain decoding, chi² exactness at T > 0, the q_d-in-stage-2 negative control, bad
input."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from factories import tiny_hf  # noqa: E402
from hierspec.drafters import ModelDrafter  # noqa: E402
from hierspec.hierarchy import SpeculativeDrafter  # noqa: E402
from hierspec.hispec import SelfSpeculator, build_early_exit_spec, build_hispec  # noqa: E402
from hierspec.models import HFModel  # noqa: E402
from hierspec.models.early_exit import build_early_exit  # noqa: E402
from hierspec.models.layered import ExitView, LayerStack, exit_views  # noqa: E402
from hierspec.sampling import SamplingParams  # noqa: E402
from hierspec.step import StepResult  # noqa: E402
from test_engine import chi2_p, exact_joint, plain_greedy  # noqa: E402

GREEDY = SamplingParams(temperature=0)
N = 1500


def tiny_llama(vocab=5, seed=3, scale=8.0, layers=4, hidden=16):
    """A float64 Llama with an untied, scaled LM head (peaked, context-dependent rows)."""
    hf = tiny_hf(
        seed=seed,
        dtype=torch.float64,
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        rope_theta=1e4,
        tie_word_embeddings=False,
    )
    with torch.no_grad():
        hf.lm_head.weight.mul_(scale)
    return hf


def head(hf, exit_layer, scale=1.0):
    """An untrained reduced head over the whole vocabulary, its rows scaled (sharper or flatter)."""
    h = build_early_exit(hf, exit_layer, vocab_map=torch.arange(hf.config.vocab_size)).head
    with torch.no_grad():
        h.lm_head.weight.mul_(scale)
    return h


def fresh(hf, tokens):
    """Fresh prefill of `tokens`: (cache, hidden_states tuple, logits)."""
    with torch.no_grad():
        out = hf(input_ids=torch.tensor([tokens]), use_cache=True, output_hidden_states=True)
    return out.past_key_values, out.hidden_states, out.logits[0]


def check_stack(hf, stack: LayerStack):
    """Every range's KV and buffered hidden states equal a fresh prefill of the tokens it holds."""
    for j, (a, b) in enumerate(stack.bounds):
        toks = stack.tokens(j)
        for i in range(a, b):
            assert stack.layer_length(i) == len(toks), (j, i)
        if not toks:
            continue
        cache, hs, _ = fresh(hf, toks)
        for i in range(a, b):
            mine, ref = stack.cache.layers[i], cache.layers[i]
            torch.testing.assert_close(mine.keys, ref.keys, atol=1e-10, rtol=0)
            torch.testing.assert_close(mine.values, ref.values, atol=1e-10, rtol=0)
        if b < stack.num_layers:  # hidden_states[L] is after the final norm in transformers
            torch.testing.assert_close(stack._hidden[j][: len(toks)], hs[b][0], atol=1e-10, rtol=0)


def test_views_match_fresh_prefill_under_random_operations():
    hf = tiny_llama(vocab=7, seed=5)
    heads = [head(hf, 1), head(hf, 2, 2.0)]
    views = exit_views(hf, heads)
    rng = np.random.default_rng(0)
    base = rng.integers(0, 7, size=40).tolist()
    for _ in range(60):
        v = views[int(rng.integers(0, 3))]
        if rng.random() < 0.3 and v.cache_length:
            v.crop(int(rng.integers(0, v.cache_length + 1)))
        else:
            n = int(rng.integers(1, 4))
            start = v.cache_length
            if start + n > 40:
                v.reset()
                continue
            new = list(base[start : start + n])
            if rng.random() < 0.3:  # a token the other views have not seen
                new[-1] = int((new[-1] + 1) % 7)
                base[start + n - 1] = new[-1]
            seq = v._seq.tolist() + new
            logits = v.forward(torch.tensor([new])).logits[0]
            _, hs, full = fresh(hf, seq)
            if v.head is None:
                ref = full[start:]
            else:
                from hierspec.models.early_exit import exit_logits

                ref = exit_logits(v.head, hs[v.exit_layer][0, start:], hf.get_output_embeddings().weight)
            torch.testing.assert_close(logits, ref, atol=1e-10, rtol=0)
        check_stack(hf, views[0].stack)


def test_ranges_hold_committed_tokens_after_every_cycle():
    hf = tiny_llama(vocab=7, seed=6)
    system = build_hispec(hf, head(hf, 1, 0.5), head(hf, 2), nd=2, ni=3, rule="block")
    prompt = [1, 4, 2, 6]
    context = list(prompt)
    calls = []

    def on_tokens(step):
        context.extend(step)
        stack = system.stack
        for j in range(len(stack.bounds)):
            assert stack.tokens(j) == context[:-1], (j, stack.tokens(j), context)
        check_stack(hf, stack)
        calls.append(len(step))

    out = system.generate(
        prompt, params=SamplingParams(temperature=1.0), max_new_tokens=24, seed=3, on_tokens=on_tokens
    )
    assert len(out.token_ids) == 24 and sum(calls) == 24
    st = system.stage_stats(out)
    assert st["full_passes"] == len(calls)
    # the intermediate range never runs a token twice within a generation beyond re-drafts
    assert st["ranges"][2]["tokens"] <= st["ranges"][1]["tokens"] + len(prompt)


@pytest.mark.parametrize("nd,ni,rule", [(1, 1, "token"), (2, 4, "block"), (3, 2, "hsd"), (4, 8, "token")])
def test_hispec_greedy_identity(nd, ni, rule):
    hf = tiny_llama(vocab=11, seed=7, scale=3.0, layers=6)
    prompt = [3, 1, 4, 1, 5]
    ref = plain_greedy(HFModel(hf), prompt, 30)
    system = build_hispec(hf, head(hf, 1), head(hf, 3), nd=nd, ni=ni, rule=rule)
    out = system.generate(prompt, params=GREEDY, max_new_tokens=30)
    assert out.token_ids == ref
    st = system.stage_stats(out)
    assert 0 < st["intermediate_passes"] and st["full_passes"] <= 30
    ee = build_early_exit_spec(hf, head(hf, 2), gamma=3)
    assert ee.generate(prompt, params=GREEDY, max_new_tokens=30).token_ids == ref


def sample(system: SelfSpeculator, prompt, n_tok, params, rule, n, seed):
    """Counts of n generations; ``rule`` is the full model's (stage 2) rule: a system built with
    another one gets it through the low-level constructor (`dataclasses.replace`), since the
    public builders set one rule for both stages."""
    v = system.target.vocab_size
    counts = np.zeros((v,) * n_tok)
    system = dataclasses.replace(system, rule=rule)
    for i in range(n):
        out = system.generate(prompt, params=params, max_new_tokens=n_tok, seed=seed * 100_000 + i)
        counts[tuple(out.token_ids)] += 1
    return counts


@pytest.fixture(scope="module")
def chi_model():
    return tiny_llama(vocab=5, seed=3, scale=8.0)


@pytest.mark.parametrize(
    "params,rule1,rule2,nd,ni",
    [
        (SamplingParams(temperature=1.0), "token", "block", 2, 3),
        (SamplingParams(temperature=0.7, top_p=0.9), "block", "token", 1, 2),
    ],
)
def test_hispec_exact_chi2(chi_model, params, rule1, rule2, nd, ni):
    hf = chi_model
    prompt = [1, 3, 0, 2]
    joint = exact_joint(HFModel(hf), prompt, 3, params)
    system = build_hispec(hf, head(hf, 1, 0.1), head(hf, 2, 4.0), nd=nd, ni=ni, rule=rule1)
    counts = sample(system, prompt, 3, params, rule2, N, seed=1)
    assert chi2_p(counts, joint) > 1e-3


def test_early_exit_spec_exact_chi2(chi_model):
    hf = chi_model
    prompt = [1, 3, 0, 2]
    params = SamplingParams(temperature=1.0)
    joint = exact_joint(HFModel(hf), prompt, 3, params)
    system = build_early_exit_spec(hf, head(hf, 1, 0.1), gamma=2)
    assert chi2_p(sample(system, prompt, 3, params, "token", N, seed=2), joint) > 1e-3


class DraftQLevel(SpeculativeDrafter):
    """Negative control: hands up the draft's q_d rows for the draft tokens the intermediate
    verifier accepted (the stage-2 trap), instead of the intermediate distribution p_i."""

    def _step(self, local, k_max, params, generator):
        captured = {}
        orig = self.inner.propose

        def spy(context, num_tokens, p, g=None):
            captured["draft"] = d = orig(context, num_tokens, p, g)
            return d

        self.inner.propose = spy
        try:
            res = super()._step(local, k_max, params, generator)
        finally:
            self.inner.propose = orig
        d = captured.get("draft")
        tau = len(res.tokens) - 1
        if d is not None and tau > 0 and res.rows is not None:
            rows = res.rows.clone()
            rows[:tau] = d.probs[0, :tau].to(rows.dtype)
            res = StepResult(res.tokens, rows, res.drafted, res.accepted)
        return res


def test_draft_q_in_stage_two_is_detected(chi_model):
    hf = chi_model
    prompt = [1, 3, 0, 2]
    params = SamplingParams(temperature=1.0)
    joint = exact_joint(HFModel(hf), prompt, 3, params)
    vd, vi, vf = exit_views(hf, [head(hf, 1, 0.1), head(hf, 2, 4.0)])
    level = DraftQLevel(vi, ModelDrafter(vd), rule="token", gamma=2)
    bad = SelfSpeculator("hispec", vf.stack, vf, level, 3, level)
    assert chi2_p(sample(bad, prompt, 3, params, "token", N, seed=1), joint) < 1e-3


def test_bad_input():
    hf = tiny_llama(vocab=7, seed=5)
    with pytest.raises(ValueError, match="nd"):
        build_hispec(hf, head(hf, 1), head(hf, 2), nd=0)
    with pytest.raises(ValueError, match="ni"):
        build_hispec(hf, head(hf, 1), head(hf, 2), ni=0)
    with pytest.raises(ValueError, match="draft exit"):
        build_hispec(hf, head(hf, 2), head(hf, 1))
    with pytest.raises(ValueError, match="draft exit"):
        build_hispec(hf, head(hf, 2), head(hf, 2))
    with pytest.raises(ValueError, match="exits"):
        LayerStack(hf, [3, 1])
    with pytest.raises(ValueError, match="exits"):
        LayerStack(hf, [0])
    with pytest.raises(ValueError, match="gamma"):
        build_early_exit_spec(hf, head(hf, 1), gamma=0)
    # one rule per system, set at build time for both HiSpec stages; generate takes no other
    system = build_hispec(hf, head(hf, 1), head(hf, 2), rule="block")
    assert system.rule == "block" and system.level.rule.name == "block"
    with pytest.raises(ValueError, match=r"rule: this hispec system verifies with 'block'.*build_hispec"):
        system.generate([1, 2], rule="token", max_new_tokens=2)
    assert len(system.generate([1, 2], rule="block", max_new_tokens=2).token_ids) == 2
    with pytest.raises(ValueError, match="unknown verification rule"):
        build_hispec(hf, head(hf, 1), head(hf, 2), rule="blockwise")
    ee = build_early_exit_spec(hf, head(hf, 1), rule="hsd")
    with pytest.raises(ValueError, match="build_early_exit_spec"):
        ee.generate([1, 2], rule="token", max_new_tokens=2)
    with pytest.raises(ValueError, match="unknown verification rule"):
        build_early_exit_spec(hf, head(hf, 1), rule="x")
    other = tiny_llama(vocab=7, seed=5, layers=6)
    with pytest.raises(ValueError, match=r"6-layer"):
        build_hispec(hf, head(other, 1), head(other, 2))
    stack = LayerStack(hf, [1, 2])
    with pytest.raises(ValueError, match="exit layer"):
        ExitView(stack, 0, head(hf, 2))
    with pytest.raises(ValueError, match="input_ids"):
        ExitView(stack, 2).forward(torch.tensor([[99]]))
