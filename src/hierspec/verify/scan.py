"""The backward scan shared by block verification and capped HSD, with lazy residual masses.

Both rules decide the accepted length the same way (Sun et al. §3.2, Zhou et al. §4.3): draw
independent eta_0..eta_K ~ U(0, 1) and set

    tau = K                                  if eta_K < h_K           (full acceptance)
    tau = max{k < K : eta_k < h_k}           otherwise                (h_0 = 1, so tau >= 0)

and emit Y from the level-tau residual (or from p_{K+1} when tau = K). For a stochastic draft,
h_k (k < K) costs a pass over the vocabulary (the residual mass S_k), so K of them would
dominate the rule's time.

Laziness, exactly: every rule here has h_k <= w_k, where w_k in [0, 1] is the capped prefix
ratio (S_k = sum_x [w_k p - q]^+ <= w_k sum_x p = w_k, and h = S/(S + 1 - w) <= w  <=>  S <= w).
So a level with eta_k >= w_k can never stop, whatever its residual. Only the *candidate* levels
{k : eta_k < w_k} need S_k, and only down to the deepest one that stops. Phase 1 evaluates the
`num_lazy` deepest candidates of every row in one batched call; phase 2 evaluates all remaining
candidates of the rows where none of those stopped, as one flat batch of (row, level) pairs.
Given the same eta the result equals the full scan; the level functions clamp h <= w so
round-off cannot break that equivalence. At most four host syncs per call, none per position.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..sampling import categorical

#: level_fn(rows [R], levels [R, m]) -> (stop probability h [R, m], residual rows [R, m, V])
LevelFn = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def backward_scan(
    eta: torch.Tensor,
    bound: torch.Tensor,
    full_prob: torch.Tensor,
    level_fn: LevelFn,
    num_lazy: int = 2,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Accepted lengths and residual rows of a batch.

    eta [B, K+1] uniforms (column k for level k); bound [B, K+1] with h_k <= bound_k (w_k);
    full_prob [B] = h_K. Returns (tau [B], rows [R] of the batch that stopped below K, their
    residual rows [R, V]) — rows not listed accepted the whole draft.
    """
    b, k1 = eta.shape
    k = k1 - 1
    dev = eta.device
    full = eta[:, k] < full_prob
    tau = torch.full((b,), k, dtype=torch.long, device=dev)
    need = (~full).nonzero().squeeze(1)
    if need.numel() == 0 or k == 0:
        return tau, need[:0], eta.new_zeros((0, 0))
    levels = torch.arange(k, device=dev)
    cand = eta[need, :k] < bound[need, :k]
    cand[:, 0] = True  # w_0 = 1 > eta_0
    m = min(num_lazy, k)
    top = torch.where(cand, levels, -1).topk(m, dim=-1).values  # deepest candidates first
    lv = top.clamp(min=0)
    h, resid = level_fn(need, lv)
    # Level 0 always stops (h_0 = 1 exactly; forced so round-off cannot leave a row unresolved).
    stop = (top >= 0) & ((eta[need].gather(1, lv) < h) | (lv == 0))
    first = stop.long().argmax(-1)  # first True = deepest stopping candidate
    r = torch.arange(need.numel(), device=dev)
    tau_need = lv[r, first]
    rows = resid[r, first]
    missed = ~stop.any(-1)
    if bool(missed.any()):
        # Remaining candidates (below the m evaluated) of the rows where none stopped.
        rest = cand & missed[:, None] & (levels[None, :] < top[:, -1:])
        pr, pl = rest.nonzero(as_tuple=True)  # sorted by row, then level
        h2, resid2 = level_fn(need[pr], pl[:, None])
        stop2 = (eta[need[pr], pl] < h2[:, 0]) | (pl == 0)
        # Deepest stopping level per row; level 0 (h_0 = 1) is the default.
        best = torch.zeros(need.numel(), dtype=torch.long, device=dev)
        best.scatter_reduce_(0, pr, torch.where(stop2, pl, 0), reduce="amax")
        fill = missed.nonzero().squeeze(1)
        tau_need[fill] = best[fill]
        pick = stop2 & (pl == best[pr])
        sel = pick.nonzero().squeeze(1)
        rows[pr[sel]] = resid2[sel, 0]
    tau[need] = tau_need
    return tau, need, rows


