"""Coupled verification of deterministic drafts, and the engines' exact-match rule.

For a draft X_1..X_K, draw the target's own token at every row by inverse CDF, one uniform per
row, and accept while the draft agrees:

    Y_t = F_t^{-1}(u_t)          F_t the CDF of p_t (`hierspec.sampling.categorical`)
    tau = #leading t <= K with X_t = Y_t,      next token = Y_{tau+1}

The emitted tokens are Y_1..Y_{tau+1}: draws of the target, so the rule is exact for any draft.
Its law for one draft:

    P(tau = k, Y = y) = prod_{t<=k} p_t(X_t) * p_{k+1}(y) * [y != X_{k+1}]     (k < K)
    P(tau = K, Y = y) = prod_{t<=K} p_t(X_t) * p_{K+1}(y)

For a deterministic draft (q one-hot) this is token-wise rejection sampling's law: X_t is kept
with probability min(1, p_t(X_t) / 1) and the residual (p_t - delta_{X_t})^+ is p_t off X_t. Block
and HSD verification have the same law for one-hot drafts (docs/exactness-rules.md: both are
exact, so tau <= the common prefix of the output and X, whose mean is the token rule's mean;
being optimal, their mean tau is no smaller, so tau equals that prefix almost surely). So every
exact rule verifies a deterministic draft with this sampler (`Rule(deterministic=...)`), and gains:
row t emits F_t^{-1}(u_t) whether or not position t was drafted. With uniforms keyed by position
(`hierspec.rng.Streams.uniforms`) a seeded text is the text plain sampling gives with that seed,
whatever the draft lengths (adaptive policy, scheduler load).

`rule` ("match") applies the sampler to ANY draft and ignores q: llama.cpp's and SGLang's
verification at temperature > 0 (`common_sampler_sample_and_accept_n`). It accepts position t
with probability sum_x q_t(x) p_t(x) where token-wise rejection accepts sum_x min(p_t, q_t).

Cost: one inverse-CDF draw per row actually reached (tau + 1 rows; a cumsum over V each).
"""

from __future__ import annotations

import torch

from ..sampling import categorical
from .core import Rule, VerifyOutput


def draw_uniforms(
    b: int, n: int, generator: torch.Generator | None, device: torch.device, uniforms: torch.Tensor | None
) -> torch.Tensor:
    """The [B, n] uniforms of the rows: ``uniforms`` if given (checked), else fresh float64 draws."""
    if uniforms is None:
        return torch.rand(b, n, generator=generator, device=device, dtype=torch.float64)
    if uniforms.shape != (b, n):
        raise ValueError(f"uniforms: expected shape [B, K+1] = {(b, n)}, got {tuple(uniforms.shape)}")
    return uniforms.to(device)


def verify(
    draft_tokens: torch.Tensor,
    draft_probs: torch.Tensor | None,
    target_probs: torch.Tensor,
    generator: torch.Generator | None = None,
    uniforms: torch.Tensor | None = None,
) -> VerifyOutput:
    """The coupled sampler for a batch (see module docstring); ``draft_probs`` is not read.

    uniforms [B, K+1]: the rows' uniforms (keyed by position in the engine), else drawn from
    ``generator``. Rows are sampled lazily: row t only while some sequence matched rows < t."""
    del draft_probs
    b, k = draft_tokens.shape
    dev = target_probs.device
    u = draw_uniforms(b, k + 1, generator, dev, uniforms)
    x = draft_tokens.long().to(dev)
    tau = torch.zeros(b, dtype=torch.long, device=dev)
    nxt = torch.zeros(b, dtype=torch.long, device=dev)
    done = torch.zeros(b, dtype=torch.bool, device=dev)
    for t in range(k + 1):
        y = categorical(target_probs[:, t], u[:, t])  # [B]
        hit = y == x[:, t] if t < k else torch.zeros_like(done)
        stop = ~done & ~hit
        nxt = torch.where(stop, y, nxt)
        tau = tau + (~done & hit).long()
        done = done | stop
        if t < k and bool(done.all()):
            break
    return VerifyOutput(num_accepted=tau, next_token=nxt)


def law(
    draft_tokens: torch.Tensor, draft_probs: torch.Tensor | None, target_probs: torch.Tensor
) -> torch.Tensor:
    """Exact L[k, y] = P(tau = k, Y = y) for one draft (see module docstring); q is not read."""
    del draft_probs
    k = draft_tokens.shape[0]
    p, x = target_probs, draft_tokens.long()
    out = torch.zeros_like(p)
    reach = torch.ones((), dtype=p.dtype, device=p.device)
    for t in range(k):
        row = p[t].clone()
        row[x[t]] = 0.0
        out[t] = reach * row
        reach = reach * p[t, x[t]]
    out[k] = reach * p[k]
    return out


rule = Rule("match", verify, law, uses_uniforms=True, doc=__doc__)
