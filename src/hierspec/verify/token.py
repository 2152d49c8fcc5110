"""Token-wise speculative sampling (Leviathan et al. 2023; Chen et al. 2023).

With r_t = p_t(X_t) / q_t(X_t) for the drafted tokens X_1..X_K:

    accept X_t with probability min(1, r_t), stopping at the first rejection;
    on a rejection at t (tau = t - 1) draw Y from  res_t = (p_t - q_t)^+ / sum (p_t - q_t)^+;
    if all K are accepted (tau = K) draw the bonus Y from p_{K+1}.

Lossless: at each position the kept mass is min(p, q) and the rejected mass
sum (q - p)^+ = sum (p - q)^+ is exactly refilled by the residual. Exact law for one draft:

    P(tau = k, Y = y) = (prod_{t<=k} a_t) (1 - a_{k+1}) res_{k+1}(y)    (k < K, a_t = min(1, r_t))
    P(tau = K, Y = y) = (prod_{t<=K} a_t) p_{K+1}(y)

Implementation: one uniform per position, accept iff u_t * q_t < p_t (no division), tau = number
of leading acceptances, one residual row per batch element, one inverse-CDF draw. No loop over
positions or vocabulary; the only V-sized work is the single residual row.
"""

from __future__ import annotations

import torch

from ..sampling import categorical
from . import coupled
from .core import Rule, VerifyOutput, dense_draft_probs, token_probs
from .scan import gather_rows


def verify(
    draft_tokens: torch.Tensor,
    draft_probs: torch.Tensor | None,
    target_probs: torch.Tensor,
    generator: torch.Generator | None = None,
) -> VerifyOutput:
    """Token-wise rejection sampling for a batch (see module docstring)."""
    b, k = draft_tokens.shape
    dev = target_probs.device
    u = torch.rand(b, k + 1, generator=generator, device=dev, dtype=target_probs.dtype)
    p_tok, q_tok = token_probs(draft_tokens, draft_probs, target_probs)
    accept = u[:, :k] * q_tok < p_tok
    tau = accept.long().cumprod(-1).sum(-1)  # leading acceptances
    bidx = torch.arange(b, device=dev)
    # p_{tau+1}: the residual base, or the bonus row when tau = K (index_select: a plain copy).
    p_row = gather_rows(target_probs, bidx, tau[:, None])[:, 0]
    rejected = tau < k
    if k == 0 or not bool(rejected.any()):
        rows = p_row
    elif draft_probs is None:
        # (p - onehot(x))^+ is p with the drafted token zeroed (the copy above is ours to edit).
        x = draft_tokens.long().gather(1, tau.clamp(max=k - 1)[:, None])[:, 0]
        rows = p_row.clone()
        rows[bidx, x] = torch.where(rejected, 0.0, rows[bidx, x])
    else:
        q_row = gather_rows(draft_probs, bidx, tau.clamp(max=k - 1)[:, None])[:, 0]
        rows = torch.where(rejected[:, None], (p_row - q_row).clamp_(min=0), p_row)
    y = categorical(rows, u[:, k], fallback=p_row)
    return VerifyOutput(num_accepted=tau, next_token=y)


def law(
    draft_tokens: torch.Tensor, draft_probs: torch.Tensor | None, target_probs: torch.Tensor
) -> torch.Tensor:
    """Exact L[k, y] = P(tau = k, Y = y) for one draft (float64 if the inputs are)."""
    k = draft_tokens.shape[0]
    p, x = target_probs, draft_tokens.long()
    q = draft_probs
    p_tok, q_tok = token_probs(x, q, p)
    a = torch.minimum(p_tok / q_tok, torch.ones_like(p_tok))  # [K]
    reach = torch.cat([torch.ones(1, dtype=p.dtype, device=p.device), torch.cumprod(a, 0)])
    out = torch.zeros_like(p)
    qd = dense_draft_probs(x, q, p.shape[-1], p.dtype)
    for t in range(k):  # analysis path: clarity over speed
        res = (p[t] - qd[t]).clamp(min=0)
        s = res.sum()
        stop = reach[t] * (1 - a[t])
        out[t] = stop * (res / s if s > 0 else p[t])
    out[k] = reach[k] * p[k]
    return out


rule = Rule("token", verify, law, deterministic=coupled.verify, doc=__doc__)
