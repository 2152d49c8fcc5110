"""Hierarchical speculative sampling (HSD; Zhou et al., arXiv 2601.05724), capped and consistent.

HSD treats the K-token draft as one super-token and walks *backwards* over its prefix levels,
balancing, at each level k, the excess and deficient mass of the accessible branch
{(X_{1:k}, x) : x in V} — both models score these sequences in the one forward pass.

Prefix joints P_k = prod_{t<=k} p_t(X_t), Q_k = prod_{t<=k} q_t(X_t), R_k = P_k / Q_k. The capped
variant caps every prefix's target mass by the running maximum ratio M_k = max(1, R_0..R_k):
P~_k = P_k / M_k <= Q_k. For the branch at level k (k < K):

    E_k = sum_x [P~_k p_{k+1}(x) - Q_k q_{k+1}(x)]^+          (excess)
    F_k = sum_x [Q_k q_{k+1}(x) - P~_k p_{k+1}(x)]^+          (deficit)
    a_k = E_k / max(E_k, F_k)        stop at level k with this probability, and then
    Y  ~ [P~_k p_{k+1} - Q_k q_{k+1}]^+ / E_k                 (the branch residual)

and the full draft is accepted with min(1, r*), r* = R_K / max(1, R_0, .., R_{K-1}) — the *capped*
ratio. (The public HSD code uses the uncapped min(1, R_K) here, which is lossy: on Sun et al.'s
toy case it emits "ba" with probability 1/3 instead of 2/9. That variant lives only in the tests,
as a negative control.)

Everything is computed in ratio space: all branch masses are divided by Q_k, so only
c_k = P~_k / Q_k = exp(log P_k - log M_k - log Q_k) in [0, 1] is formed, never a joint
probability — long drafts cannot underflow to 0/0.

Capped HSD with the capped full acceptance is, in exact arithmetic, block verification (Sun et al.,
ICLR 2025; `hierspec.verify.block`): E_k/Q_k = S_k, F_k/Q_k = S_k + 1 - c_k and c_k = w_k, with S_k
and w_k as defined there. This module keeps
the paper's branch-mass form as an independent implementation; the tests check that its law
equals block's to 1e-12. Since a_k = E/F <= c_k, it uses the same lazy backward scan.
"""

from __future__ import annotations

import torch

from . import coupled
from .core import Rule, VerifyOutput, dense_draft_probs, token_probs
from .scan import backward_scan, dense_scan, emit, gather_rows, onehot_residual, scan_law


def _prefix_terms(p_tok: torch.Tensor, q_tok: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(c [..., K+1] capped branch ratio P~_k/Q_k per level, full-acceptance prob [...])."""
    zero = p_tok.new_zeros((*p_tok.shape[:-1], 1))
    log_p = torch.cat([zero, torch.cumsum(torch.log(p_tok), -1)], -1)  # log P_k
    log_q = torch.cat([zero, torch.cumsum(torch.log(q_tok), -1)], -1)  # log Q_k
    log_ratio = log_p - log_q  # log R_k (-inf once some p = 0)
    log_cap = torch.cummax(log_ratio.clamp(min=0), -1).values  # log M_k, includes R_k
    c = torch.exp(log_p - log_cap - log_q)
    k = p_tok.shape[-1]
    # r* = R_K / max(1, R_0..R_{K-1}); log M_{K-1} is that max (M_{-1} := 1 when K = 0).
    prev_cap = log_cap[..., k - 1] if k > 0 else torch.zeros_like(log_ratio[..., 0])
    full = torch.exp(log_ratio[..., k] - prev_cap).clamp(max=1)
    return c, full


def _stop(e: torch.Tensor, f: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Level stop probability a = E / max(E, F) (1 where both are 0), clamped to <= c."""
    den = torch.maximum(e, f)
    a = torch.where(den > 0, e / torch.where(den > 0, den, 1), torch.ones_like(e))
    return torch.minimum(a, c)


def _branch(c: torch.Tensor, p_next: torch.Tensor, q_next: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(stop probability, branch residual [c p - q]^+) of levels with capped ratio c [...] and
    rows p_next, q_next [..., V], all per unit Q_k."""
    d = c[..., None] * p_next - q_next
    excess = d.clamp(min=0)
    return _stop(excess.sum(-1), (-d).clamp(min=0).sum(-1), c), excess


def verify(
    draft_tokens: torch.Tensor,
    draft_probs: torch.Tensor | None,
    target_probs: torch.Tensor,
    generator: torch.Generator | None = None,
) -> VerifyOutput:
    """Capped HSD for a batch (see module docstring)."""
    b, k = draft_tokens.shape
    dev = target_probs.device
    u = torch.rand(b, k + 2, generator=generator, device=dev, dtype=target_probs.dtype)
    p_tok, q_tok = token_probs(draft_tokens, draft_probs, target_probs)
    c, full = _prefix_terms(p_tok, q_tok)
    eta, u_y = u[:, : k + 1], u[:, k + 1]
    if draft_probs is None:
        # One-hot q: E_k = c(1 - p(x)) + [c p(x) - 1]^+ and F_k = [1 - c p(x)]^+ per unit Q_k.
        ck = c[:, :k]
        e = ck * (1 - p_tok) + (ck * p_tok - 1).clamp(min=0)
        f = (1 - ck * p_tok).clamp(min=0)
        tau, rows, lv = dense_scan(eta, _stop(e, f, ck), full)
        resid = onehot_residual(target_probs, draft_tokens, rows, lv, c[rows, lv])
        return VerifyOutput(tau, emit(target_probs, tau, rows, resid, u_y))

    def level_fn(rows: torch.Tensor, lv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cl = c[rows].gather(1, lv)
        d = gather_rows(target_probs, rows, lv).mul_(cl[..., None])
        d = d.sub_(gather_rows(draft_probs, rows, lv))
        e = d.clamp(min=0)
        return _stop(e.sum(-1), d.neg_().clamp_(min=0).sum(-1), cl), e

    tau, rows, resid = backward_scan(eta, c, full, level_fn)
    return VerifyOutput(tau, emit(target_probs, tau, rows, resid, u_y))


def law(
    draft_tokens: torch.Tensor, draft_probs: torch.Tensor | None, target_probs: torch.Tensor
) -> torch.Tensor:
    """Exact L[k, y] for one draft, every level's branch evaluated."""
    k = draft_tokens.shape[0]
    p = target_probs
    p_tok, q_tok = token_probs(draft_tokens, draft_probs, p)
    c, full = _prefix_terms(p_tok, q_tok)
    q = dense_draft_probs(draft_tokens, draft_probs, p.shape[-1], p.dtype)
    a, excess = _branch(c[:k], p[:k], q)
    return scan_law(torch.cat([a, full[None]]), excess, excess.sum(-1), p)


rule = Rule("hsd", verify, law, deterministic=coupled.verify, doc=__doc__)
