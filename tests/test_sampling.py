"""Logit processing and the categorical sampler."""

from __future__ import annotations

import pytest
import torch
from scipy.stats import chisquare

from hierspec.sampling import SamplingParams, categorical, make_generators, process_logits


def reference_top_p(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Full-sort nucleus: keep tokens with prob >= the prob of the token that reaches top_p."""
    out = torch.empty_like(probs)
    for i, row in enumerate(probs):
        s, _ = row.sort(descending=True)
        cut = s[int((s.cumsum(0) >= top_p).nonzero()[0])]
        out[i] = torch.where(row >= cut, row, 0.0)
    return out / out.sum(-1, keepdim=True)


@pytest.mark.parametrize("top_p", [0.1, 0.5, 0.9, 0.999])
def test_top_p_matches_full_sort(top_p):
    g = torch.Generator().manual_seed(0)
    # Peaked rows (cut inside the first 256 candidates) and flat rows (full-sort fallback).
    logits = torch.cat([torch.randn(4, 3000, generator=g) * 4, torch.randn(4, 3000, generator=g) * 0.01])
    probs = process_logits(logits, SamplingParams(temperature=1.0, top_p=top_p))
    ref = reference_top_p(torch.softmax(logits, -1), top_p)
    assert torch.allclose(probs, ref, atol=1e-6)
    assert torch.allclose(probs.sum(-1), torch.ones(8), atol=1e-5)


def test_temperature_top_k_min_p_greedy():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, 3.0]], dtype=torch.float64)
    p = process_logits(logits, SamplingParams(temperature=0.5))
    assert torch.allclose(p, torch.softmax(logits / 0.5, -1))
    p = process_logits(logits, SamplingParams(temperature=1.0, top_k=2))
    assert (p[0, [1, 2, 3]] == 0).all() and torch.allclose(p.sum(), torch.tensor(1.0, dtype=torch.float64))
    p = process_logits(logits, SamplingParams(temperature=1.0, min_p=0.3))
    full = torch.softmax(logits, -1)
    keep = full >= 0.3 * full.max()
    assert torch.equal(p > 0, keep)
    p = process_logits(logits, SamplingParams(temperature=0))
    assert p.tolist() == [[0, 0, 0, 0, 1.0]]
    assert p.dtype == torch.float64
    assert process_logits(logits.bfloat16(), SamplingParams()).dtype == torch.float32


def test_nan_and_inf_logits_rejected():
    for bad in (float("nan"), float("inf")):
        logits = torch.zeros(2, 5)
        logits[1, 3] = bad
        for t in (0.0, 1.0):
            with pytest.raises(ValueError, match="NaN or \\+inf"):
                process_logits(logits, SamplingParams(temperature=t))


def test_categorical_distribution_and_support():
    w = torch.tensor([0.0, 3.0, 0.0, 1.0, 6.0, 0.0], dtype=torch.float64)
    n = 100_000
    u = torch.rand(n, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    idx = categorical(w.expand(n, -1), u)
    counts = torch.bincount(idx, minlength=6).double()
    assert counts[w == 0].sum() == 0
    assert chisquare(counts[w > 0].numpy(), (w[w > 0] / w.sum() * n).numpy()).pvalue > 1e-3
    # u at the extremes never returns a zero-weight token.
    edge = categorical(w.expand(2, -1), torch.tensor([0.0, 1.0 - 1e-16], dtype=torch.float64))
    assert edge.tolist() == [1, 4]


def test_categorical_fallback_for_empty_rows():
    w = torch.zeros(2, 4)
    w[0, 2] = 1.0
    fb = torch.tensor([[0.0, 0.0, 0.0, 1.0], [0.0, 1.0, 0.0, 0.0]])
    assert categorical(w, torch.tensor([0.5, 0.5]), fallback=fb).tolist() == [2, 1]


def test_params_validation_and_generators():
    for kw, msg in [
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_k": -1}, "top_k"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.01}, "top_p"),
        ({"min_p": -0.5}, "min_p"),
        ({"min_p": 2}, "min_p"),
    ]:
        with pytest.raises(ValueError, match=msg):
            SamplingParams(**kw)
    a1, b1 = make_generators(5)
    a2, _b2 = make_generators(5)
    assert torch.equal(torch.rand(3, generator=a1), torch.rand(3, generator=a2))
    assert not torch.equal(torch.rand(3, generator=b1), torch.rand(3, generator=a1))
