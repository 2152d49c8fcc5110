"""EAGLE: the head's unrolled training computation equals cached drafting, chains and trees are
token-identical to plain greedy decoding and exact at T > 0 (chi², every chain rule and trees),
a tree verified as if its top-k children were sampled fails (negative control), the training
loss / evaluator run, and bad input is refused (another target's head, tree budgets)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from hierspec.drafters.eagle import EagleDrafter, TreeSpec  # noqa: E402
from hierspec.engine import generate  # noqa: E402
from hierspec.models import HFModel  # noqa: E402
from hierspec.models.draft import DraftFileError  # noqa: E402
from hierspec.models.eagle import build_eagle_head, load_eagle, save_eagle  # noqa: E402
from hierspec.sampling import SamplingParams  # noqa: E402
from hierspec.verify import tree as vtree  # noqa: E402
from test_engine import chi2_p, exact_joint, plain_greedy  # noqa: E402
from test_hispec import tiny_llama  # noqa: E402

GREEDY = SamplingParams(temperature=0)
N = 1500


def eagle_head(hf, scale=1.0, seed=0):
    head = build_eagle_head(hf, torch.arange(hf.config.vocab_size), seed=seed).to(hf.dtype)
    with torch.no_grad():
        head.lm_head.weight.mul_(scale)
        for p in head.block.parameters():  # a random head far from identity: real drafts
            p.add_(torch.randn_like(p) * 0.3)
    return head


@pytest.fixture(scope="module")
def chi_model():
    return tiny_llama(vocab=5, seed=3, scale=8.0)


@pytest.fixture(scope="module")
def big_model():
    return tiny_llama(vocab=11, seed=7, scale=4.0, layers=3, hidden=16)


def test_unroll_equals_cached_chain_drafting(big_model):
    """Step j of `unroll` at column i == the head's cached chain after true pairs 0..i, fed the
    true tokens: what drafting computes (float64)."""
    hf = big_model
    head = eagle_head(hf)
    ids = torch.randint(0, 11, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        feats = hf.model(input_ids=ids).last_hidden_state
        outs = head.unroll(feats, ids, 3)
    for i in (0, 3, 7):
        head.reset()
        f = head.step(feats[:, : i + 1], ids[:, 1 : i + 2], torch.arange(i + 1))[:, -1]
        torch.testing.assert_close(f[0], outs[0][0, i], atol=1e-10, rtol=0)
        for j in (2, 3):
            pos = torch.tensor([i + j - 1])
            f = head.step(f[:, None], ids[:, i + j : i + j + 1], pos)[:, -1]
            torch.testing.assert_close(f[0], outs[j - 1][0, i], atol=1e-10, rtol=0)


@pytest.mark.parametrize(
    "tree", [None, TreeSpec(depth=3, topk=2, budget=5), TreeSpec(depth=4, topk=3, budget=12)]
)
def test_greedy_identity(big_model, tree):
    hf = big_model
    target = HFModel(hf)
    drafter = EagleDrafter(eagle_head(hf, scale=3.0))
    for prompt in ([1, 5, 7, 5, 7], [3], [2, 2, 9, 4, 1, 0, 6, 6, 6]):
        ref = plain_greedy(target, prompt, 30)
        out = generate(target, prompt, drafter=drafter, gamma=4, params=GREEDY, max_new_tokens=30, tree=tree)
        assert out.token_ids == ref
        assert out.stats.num_draft_tokens > 0


def sample(hf, drafter, prompt, params, rule, n, seed, tree=None, n_tok=3):
    counts = np.zeros((hf.config.vocab_size,) * n_tok)
    target = HFModel(hf)
    for i in range(n):
        out = generate(
            target,
            prompt,
            drafter=drafter,
            rule=rule,
            gamma=2,
            params=params,
            max_new_tokens=n_tok,
            seed=seed * 100_000 + i,
            tree=tree,
        )
        counts[tuple(out.token_ids)] += 1
    return counts


@pytest.mark.parametrize(
    "rule,params",
    [
        ("token", SamplingParams(temperature=1.0)),
        ("block", SamplingParams(temperature=0.7, top_p=0.9)),
        ("hsd", SamplingParams(temperature=1.0, top_k=4)),
    ],
)
def test_chain_exact_chi2(chi_model, rule, params):
    hf = chi_model
    prompt = [1, 3, 0, 2]
    joint = exact_joint(HFModel(hf), prompt, 3, params)
    drafter = EagleDrafter(eagle_head(hf, scale=4.0, seed=1))
    assert chi2_p(sample(hf, drafter, prompt, params, rule, N, seed=1), joint) > 1e-3


@pytest.mark.parametrize(
    "params", [SamplingParams(temperature=1.0), SamplingParams(temperature=0.7, top_p=0.9)]
)
def test_tree_exact_chi2(chi_model, params):
    hf = chi_model
    prompt = [1, 3, 0, 2]
    joint = exact_joint(HFModel(hf), prompt, 3, params)
    drafter = EagleDrafter(eagle_head(hf, scale=4.0, seed=2))
    tree = TreeSpec(depth=2, topk=2, budget=5)
    assert chi2_p(sample(hf, drafter, prompt, params, "token", N, seed=3, tree=tree), joint) > 1e-3


def test_tree_verified_as_sampled_is_detected(chi_model, monkeypatch):
    """Negative control: verify the deterministic top-k tree as if its children had been sampled
    i.i.d. from the draft rows (multi-step speculative sampling with q): lossy."""
    hf = chi_model
    prompt = [1, 3, 0, 2]
    params = SamplingParams(temperature=1.0)
    joint = exact_joint(HFModel(hf), prompt, 3, params)
    drafter = EagleDrafter(eagle_head(hf, scale=4.0, seed=2))
    import hierspec.step as step_mod

    def as_sampled(parents, tokens, rows, q, *, mode, generator, validate=False):
        with torch.no_grad():
            q = torch.softmax(drafter.head.logits(torch.zeros(1, hf.config.hidden_size, dtype=hf.dtype)), -1)
        flat = torch.full_like(rows, 1.0 / rows.shape[-1])
        q_rows = (0.5 * flat + 0.5 * q.to(rows)).expand_as(rows).contiguous()
        return vtree.verify_tree(parents, tokens, rows, q_rows, mode="iid", generator=generator)

    monkeypatch.setattr(step_mod, "verify_tree", as_sampled)
    tree = TreeSpec(depth=2, topk=2, budget=5)
    assert chi2_p(sample(hf, drafter, prompt, params, "token", N, seed=3, tree=tree), joint) < 1e-3


def test_save_load_and_refusals(big_model, chi_model, tmp_path):
    hf = big_model
    head = eagle_head(hf)
    path = tmp_path / "eagle.safetensors"
    save_eagle(head, path, hf, dtype=torch.float16)
    loaded = load_eagle(path, hf, dtype=torch.float64)
    torch.testing.assert_close(loaded.fc.weight, head.fc.weight.half().double())
    other = tiny_llama(vocab=11, seed=8, scale=4.0, layers=3, hidden=32)  # another hidden size
    with pytest.raises(DraftFileError, match="hidden_size"):
        load_eagle(path, other)
    with pytest.raises(DraftFileError, match="vocabulary"):
        load_eagle(path, chi_model)
    same_shape = tiny_llama(vocab=11, seed=9, scale=4.0, layers=3, hidden=16)  # other weights
    with pytest.raises(DraftFileError, match="another target"):
        load_eagle(path, same_shape)


def test_tree_bad_input(big_model):
    hf = big_model
    target = HFModel(hf)
    drafter = EagleDrafter(eagle_head(hf))
    with pytest.raises(ValueError, match="budget"):
        TreeSpec(depth=3, topk=2, budget=0)
    with pytest.raises(ValueError, match="depth"):
        TreeSpec(depth=0)
    with pytest.raises(ValueError, match="tree budget"):
        generate(target, list(range(10)) * 6, drafter=drafter, params=GREEDY, tree=TreeSpec(budget=8))
    with pytest.raises(ValueError, match="propose_tree"):
        generate(target, [1, 2], drafter=None, params=GREEDY, tree=TreeSpec())


class RawQEagle(EagleDrafter):
    """Negative control: samples from the processed rows q but reports a flatter row (q^0.3,
    renormalised) as the proposal: verification then corrects against the wrong q."""

    def propose(self, context, num_tokens, params, generator=None):
        draft = super().propose(context, num_tokens, params, generator)
        if draft.probs is not None:
            raw = torch.softmax(torch.log(draft.probs.clamp_min(1e-30)) * 0.3, -1)
            draft.probs = raw
        return draft


def test_chain_wrong_q_is_detected(chi_model):
    hf = chi_model
    prompt = [1, 3, 0, 2]
    params = SamplingParams(temperature=0.5)
    joint = exact_joint(HFModel(hf), prompt, 3, params)
    drafter = RawQEagle(eagle_head(hf, scale=4.0, seed=1))
    assert chi2_p(sample(hf, drafter, prompt, params, "token", N, seed=1), joint) < 1e-3