def dense_scan(
    eta: torch.Tensor, h: torch.Tensor, full_prob: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The same scan when every level's h [B, K] is already known (deterministic drafts, where
    it is a closed form of gathered probabilities). Returns (tau [B], rows [R] that stopped below
    K, their levels [R])."""
    b, k1 = eta.shape
    k = k1 - 1
    levels = torch.arange(k, device=eta.device)
    stop = (eta[:, :k] < h) | (levels == 0)
    deepest = (stop.long() * levels).amax(-1) if k else eta.new_zeros(b, dtype=torch.long)
    full = eta[:, k] < full_prob
    tau = torch.where(full, k, deepest)
    rows = (~full).nonzero().squeeze(1)
    return tau, rows, tau[rows]


def onehot_residual(
    target_probs: torch.Tensor,
    draft_tokens: torch.Tensor,
    rows: torch.Tensor,
    levels: torch.Tensor,
    c: torch.Tensor,
) -> torch.Tensor:
    """[c p_{k+1} - onehot(x_{k+1})]^+ for batch rows `rows` [R] at levels [R] with c [R]: the
    row c p with the drafted token's entry replaced by [c p(x) - 1]^+."""
    r = torch.arange(rows.numel(), device=rows.device)
    out = gather_rows(target_probs, rows, levels[:, None])[:, 0].mul_(c[:, None])
    x = draft_tokens.long()[rows, levels]
    out[r, x] = (out[r, x] - 1).clamp_(min=0)
    return out


def gather_rows(probs: torch.Tensor, rows: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """probs[rows[:, None], levels] as a fresh [R, m, V] tensor, via one contiguous
    `index_select` (several times faster on CPU than advanced indexing)."""
    b, n, v = probs.shape
    flat = probs.reshape(b * n, v)
    return flat.index_select(0, (rows[:, None] * n + levels).reshape(-1)).view(*levels.shape, v)


def emit(
    target_probs: torch.Tensor,
    tau: torch.Tensor,
    rows: torch.Tensor,
    resid: torch.Tensor,
    u: torch.Tensor,
) -> torch.Tensor:
    """Draw Y: the bonus row p_{K+1} for full acceptances, the level residual for `rows`
    (falling back to p_{tau+1} if a residual is empty through round-off)."""
    b, k1, _ = target_probs.shape
    weights = target_probs[:, k1 - 1]
    fallback = weights
    if rows.numel():
        weights = weights.clone()
        weights[rows] = resid
        fallback = gather_rows(target_probs, torch.arange(b, device=tau.device), tau[:, None])[:, 0]
    return categorical(weights, u, fallback=fallback)


def scan_law(h: torch.Tensor, rho: torch.Tensor, s: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """L from per-level stop probabilities h [K+1] of a backward scan, residuals rho [K, V] with
    masses s [K], and target rows p [K+1, V]: P(tau = k) = h_k prod_{j>k} (1 - h_j)."""
    k = h.shape[0] - 1
    survive = torch.flip(torch.cumprod(torch.flip(1 - h, [0]), 0), [0])  # prod_{j>=k} (1-h_j)
    after = torch.cat([survive[1:], torch.ones_like(h[:1])])  # prod_{j>k} (1-h_j)
    p_tau = h * after
    safe = torch.where(s[:, None] > 0, rho / torch.where(s > 0, s, 1)[:, None], p[:k])
    return torch.cat([p_tau[:k, None] * safe, p_tau[k:, None] * p[k:]], 0)
