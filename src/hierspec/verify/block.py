"""Block verification (Sun, Mendlovic, Leviathan, Aharoni, Ro, Beirami, Suresh — ICLR 2025).

With r_t = p_t(X_t) / q_t(X_t), in ratio space (no joint probabilities, so no underflow):

    w_0 = 1,  w_k = min(1, w_{k-1} r_k) = R_k / max(1, R_0, ..., R_k),   R_k = prod_{t<=k} r_t
    rho_k(x) = [w_k p_{k+1}(x) - q_{k+1}(x)]^+,   S_k = sum_x rho_k(x)             (k < K)
    h_k = S_k / (S_k + 1 - w_k)  (k < K; 1 where the denominator is 0),   h_K = w_K

    tau = max{k : eta_k < h_k} over independent eta_k ~ U(0,1)  (h_0 = 1),
    Y ~ rho_tau / S_tau  if tau < K,   Y ~ p_{K+1}  if tau = K.

Law for one draft:  P(tau = k, Y = y) = h_k prod_{j>k} (1 - h_j) * (rho_k(y) / S_k  or p_{K+1}(y)).
Sun et al. prove this optimal: no valid verifier that sees only the draft block and the
conditionals along it accepts more tokens in expectation; it is never worse than token-wise.
The sampler uses the lazy backward scan of `scan.py` (residual masses only at candidate levels).
"""

from __future__ import annotations

import torch

from . import coupled
from .core import Rule, VerifyOutput, dense_draft_probs, token_probs
from .scan import backward_scan, dense_scan, emit, gather_rows, onehot_residual, scan_law


def capped_weights(p_tok: torch.Tensor, q_tok: torch.Tensor) -> torch.Tensor:
    """w [..., K+1] from drafted-token probabilities [..., K], via log R_k and its running max."""
    log_r = torch.log(p_tok) - torch.log(q_tok)  # -inf where p = 0
    zero = log_r.new_zeros((*log_r.shape[:-1], 1))
    log_big_r = torch.cat([zero, torch.cumsum(log_r, -1)], -1)
    log_cap = torch.cummax(log_big_r.clamp(min=0), -1).values
    return torch.exp(log_big_r - log_cap)


def stop_probs(s: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """h = S / (S + 1 - w), 1 where the denominator is 0, clamped to <= w (exact bound)."""
    den = s + (1 - w)
    h = torch.where(den > 0, s / torch.where(den > 0, den, 1), torch.ones_like(s))
    return torch.minimum(h, w)


def verify(
    draft_tokens: torch.Tensor,
    draft_probs: torch.Tensor | None,
    target_probs: torch.Tensor,
    generator: torch.Generator | None = None,
) -> VerifyOutput:
    """Block verification for a batch (see module docstring)."""
    b, k = draft_tokens.shape
    dev = target_probs.device
    u = torch.rand(b, k + 2, generator=generator, device=dev, dtype=target_probs.dtype)
    p_tok, q_tok = token_probs(draft_tokens, draft_probs, target_probs)
    w = capped_weights(p_tok, q_tok)
    eta, u_y = u[:, : k + 1], u[:, k + 1]
    if draft_probs is None:
        # One-hot q: S_k = w_k (1 - p(x)) + [w_k p(x) - 1]^+ from gathered probabilities alone.
        wk = w[:, :k]
        s = wk * (1 - p_tok) + (wk * p_tok - 1).clamp(min=0)
        tau, rows, lv = dense_scan(eta, stop_probs(s, wk), w[:, k])
        resid = onehot_residual(target_probs, draft_tokens, rows, lv, w[rows, lv])
        return VerifyOutput(tau, emit(target_probs, tau, rows, resid, u_y))

    def level_fn(rows: torch.Tensor, lv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        wl = w[rows].gather(1, lv)
        rho = gather_rows(target_probs, rows, lv).mul_(wl[..., None])
        rho = rho.sub_(gather_rows(draft_probs, rows, lv)).clamp_(min=0)
        return stop_probs(rho.sum(-1), wl), rho

    tau, rows, resid = backward_scan(eta, w, w[:, k], level_fn)
    return VerifyOutput(tau, emit(target_probs, tau, rows, resid, u_y))


def law(
    draft_tokens: torch.Tensor, draft_probs: torch.Tensor | None, target_probs: torch.Tensor
) -> torch.Tensor:
    """Exact L[k, y] = P(tau = k, Y = y) for one draft, all levels evaluated (no laziness)."""
    k = draft_tokens.shape[0]
    p = target_probs
    p_tok, q_tok = token_probs(draft_tokens, draft_probs, p)
    w = capped_weights(p_tok, q_tok)
    q = dense_draft_probs(draft_tokens, draft_probs, p.shape[-1], p.dtype)
    rho = (w[:k, None] * p[:k] - q).clamp(min=0)
    s = rho.sum(-1)
    h = torch.cat([stop_probs(s, w[:k]), w[k:]])
    return scan_law(h, rho, s, p)


rule = Rule("block", verify, law, deterministic=coupled.verify, doc=__doc__)
